"""The main job on the embedded default: the whole pipeline, end to end, on a laptop-sized slice.

MajorTOM sample (generated, published parquet layout) -> jobs/launch_preprocess.py -> jobs/launch_pretrain.py
(2 processes, a tiny registered model) -> jobs/launch_sweep.py (a tiny PhilEO Bench sweep initialised from the
checkpoint just trained) -> jobs/collect_results.py. Every stage runs through the same launcher a cluster user
runs, as a subprocess, with `--cluster local` (no SLURM) or `--cluster slurm --site local` (the dev cluster).

Nothing is downloaded: the MajorTOM cells and the PhilEO Bench patches are generated (phileo.data.synthetic,
phileo.bench.synthetic). A stage whose output exists is reused, so re-running finishes quickly; `--fresh`
starts over. The CI test runs this with fewer steps (tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from phileo.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoSettings:
    """What the demo runs; the defaults fit a 2-core CPU machine in well under ten minutes."""

    out: Path
    cluster: str = "local"            # local | slurm (the dev cluster: slurm/dev-cluster/up.sh)
    cells: int = 8                    # MajorTOM cells generated (1068 px each, ~11 MB raw)
    preprocess_tasks: int = 2         # converter slices (array tasks)
    model: str = "phileo_cnn_tiny"
    strategy: str = "zero2"
    processes: int = 2                # --gpus-per-node: local processes (CPU here)
    steps: int = 200
    batch_size: int = 2               # per process
    lr: float = 1e-3
    n_shots: tuple[int, ...] = (2, 4)
    seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = ("building", "lc")
    finetune_epochs: int = 3

    def validate(self) -> None:
        if self.cluster not in ("local", "slurm"):
            raise ValueError(f"--cluster must be local or slurm, got {self.cluster!r}")
        if self.steps < 1 or self.cells < 1 or self.processes < 1:
            raise ValueError("--steps, --cells and --processes must be >= 1")


class Stage:
    """Prints a numbered heading and the elapsed time of one pipeline stage."""

    def __init__(self, number: int, total: int, title: str):
        self.title = f"[{number}/{total}] {title}"

    def __enter__(self):
        self.t0 = time.monotonic()
        print(f"\n=== {self.title}", flush=True)
        return self

    def skip(self, why: str) -> None:
        print(f"    reusing {why}", flush=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            print(f"    done in {time.monotonic() - self.t0:.0f} s", flush=True)
        return False


def smoke_test_note(s: DemoSettings) -> str:
    """What the demo's numbers are: the two lines printed under its results table (tests/test_demo.py)."""
    return (f"These numbers are a smoke test of the pipeline ({s.model}, {s.steps} pretraining steps on {s.cells} "
            f"generated cells, {'/'.join(map(str, s.n_shots))}-shot fine-tuning), not a result:\n"
            "they say that every stage ran, not which model is better; scores need the real data (README).")


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Runs one launcher with its output streamed (its own progress shows); raises with the command on failure."""
    print("    $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"demo stage failed (exit {proc.returncode}): {' '.join(shlex.quote(c) for c in cmd)}\n"
                           f"Its output is above; fix the cause and run the demo again (finished stages are reused).")


def _cluster_flags(s: DemoSettings) -> list[str]:
    return ["--cluster", s.cluster, "--site", "local"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def demo_paths(out: Path) -> dict[str, Path]:
    out = Path(out).resolve()
    return {
        "majortom": out / "majortom",
        "shards": out / "shards",
        "pretrain": out / "runs" / "pretrain",
        "bench": out / "phileo-bench",
        "sweep_file": out / "sweep.yaml",
        "sweep": out / "sweep",
    }


def write_demo_sweep(s: DemoSettings, paths: dict[str, Path]) -> Path:
    """The tiny sweep: the model from scratch vs initialised from the pretraining run just made."""
    sweep = {
        "name": "demo",
        "max_parallel": 2,
        "base": {
            "data.root": str(paths["bench"]),
            "data.batch_size": 4,
            "data.num_workers": 0,
            "finetune.max_epochs": s.finetune_epochs,
            "finetune.patience_epochs": s.finetune_epochs,
            "finetune.warmup_epochs": 1,
        },
        "models": [
            {"label": "tiny_scratch", "model.name": s.model, "model.init": "scratch"},
            {"label": "tiny_pretrained", "model.name": s.model, "model.init": str(paths["pretrain"])},
        ],
        "tasks": list(s.tasks),
        "n_shots": list(s.n_shots),
        "lrs": [s.lr],
        "seeds": list(s.seeds),
    }
    text = "# Written by `make demo` (phileo/demo.py): a tiny PhilEO Bench sweep on generated data.\n"
    text += yaml.safe_dump(sweep, sort_keys=False)
    path = paths["sweep_file"]
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def run_demo(s: DemoSettings) -> dict[str, Path]:
    """Runs every stage (reusing finished ones); returns the paths of what it made."""
    s.validate()
    paths = demo_paths(s.out)
    env = _env()
    py = sys.executable
    total = 6
    t_start = time.monotonic()

    with Stage(1, total, f"MajorTOM sample: {s.cells} cells in the published parquet layout, with global "
                         f"building / land-cover rasters") as st:
        marker = paths["majortom"] / "Core-S2L2A" / "metadata.parquet"
        if marker.exists():
            st.skip(str(paths["majortom"]))
        else:
            from phileo.data.synthetic import write_aux_rasters, write_majortom_parquet
            tmp = paths["majortom"].with_name(".majortom.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            write_majortom_parquet(tmp, n_cells=s.cells, seed=0)
            write_aux_rasters(tmp, n_cells=s.cells, seed=0)
            shutil.rmtree(paths["majortom"], ignore_errors=True)
            tmp.rename(paths["majortom"])  # the sample is only ever visible complete
            print(f"    wrote {paths['majortom']}", flush=True)

    with Stage(2, total, "preprocess: MajorTOM -> HDF5 chunks + manifest (jobs/launch_preprocess.py)") as st:
        if (paths["shards"] / "manifest.json").exists():
            st.skip(str(paths["shards"] / "manifest.json"))
        else:
            rasters = (("--aux-buildings", "build_4326.tif"), ("--aux-landcover", "landcover_4326.tif"))
            aux = [a for flag, name in rasters if (paths["majortom"] / "aux" / name).is_file()
                   for a in (flag, str(paths["majortom"] / "aux" / name))]  # absent in a sample from before them
            _run([py, "jobs/launch_preprocess.py", *_cluster_flags(s), "--source", str(paths["majortom"]),
                  "--out", str(paths["shards"]), "--tasks", str(s.preprocess_tasks), "--train-nodes", "1",
                  *aux, "--wait"], env)

    with Stage(3, total, f"pretrain {s.model}: {s.processes} processes, {s.strategy}, {s.steps} steps "
                         "(jobs/launch_pretrain.py)") as st:
        if (paths["pretrain"] / "DONE").exists():
            st.skip(str(paths["pretrain"]))
        else:
            # An interrupted earlier demo resumes from its newest checkpoint: --resume keeps its config.
            if (paths["pretrain"] / "launch.json").exists():
                cmd = [py, "jobs/launch_pretrain.py", "--resume", str(paths["pretrain"]), *_cluster_flags(s),
                       "--wait"]
            else:
                cmd = [py, "jobs/launch_pretrain.py", *_cluster_flags(s), "--nodes", "1",
                       "--gpus-per-node", str(s.processes), "--model", s.model, "--strategy", s.strategy,
                       "--data", str(paths["shards"]), "--steps", str(s.steps), "--batch-size", str(s.batch_size),
                       "--run-dir", str(paths["pretrain"]), "--job-name", "phileo-demo-pretrain", "--wait",
                       f"optim.lr={s.lr}", f"optim.warmup_steps={max(1, s.steps // 10)}",
                       f"checkpoint.every_steps={max(1, s.steps // 2)}", f"run.log_every_steps={max(1, s.steps // 20)}",
                       f"run.image_every_steps={max(1, s.steps // 2)}", "data.num_workers=0"]
            _run(cmd, env)

    with Stage(4, total, "PhilEO Bench sample: patches in the published .npy layout") as st:
        if (paths["bench"] / ".complete").exists():
            st.skip(str(paths["bench"]))
        else:
            from phileo.bench.synthetic import make_bench_data
            files = make_bench_data(paths["bench"], patch_size=128, patches_per_file=4, val_patches_per_file=2,
                                    train_tiles=1, test_tiles=1, seed=0)
            (paths["bench"] / ".complete").write_text(f"{len(files)} files\n")
            print(f"    wrote {len(files)} image files (+ labels) to {paths['bench']}", flush=True)

    with Stage(5, total, "fine-tuning sweep as one job array (jobs/launch_sweep.py)"):
        sweep_file = write_demo_sweep(s, paths)
        # Finished array tasks are skipped by the launcher, so a re-run only does what is missing.
        _run([py, "jobs/launch_sweep.py", str(sweep_file), *_cluster_flags(s), "--out", str(paths["sweep"]),
              "--parallel", "2", "--wait"], env)

    with Stage(6, total, "results table and plots (jobs/collect_results.py)"):
        _run([py, "jobs/collect_results.py", str(paths["sweep"]), "--strict"], env)

    table = paths["sweep"] / "results.md"
    print(f"\n=== Demo finished in {time.monotonic() - t_start:.0f} s. Where everything is:")
    rows = [("MajorTOM sample", paths["majortom"]), ("HDF5 chunks + manifest", paths["shards"] / "manifest.json"),
            ("pretraining run", paths["pretrain"]), ("checkpoints", paths["pretrain"] / "checkpoints"),
            ("PhilEO Bench sample", paths["bench"]), ("sweep folder", paths["sweep"]),
            ("results table", table), ("plots", paths["sweep"] / "plots")]
    for name, p in rows:
        print(f"  {name:24s} {p}")
    if table.exists():
        print("\n" + table.read_text())
    print(smoke_test_note(s))
    print(f"TensorBoard:  tensorboard --logdir {Path(s.out).resolve() / 'runs'}   "
          f"(fine-tuning, runs named by label: --logdir {paths['sweep'] / 'tensorboard'})")
    # How a campaign is watched (phileo-status); here, the finished one.
    print("\n=== Status (python jobs/status.py RUN_OR_SWEEP; --watch refreshes, --json for scripts)", flush=True)
    for target in (paths["pretrain"], paths["sweep"]):
        _run([py, "jobs/status.py", str(target)], env)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo"), help="demo folder (default: ./demo)")
    ap.add_argument("--cluster", choices=["local", "slurm"], default="local",
                    help="local: local processes, no SLURM (default); slurm: the dev cluster (slurm/dev-cluster/up.sh)")
    ap.add_argument("--steps", type=int, default=DemoSettings.steps, help="pretraining steps")
    ap.add_argument("--cells", type=int, default=DemoSettings.cells, help="MajorTOM cells to generate")
    ap.add_argument("--strategy", default=DemoSettings.strategy, choices=["ddp", "zero1", "zero2", "zero3"])
    ap.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    args = ap.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    if args.cluster == "slurm" and not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
        print("error: --cluster slurm needs a SLURM cluster: start the local one with\n"
              '  eval "$(slurm/dev-cluster/up.sh --nodes 4 | tail -n 1)"', file=sys.stderr)
        return 2
    s = DemoSettings(out=args.out, cluster=args.cluster, steps=args.steps, cells=args.cells, strategy=args.strategy)
    try:
        run_demo(s)
    except (RuntimeError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0
