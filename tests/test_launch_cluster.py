"""The launchers on the dev SLURM cluster, for real: multi-node pretraining, a time limit survived by
requeue, the preprocessing array + merge, hostile names, and the same pretraining without SLURM.

The pretraining runs are shared: one 2-node job runs straight through (the reference), an identical one with a
2-minute limit is signalled, requeued and resumed, and both must end at the same step with the same loss.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phileo.launch.jobs import TrainingJob
from phileo.launch.preprocess import command_job
from phileo.launch.resources import resolve_resources
from phileo.launch.sites import load_site
from phileo.launch.slurm import wait_for_job_id
from phileo.launch.submit import make_plan, read_task_result, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# Long enough that, after the limit is cut, SLURM's USR2 (sent by its periodic time-limit check, up to ~30 s
# later) still finds the job training on an idle machine (~0.5 s/step); 30 steps finished first there.
STEPS = 80
TRAIN_ARGS = ["--site", "local", "--model", "phileo_cnn_tiny", "--steps", str(STEPS), "--batch-size", "2",
              "optim.warmup_steps=2", "run.log_every_steps=1", "run.image_every_steps=0",
              "checkpoint.every_steps=20", "data.num_workers=0"]


def _launch(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(REPO / "jobs" / script), *args], capture_output=True, text=True, **kw)


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted slurm job (\d+)", stdout)
    assert m, f"no job id in the launcher's output:\n{stdout}"
    return m.group(1)


def _result(run: Path, job_id: str):
    with open(run / "logs" / f"{job_id}_0_result.pkl", "rb") as fh:
        return pickle.load(fh)


def _logs(run: Path, pattern: str = "*.err") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "logs").glob(pattern)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from phileo.data.synthetic import make_pretrain_shards

    return make_pretrain_shards(tmp_path_factory.mktemp("launch-data"), n_cells=8, nodes=2)


def _steps_logged(run: Path) -> int:
    steps = re.findall(r"step (\d+)/\d+", (run / "log.txt").read_text()) if (run / "log.txt").exists() else []
    return max(map(int, steps), default=0)


def _elapsed_s(job_id: str) -> int:
    text = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True, text=True).stdout
    days, _, hms = text.strip().rpartition("-")
    seconds = 0
    for part in hms.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def _set_time_limit(job_id: str, minutes: int) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory, shards):
    """The reference and the time-limited run side by side (2 nodes each), both waited for.

    The second run's time limit is cut, once its training loop is running, to 1-2 minutes from then: shorter
    than its remaining work, and close enough that SLURM's USR2 (90 s before the limit) comes at once, however
    fast this machine is. When it has requeued itself the limit is raised again so the resumed job can finish.
    """
    base = tmp_path_factory.mktemp("launch-runs")
    straight, requeued = base / "straight", base / "requeue"
    common = [*TRAIN_ARGS, "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--data", str(shards),
              "--time", "30"]
    # The time-limited run goes through --wait: it must block across the requeue and report the final status.
    waiter = subprocess.Popen(
        [PY, str(REPO / "jobs/launch_pretrain.py"), *common, "--run-dir", str(requeued), "--job-name", "requeue",
         "--signal-delay-s", "90", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Submitted from a shell with another launcher's rank variables left in it (sbatch exports them): the
        # job must still take its ranks from srun, not run as two world-size-1 jobs in one folder.
        stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
        first = _launch("launch_pretrain.py", *common, "--run-dir", str(straight), "--job-name", "straight",
                        env={**os.environ, **stale})
        assert first.returncode == 0, first.stderr
        straight_id = _job_id(first.stdout)
        deadline = time.monotonic() + 300
        while _steps_logged(requeued) < 3:
            assert waiter.poll() is None, "the time-limited run ended before it was signalled"
            assert time.monotonic() < deadline, f"the time-limited run did not start training:\n{_logs(requeued)}"
            time.sleep(1)
        requeue_id = json.loads((requeued / "launch.json").read_text())["job_ids"][0]
        _set_time_limit(requeue_id, _elapsed_s(requeue_id) // 60 + 2)
        while not re.search(r"requeueing \(1/", _logs(requeued)):
            assert waiter.poll() is None, f"ended without a requeue:\n{_logs(requeued)[-3000:]}"
            assert time.monotonic() < deadline, f"no requeue:\n{_logs(requeued)[-3000:]}"
            time.sleep(1)
        _set_time_limit(requeue_id, 30)
        out, err = waiter.communicate(timeout=400)
    except BaseException:
        waiter.kill()
        raise
    wait_for_job_id(straight_id, timeout_s=300, poll_s=2)
    return {"straight": (straight, straight_id, first), "requeue": (requeued, _job_id(out), waiter.returncode,
                                                                      out, err)}


def test_two_node_job_completes_with_checkpoints_and_tensorboard(pretrain_runs):
    run, job_id, launch = pretrain_runs["straight"]
    assert f"run folder:  {run}" in launch.stdout
    assert f"tensorboard --logdir {run / 'tensorboard'}" in launch.stdout
    state, result = _result(run, job_id)
    assert state == "success", result
    assert (result.status, result.step) == ("completed", STEPS)
    assert json.loads((run / "DONE").read_text())["step"] == STEPS
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "model.pt").is_file()
    env = json.loads((run / "env.json").read_text())
    assert env["layout"]["world_size"] == 2 and env["layout"]["source"] == "slurm"
    assert sorted(r["slurm_node"] for r in env["ranks"]) == ["node1", "node2"] or \
        len({r["slurm_node"] for r in env["ranks"]}) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/total")]
    assert steps[-1] == STEPS and len(steps) == STEPS
    # Both ranks' outputs landed in the run folder.
    assert (run / "logs" / f"{job_id}_0_log.out").exists() and (run / "logs" / f"{job_id}_1_log.out").exists()


def test_time_limit_requeue_resumes_to_the_same_step_and_loss(pretrain_runs):
    run, job_id, returncode, out, err = pretrain_runs["requeue"]
    logs = _logs(run)
    assert returncode == 0, f"{out}\n{err}\n{logs[-3000:]}"
    assert re.search(r"preempted at step \d+: checkpoint written, requeueing \(1/", logs), logs[-3000:]
    assert f"status=completed step={STEPS}" in out
    _, reference = _result(*pretrain_runs["straight"][:2])
    state, result = _result(run, job_id)
    assert state == "success" and (result.status, result.step) == ("completed", STEPS)
    assert result.final_loss == pytest.approx(reference.final_loss, rel=1e-5, abs=1e-7)
    # The resumed job started from a checkpoint written before the limit, not from scratch.
    log_txt = (run / "log.txt").read_text()
    assert "(stop signal SIGUSR2)" in log_txt, log_txt[-2000:]  # the pre-timeout signal, not the kill
    assert re.search(r"resuming from .*step_\d+ \(step \d+", log_txt), log_txt[-2000:]
    # state.json tells the story the status command shows: queued, started, requeued once, started, completed.
    from phileo.launch.status import status

    events = [e["event"] for e in json.loads((run / "state.json").read_text())["events"]]
    # Each start takes the run lock first (issue 14's one-writer rule): a "lock" event before each "started".
    assert events == ["submitted", "lock", "started", "preempted", "requeued", "lock", "started", "completed"], events
    shown = status(run)
    assert (shown["state"], shown["requeues"], shown["step"]) == ("completed", 1, STEPS)
    # --wait showed the training as it went, not just "waiting for job".
    assert f"step {STEPS}/{STEPS} | loss " in out and "requeued" in out


def test_dry_run_prints_exactly_the_submitted_script(pretrain_runs):
    run, job_id, _ = pretrain_runs["straight"]
    dry = _launch("launch_pretrain.py", "--resume", str(run), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    script = dry.stdout.split("# ---- batch script", 1)[1].split("\n", 1)[1].split("# ---- resolved config")[0]
    assert script == (run / "logs" / f"{job_id}_submission.sh").read_text()


def test_hostile_job_name_and_run_dir_on_the_cluster(tmp_path):
    """sbatch reads the quoted #SBATCH values back verbatim; nothing in them runs; logs land in the odd folder."""
    canary = tmp_path / "CANARY"
    name = f"it's \"x\" $(touch {canary})"
    run = tmp_path / f"a run 'dir' $(touch {canary})"
    site = load_site("local")
    res = resolve_resources(site, job_name=name, time="5")
    job = submit(make_plan("slurm", site, res, run / "logs"),
                 TrainingJob("preprocess_task", {"argv": ["echo", "hello from the job"]}))
    wait_for([job], timeout_s=120, poll_s=1)
    assert read_task_result(job) == ("success", 0)
    assert not canary.exists()
    assert "hello from the job" in (run / "logs" / f"{job.job_id}_0_log.out").read_text()
    shown = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job.job_id), "-o", "%j"],
                           capture_output=True, text=True).stdout.strip()
    assert shown == name


def test_preprocess_array_then_merge_matches_a_local_conversion(tmp_path):
    from phileo.data import load_manifest
    from phileo.data.synthetic import write_majortom_parquet

    source = tmp_path / "source"
    write_majortom_parquet(source, 6, seed=1, cells_per_shard=3)
    common = ["--site", "local", "--source", str(source), "--tasks", "2", "--train-nodes", "2", "--time", "10",
              "--cells-per-chunk", "2"]
    on_slurm = _launch("launch_preprocess.py", *common, "--cluster", "slurm", "--out", str(tmp_path / "slurm"),
                       "--wait", timeout=400)
    assert on_slurm.returncode == 0, on_slurm.stdout + on_slurm.stderr
    ids = re.search(r"plan job (\d+), array job (\d+) \(2 tasks, %2\), merge job (\d+)", on_slurm.stdout)
    assert ids, on_slurm.stdout
    plan_id, array_id, merge_id = ids.groups()
    assert f"merge job id: {merge_id}" in on_slurm.stdout and f"--after {merge_id}" in on_slurm.stdout
    submission = (tmp_path / "slurm/logs/merge" / f"{merge_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array_id}" in submission
    assert "#SBATCH --kill-on-invalid-dep=yes" in submission
    local = _launch("launch_preprocess.py", *common, "--cluster", "local", "--out", str(tmp_path / "local"),
                    timeout=400)
    assert local.returncode == 0, local.stdout + local.stderr
    on_cluster, here = load_manifest(tmp_path / "slurm"), load_manifest(tmp_path / "local")
    assert len(on_cluster.chunks) == len(here.chunks) >= 2
    assert [c.n_cells for c in on_cluster.chunks] == [c.n_cells for c in here.chunks]
    assert on_cluster.num_cells == here.num_cells > 0
    assert on_cluster.raw["assignment"]["num_nodes"] == 2


def test_a_failed_stage_cancels_the_rest_and_wait_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.monotonic()
    res = _launch("launch_preprocess.py", "--site", "local", "--cluster", "slurm", "--source", str(empty),
                  "--out", str(tmp_path / "out"), "--tasks", "2", "--time", "5", "--wait", timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"plan job \d+ failed", res.stderr)
    assert re.search(r"merge job \d+ failed: never ran", res.stderr)
    assert time.monotonic() - t0 < 240
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_preflight_refuses_an_over_limit_request_before_submitting(tmp_path, shards):
    res = _launch("launch_pretrain.py", "--site", "local", "--cluster", "slurm", "--nodes", "8", "--data",
                  str(shards), "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "--nodes 8 is more than the 4 nodes" in res.stderr and "use --nodes 4 or fewer" in res.stderr
    assert "4 chunk(s) but the job has 8 nodes" in res.stderr
    assert "submitted" not in res.stdout and not (tmp_path / "run").exists()


def _queued() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True,
                              check=True).stdout.split())


def test_live_checks_refuse_before_anything_is_queued(tmp_path, shards):
    # No --site on this machine: the dev cluster's ClusterName (phileo-dev) picks the local profile.
    dry = _launch("launch_pretrain.py", "--model", "phileo_cnn_tiny", "--data", str(shards), "--run-dir",
                  str(tmp_path / "dry"), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "site: local (this machine is SLURM cluster 'phileo-dev'" in dry.stderr
    assert "live checks: partition checked against this cluster" in dry.stdout
    before = _queued()
    run = tmp_path / "run"
    res = _launch("launch_pretrain.py", "--site", "local", "--cluster", "slurm", "--partition", "gpu", "--after",
                  "999999", "--model", "phileo_cnn_4m", "--data", str(shards), "--run-dir", str(run))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--partition gpu is not a partition of this cluster (sinfo lists debug)" in res.stderr
    assert "--after 999999: SLURM lists no such job" in res.stderr
    assert "--model phileo_cnn_4m: unknown model" in res.stderr and "nothing was submitted" in res.stderr
    assert _queued() - before == set(), "a refused launch queued a job"
    assert not run.exists(), "a refused launch wrote its run folder (submitit's logs)"


def test_after_names_a_real_job_and_refuses_one_that_failed(tmp_path, shards):
    site = load_site("local")
    res = resolve_resources(site, time="5", job_name="fails")
    failed = submit(make_plan("slurm", site, res, tmp_path / "failed"), command_job(["false"]))
    wait_for([failed], timeout_s=120, poll_s=1)
    running = submit(make_plan("slurm", site, res, tmp_path / "sleeps"), command_job(["sleep", "60"]))
    try:
        common = ["--site", "local", "--cluster", "slurm", "--model", "phileo_cnn_tiny", "--data", str(shards),
                  "--run-dir", str(tmp_path / "r"), "--dry-run"]
        ok = _launch("launch_pretrain.py", *common, "--after", str(running.job_id))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"#SBATCH --dependency=afterok:{running.job_id}" in ok.stdout
        assert f"job {running.job_id} checked against this cluster" in ok.stdout
        bad = _launch("launch_pretrain.py", *common, "--after", str(failed.job_id))
        assert bad.returncode == 2
        assert f"--after {failed.job_id}: that job ended FAILED, so this one would never start" in bad.stdout
    finally:
        subprocess.run(["scancel", str(running.job_id)], capture_output=True)


def test_local_cluster_runs_the_same_pretraining_without_slurm(tmp_path, shards):
    run = tmp_path / "local"
    # The flags of the cluster runs; the later --steps wins.
    res = _launch("launch_pretrain.py", *TRAIN_ARGS, "--cluster", "local", "--gpus-per-node", "2",
                  "--data", str(shards), "--run-dir", str(run), "--steps", "4", "--wait", timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "status=completed step=4" in res.stdout
    env = json.loads((run / "env.json").read_text())
    assert env["layout"]["world_size"] == 2 and env["layout"]["source"] == "torchrun"
    assert all(r["slurm_node"] is None for r in env["ranks"])
    assert (run / "DONE").exists() and (run / "checkpoints" / "step_00000004" / "model.pt").is_file()


def _plain_pretrain_sbatch(run: Path, env: dict[str, str], overrides: list[str]) -> str:
    """Submits slurm/pretrain.sbatch on 2 dev-cluster nodes into `run` and waits for it to end; returns the job id."""
    (run / "logs").mkdir(parents=True)
    env = {**os.environ, "RUN_DIR": str(run), "PHILEO_PYTHON": PY, "PHILEO_SETUP": "none", **env}
    # The script's #SBATCH lines are Leonardo's: the command line replaces what the dev cluster cannot give.
    args = ["--partition=debug", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none",
            "--mem=0", "--time=10", f"--output={run}/logs/%j.out", f"--chdir={REPO}"]
    out = subprocess.run(["sbatch", "--parsable", *args, str(REPO / "slurm" / "pretrain.sbatch"), *overrides],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_for_job_id(job_id, timeout_s=300, poll_s=2)
    return job_id


def test_plain_pretrain_sbatch_requeues_itself_until_done(tmp_path, shards):
    """slurm/pretrain.sbatch without submitit: a launch that stops early with a checkpoint (exit 75, no DONE) is
    requeued by the batch shell, and the requeued launch finishes the run."""
    run = tmp_path / "plain run"
    job_id = _plain_pretrain_sbatch(run, {"MAX_REQUEUES": "2"}, [
        "model.name=phileo_cnn_tiny", f"data.root={shards}", "train.steps=4", "data.batch_size=2",
        "data.num_workers=0", "optim.warmup_steps=1", "run.image_every_steps=0", "train.max_steps_per_launch=2"])
    log = (run / "logs" / f"{job_id}.out").read_text()
    assert "requeueing job" in log and "training finished" in log, log[-3000:]
    assert json.loads((run / "DONE").read_text())["step"] == 4
    assert "(restart 1)" in log


def test_sweep_as_job_arrays_split_at_max_array_size(tmp_path):
    """Three fine-tuning tasks with MaxArraySize 2: two arrays, the second after the first (afterany)."""
    import yaml

    from phileo.bench.synthetic import make_bench_data

    bench = tmp_path / "bench"
    make_bench_data(bench, regions=("europe", "japan"), patches_per_file=4, val_patches_per_file=2, patch_size=32)
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny", "max_parallel": 2,
        "base": {"data.root": str(bench), "data.batch_size": 4, "data.num_workers": 0,
                 "model.overrides": {"img_size": 32}, "finetune.max_epochs": 1, "finetune.warmup_epochs": 0,
                 "run.tensorboard": False},
        "models": [{"label": "tiny", "model.name": "phileo_cnn_tiny"}],
        "tasks": ["building"], "n_shots": [4], "lrs": [1.0e-3], "seeds": [0, 1, 2]}))
    out = tmp_path / "sweep"
    res = _launch("launch_sweep.py", str(sweep), "--site", "local", "--cluster", "slurm", "--out", str(out),
                  "--time", "10", "--max-array-size", "2", "--wait", timeout=480)
    assert res.returncode == 0, res.stdout + res.stderr + _logs(out)[-3000:]
    assert "sweep tasks: 3 completed" in res.stdout
    record = json.loads((out / "launch.json").read_text())
    first, second = record["arrays"]
    assert (first["tasks"], second["tasks"]) == ([0, 1], [2])
    scripts = {p.name: p.read_text() for p in (out / "logs").glob("*_submission.sh")}
    first_script = next(t for n, t in scripts.items() if n.startswith(f"{first['job_id']}_"))
    second_script = next(t for n, t in scripts.items() if n.startswith(f"{second['job_id']}_"))
    assert "#SBATCH --array=0-1%2" in first_script
    # submitit submits a one-task array as a plain job; it still waits for the first array.
    assert f"#SBATCH --dependency=afterany:{first['job_id']}" in second_script
    for i in range(3):
        assert json.loads((out / "tasks" / f"{i:05d}" / "result.json").read_text())["status"] == "completed"
    # Submitting again finds nothing left to do.
    again = _launch("launch_sweep.py", str(sweep), "--site", "local", "--cluster", "slurm", "--out", str(out))
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def test_plain_pretrain_sbatch_retries_a_failed_step_then_marks_the_run_failed(tmp_path):
    """slurm/pretrain.sbatch calls the same failover as the generated jobs: a step that fails (here the data is
    not there yet: FileNotFoundError on both ranks) is requeued once with MAX_FAILURES=1, fails again, and
    state.json then says failed with the cause; the job is not requeued a second time."""
    run = tmp_path / "plain failing run"
    job_id = _plain_pretrain_sbatch(run, {"MAX_FAILURES": "1"}, [
        "model.name=phileo_cnn_tiny", f"data.root={tmp_path / 'not converted yet'}", "train.steps=4"])
    log = (run / "logs" / f"{job_id}.out").read_text()
    assert "(restart 1)" in log and "(restart 2)" not in log, log[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "failed" and state["failures"] == 2, state
    assert [e["event"] for e in state["events"]].count("failure") == 1
    assert "FileNotFoundError" in state["reason"] and "not converted yet" in state["reason"], state["reason"]
    assert state["reason"].startswith("failed 2 time(s) in a row since the last checkpoint (retried 1 times")


def test_plain_pretrain_sbatch_does_not_retry_a_corrupt_chunk(tmp_path):
    """A failure a retry cannot help, through the plain script: 64 bytes flipped in a chunk stop every rank at
    start (BadChunkError); the engine records the failure as final and the script's failover does not requeue."""
    from phileo.data import load_manifest
    from phileo.data.synthetic import make_pretrain_shards

    shards = make_pretrain_shards(tmp_path / "data", n_cells=8, nodes=2)
    manifest = load_manifest(shards)
    chunk = manifest.chunk_path(manifest.chunks[0])
    raw = bytearray(chunk.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    chunk.write_bytes(bytes(raw))
    run = tmp_path / "plain corrupt run"
    job_id = _plain_pretrain_sbatch(run, {"MAX_FAILURES": "3"}, [
        "model.name=phileo_cnn_tiny", f"data.root={shards}", "train.steps=4", "data.batch_size=2",
        "data.num_workers=0"])
    log = (run / "logs" / f"{job_id}.out").read_text()
    assert "(restart 1)" not in log and "is not retried" in log, log[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "failed" and state["final"] and "failure" not in [e["event"] for e in state["events"]]
    assert state["reason"].startswith("BadChunkError") and chunk.name in state["reason"], state["reason"]
