"""Sweep files -> numbered array tasks, the array script's range, resumable task folders, and result collection.

Fine-tuning itself is replaced here by a stand-in that writes a result.json (tests/test_finetune.py trains for
real); what is tested is the bookkeeping around it.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from phileo import exit_codes
from phileo.bench import sweep as sw
from phileo.bench.results import collect_results, write_outputs
from phileo.bench.sweep import (SweepError, array_range, expand_sweep, format_array_spec,
                                pending_indices, run_sweep_task, task_dir, task_finished)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "slurm" / "sweeps" / "phileo_bench.yaml"
ARRAY_SCRIPT = REPO / "slurm" / "finetune_array.sh"


def _sweep_file(tmp_path, name="s.yaml", **changes):
    doc = {"name": "tiny", "base": {"data.root": "${BENCH_ROOT}", "finetune.max_epochs": 2},
           "models": [{"label": "a", "model.name": "phileo_cnn_44m"},
                      {"label": "b", "model.name": "phileo_cnn_44m", "model.freeze_encoder": True}],
           "tasks": ["roads"], "n_shots": [5, 10], "lrs": [1.0e-3, 1.0e-4], "seeds": [0, 1]}
    doc.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_default_sweep_is_the_paper_grid():
    specs = expand_sweep(DEFAULT_SWEEP)
    sweep = sw.load_sweep(DEFAULT_SWEEP)
    assert sweep.n_shots == [50, 100, 500, 1000, 5000] and sweep.tasks == ["roads", "building", "lc"]
    assert len(specs) == len(sweep.models) * 3 * 5 * len(sweep.lrs) * len(sweep.seeds)
    assert [s.index for s in specs] == list(range(len(specs)))
    # Seed varies fastest, then LR, n-shot, task, model.
    assert (specs[0].seed, specs[1].seed) == (sweep.seeds[0], sweep.seeds[1])
    assert specs[len(sweep.seeds)].lr == sweep.lrs[1]
    assert specs[-1].model == sweep.models[-1]["label"] and specs[-1].task == "lc" and specs[-1].n_shot == 5000
    assert specs[7].overrides["data.task"] == specs[7].task and specs[7].overrides["optim.lr"] == specs[7].lr
    assert expand_sweep(REPO / "slurm" / "sweeps" / "phileo_bench_frozen.yaml")


def test_array_script_range_matches_the_default_sweep():
    lines = [ln for ln in ARRAY_SCRIPT.read_text().splitlines() if ln.startswith("#SBATCH --array=")]
    assert len(lines) == 1, "finetune_array.sh needs exactly one #SBATCH --array line"
    declared = lines[0].split("=", 1)[1].strip()
    assert declared == array_range(DEFAULT_SWEEP), (
        f"finetune_array.sh says --array={declared} but {DEFAULT_SWEEP.name} needs {array_range(DEFAULT_SWEEP)}")
    m = re.fullmatch(r"0-(\d+)(%\d+)?", declared)
    assert m and int(m.group(1)) + 1 == len(expand_sweep(DEFAULT_SWEEP))
    assert int(m.group(1)) < 1001, "beyond the dev cluster's (and a common site's) MaxArraySize"


@pytest.mark.no_slurm
def test_both_sweep_paths_take_walltime_signal_and_folder_from_the_same_place(tmp_path, monkeypatch, no_slurm_path):
    """launch_sweep.py --sbatch-args (what finetune_array.sh is submitted with) says what launch_sweep's own
    array asks for, and the script's #SBATCH defaults are those values for the default sweep on Leonardo."""
    monkeypatch.setenv("CINECA_SCRATCH", str(tmp_path / "scratch"))
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_sweep.py"), str(DEFAULT_SWEEP), "--site",
                          "leonardo", "--account", "P", "--sbatch-args"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    opts = dict(o.lstrip("-").split("=", 1) for o in out.stdout.split())
    assert opts["time"] == sw.load_sweep(DEFAULT_SWEEP).time_per_task == "04:00:00"  # a fine-tune, not 24 h
    assert opts["signal"] == "USR2@300"  # leonardo.yaml's signal_delay_s
    assert f"PHILEO_SWEEP_DIR={tmp_path / 'scratch'}/phileo/runs/sweeps/phileo_bench" in opts["export"]
    script = {k: v for k, v in re.findall(r"^#SBATCH --([\w-]+)=(\S+)", ARRAY_SCRIPT.read_text(), flags=re.M)}
    assert {k: script[k] for k in ("array", "time", "signal", "cpus-per-task")} == \
        {k: opts[k] for k in ("array", "time", "signal", "cpus-per-task")}
    dry = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_sweep.py"), str(DEFAULT_SWEEP), "--site",
                          "leonardo", "--account", "P", "--dry-run"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert "#SBATCH --time=240" in dry.stdout and "#SBATCH --signal=USR2@300" in dry.stdout, dry.stdout[-2000:]


def test_cli_prints_count_and_array_range(tmp_path):
    path = _sweep_file(tmp_path, max_parallel=3)
    out = subprocess.run([sys.executable, "-m", "phileo.bench.sweep", "array", str(path)], capture_output=True,
                         text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "0-15%3"
    assert sw.main(["count", str(path)]) == 0


@pytest.mark.parametrize("changes, message", [
    ({"grids": [1]}, r"unknown key\(s\) \['grids'\]"),
    ({"seeds": []}, "'seeds' is an empty list"),
    ({"lrs": [1e-3, 1e-3]}, "lists a value twice"),
    ({"base": {"optim.lr": 0.1}}, r"base sets \['optim.lr'\], which the grid sets"),
    ({"models": [{"label": "a"}, {"label": "a"}]}, "model labels must be unique"),
    ({"models": [{"label": "x", "model.nme": "phileo_cnn_44m"}]}, "model 'x'.*Did you mean 'name'"),
    ({"tasks": ["roadz"]}, "data.task"),
    ({"n_shots": ["many"]}, "'n_shots' entry 'many' is not a int"),
])
def test_bad_sweeps_are_refused_before_submission(tmp_path, changes, message):
    with pytest.raises(SweepError, match=message):
        expand_sweep(_sweep_file(tmp_path, **changes))


def test_array_spec_formatting():
    assert format_array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_array_spec([3], max_parallel=4) == "3%4"
    assert format_array_spec(range(360), 32) == "0-359%32"
    with pytest.raises(SweepError):
        format_array_spec([])


def test_environment_variables_are_expanded_when_a_task_runs(tmp_path, monkeypatch):
    spec = expand_sweep(_sweep_file(tmp_path))[0]
    monkeypatch.delenv("BENCH_ROOT", raising=False)
    with pytest.raises(SweepError, match="BENCH_ROOT not set"):
        sw.build_task_config(spec, tmp_path / "run")
    monkeypatch.setenv("BENCH_ROOT", "/data/bench")
    cfg = sw.build_task_config(spec, tmp_path / "run")
    assert cfg.data.root == "/data/bench" and cfg.run.dir == str(tmp_path / "run")
    assert (cfg.data.task, cfg.data.n_shot, cfg.optim.lr, cfg.train.seed) == ("roads", 5, 1e-3, 0)


class FakeFinetune:
    """Stands in for phileo.bench.finetune: writes result.json with metrics chosen per task, or fails."""

    def __init__(self, metrics_for=None, fail_for=(), preempt_for=()):
        self.calls = []
        self.metrics_for = metrics_for or (lambda cfg: (0.1, {"rmse": 0.2, "mse": 0.04, "mae": 0.1, "f1": 0.5}))
        self.fail_for, self.preempt_for = set(fail_for), set(preempt_for)

    def run_finetuning(self, cfg):
        run_dir = Path(cfg.run.dir)
        self.calls.append(run_dir.name)
        index = int(run_dir.name)
        if index in self.fail_for:
            raise RuntimeError(f"deliberate failure of task {index}")
        if index in self.preempt_for:
            return types.SimpleNamespace(status="preempted")
        val, test = self.metrics_for(cfg)
        (run_dir / "result.json").write_text(json.dumps({"status": "completed", "best_val_loss": val,
                                                         "best_epoch": 1, "epochs_run": 2, "test": test}))
        return types.SimpleNamespace(status="completed")


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        f = FakeFinetune(**kw)
        monkeypatch.setitem(sys.modules, "phileo.bench.finetune",
                            types.SimpleNamespace(run_finetuning=f.run_finetuning))
        return f
    monkeypatch.setenv("BENCH_ROOT", "/data/bench")
    return install


def test_tasks_run_once_and_failures_are_recorded(tmp_path, fake):
    sweep, out = _sweep_file(tmp_path), tmp_path / "out"
    f = fake(fail_for={3})
    assert run_sweep_task(sweep, 2, out).status == "completed"
    assert task_finished(out, 2) and (task_dir(out, 2) / "spec.json").exists()
    assert json.loads((out / "sweep.json").read_text())["n_tasks"] == 16 and (out / "sweep.yaml").exists()
    # A finished task is not run again.
    assert run_sweep_task(sweep, 2, out).status == "skipped" and f.calls == ["00002"]
    with pytest.raises(RuntimeError, match="deliberate failure of task 3"):
        run_sweep_task(sweep, 3, out)
    failed = json.loads((task_dir(out, 3) / "failed.json").read_text())
    assert failed["index"] == 3 and "deliberate failure" in failed["traceback"]
    assert not task_finished(out, 3) and sw.task_failed(out, 3)["error_type"] == "RuntimeError"
    # Re-running the failed task alone (sbatch --array=3) succeeds and clears the failure record.
    fake()
    assert run_sweep_task(sweep, 3, out).status == "completed" and sw.task_failed(out, 3) is None
    assert pending_indices(sweep, out) == [i for i in range(16) if i not in (2, 3)]
    with pytest.raises(SweepError, match="index 16 is outside"):
        run_sweep_task(sweep, 16, out)


def test_a_sweep_folder_refuses_another_grid(tmp_path, fake):
    fake()
    out = tmp_path / "out"
    run_sweep_task(_sweep_file(tmp_path), 0, out)
    other = _sweep_file(tmp_path, name="other.yaml", seeds=[0, 1, 2])
    with pytest.raises(SweepError, match="holds a different sweep"):
        run_sweep_task(other, 0, out)
    # Comments or key order do not matter, only the grid.
    same = tmp_path / "same.yaml"
    same.write_text("# a comment\n" + (tmp_path / "s.yaml").read_text())
    assert run_sweep_task(same, 0, out).status == "skipped"


def test_cli_run_exit_codes(tmp_path, fake, monkeypatch, capsys):
    fake(preempt_for={1}, fail_for={2})
    sweep, out = _sweep_file(tmp_path), tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert sw.main(["run", str(sweep), "--out", str(out)]) == 0 and task_finished(out, 0)
    assert sw.main(["run", str(sweep), "--out", str(out), "--index", "1"]) == exit_codes.PREEMPTED
    with pytest.raises(RuntimeError):
        sw.main(["run", str(sweep), "--out", str(out), "--index", "2"])
    assert sw.main(["run", str(sweep), "--out", str(out), "--index", "99"]) == 2
    assert "outside sweep" in capsys.readouterr().err
    assert sw.main(["array", str(sweep), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "1-15"


def test_collect_results_table_plots_and_missing(tmp_path, fake):
    sweep, out = _sweep_file(tmp_path), tmp_path / "out"
    specs = expand_sweep(sweep)
    label_of = {task_dir(out, s.index).name: s for s in specs}

    def metrics(cfg):
        s = label_of[Path(cfg.run.dir).name]
        model_offset = 0.0 if s.model == "a" else 0.1
        rmse = 0.3 + model_offset - 0.001 * s.n_shot + 0.01 * s.seed + (0.05 if s.lr == 1e-3 else 0.0)
        val = 1.0 + model_offset + (0.0 if s.lr == 1e-3 else 0.5) + 0.01 * s.seed
        return val, {"rmse": rmse, "mse": rmse ** 2, "mae": rmse / 2, "f1": 0.5, "n_pixels": 100}

    fake(metrics_for=metrics, fail_for={5})
    for s in specs:
        if s.index == 12:
            continue  # never started: missing
        try:
            run_sweep_task(sweep, s.index, out)
        except RuntimeError:
            assert s.index == 5
    res = collect_results(out)
    status = {r.index: r.status for r in res.records}
    assert status[5] == "failed" and status[12] == "missing" and list(status.values()).count("completed") == 14
    cell = {(c["model"], c["n_shot"]): c for c in res.cells}
    # Model a, n=5: best validation LR is 1e-3 (seeds 0, 1): rmse 0.3 - 0.005 + 0.05 + {0, 0.01}.
    a5 = cell[("a", 5)]
    assert a5["lr"] == 1e-3 and a5["n_seeds"] == 2
    mean, std = a5["metrics"]["rmse"]
    assert mean == pytest.approx(0.35) and std == pytest.approx(0.01 / 2 ** 0.5)
    # Model a, n=10, lr 1e-3 lost seed 1 (index 5 failed): the mean is over the one seed left.
    assert cell[("a", 10)]["n_seeds"] == 1 and cell[("a", 10)]["metrics"]["rmse"][1] is None

    outs = write_outputs(out)
    rows = list(csv.DictReader(outs.csv.open()))
    assert len(rows) == 16 and rows[5]["status"] == "failed" and "deliberate failure" in rows[5]["error"]
    assert float(rows[0]["test_rmse"]) == pytest.approx(0.345)
    md = outs.markdown.read_text()
    assert "## roads: test RMSE (lower is better)" in md
    assert "| a | 0.3500 ± 0.0071 (lr 0.001, 2 seeds) |" in md
    assert "Failed (1): indices 5" in md and "Missing or unfinished (1): indices 12" in md
    assert "sbatch --array=5,12 " in md
    assert [p.name for p in outs.plots] == ["roads_rmse.png"]
    assert outs.plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cli = subprocess.run([sys.executable, str(REPO / "jobs" / "collect_results.py"), str(out), "--strict"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 1, cli.stderr
    assert "failed array tasks: 5" in cli.stdout and "missing array tasks: 12" in cli.stdout
    assert "5: RuntimeError: deliberate failure of task 5" in cli.stdout


def test_collect_refuses_a_folder_without_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep snapshot"):
        collect_results(tmp_path)
    cli = subprocess.run([sys.executable, str(REPO / "jobs" / "collect_results.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "sweep snapshot" in cli.stderr


def test_a_task_started_by_srun_takes_slurms_rank_over_an_inherited_rank(monkeypatch):
    """The rank fix: srun inside an environment that sets RANK (the submitting shell's) used to give rank 3."""
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                 "SLURM_JOB_ID": "99"}.items():
        monkeypatch.setenv(k, v)
    assert sw._global_rank() == 1
    monkeypatch.delenv("SLURM_STEP_ID")  # no srun step: the torchrun-style variables are the layout
    assert sw._global_rank() == 3
