"""`jobs/launch_pretrain.py`: one command from flags to a checked, queued, self-requeueing pretraining job.

    python jobs/launch_pretrain.py --site leonardo --account AIFAC_X --nodes 16 --data $WORK/majortom/shards
    python jobs/launch_pretrain.py --cluster local --gpus-per-node 2 --data shards --steps 50 --wait
    python jobs/launch_pretrain.py --resume $CINECA_SCRATCH/phileo/runs/phileo-pretrain-20250101-120000

The config is built in layers: the engine's defaults, the site's data-loader workers, the `--recipe` preset
(phileo.train.recipes; `published` reproduces the published code's hyperparameters), `--config FILE.yaml`,
the flags (`--model` -> model.name, `--data` -> data.root, `--batch-size` -> data.batch_size (per process),
`--steps` -> train.steps, `--strategy` -> train.strategy, `--seed` -> train.seed, `--run-dir` -> run.dir), then
`key=value` overrides. With `--resume RUN_DIR` the first four layers are the run's own config.yaml.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


from phileo import exit_codes
from phileo.config import ConfigError, save_config, to_dict
from phileo.launch import cli
from phileo.launch.jobs import TrainingJob
from phileo.launch.preflight import PreflightReport, check_model, preflight
from phileo.launch.resources import job_cost
from phileo.run_state import read_state, record_job_id, record_pending
from phileo.launch.submit import (make_plan, prepare_run_dir, rank_log_cause, read_launch_record, read_task_result,
                                  resolve_cluster, check_local_request, submit, update_launch_record, wait_for)

# Launcher flag -> config key (the engine's PretrainConfig).
FLAG_KEYS = {
    "model": "model.name",
    "data": "data.root",
    "batch_size": "data.batch_size",
    "steps": "train.steps",
    "strategy": "train.strategy",
    "seed": "train.seed",
}
CONFIG_FILE = "config.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit PhilEO pretraining as a multi-node SLURM job (or local processes), checked against "
                    "the site's limits first, requeueing itself at the walltime limit.",
        epilog="Any other config key: key=value (e.g. optim.lr=3e-4 checkpoint.every_steps=500).")
    cli.add_site_args(p)
    cli.add_resource_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--model", default=None, help="model name (model.name), e.g. phileo_cnn_44m")
    g.add_argument("--strategy", choices=["ddp", "zero1", "zero2", "zero3"], default=None, help="train.strategy")
    g.add_argument("--data", default=None, help="folder with the shard manifest (data.root)")
    g.add_argument("--run-dir", default=None, help="run folder (default: <site run_root>/<job name>-<time>)")
    g.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size per process (data.batch_size)")
    g.add_argument("--seed", type=int, default=None, help="train.seed")
    g.add_argument("--config", default=None, help="base config YAML (below the flags and overrides)")
    cli.add_recipe_arg(g)
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an existing run: its config and resources, flags and overrides on top")
    cli.add_run_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any other config key")
    return p


def _config_class():
    from phileo.train.config import PretrainConfig

    return PretrainConfig


def build_config(args: argparse.Namespace, run_dir: Path, num_workers: Optional[int],
                 base_file: Optional[Path]) -> Any:
    """The PretrainConfig for this launch (layers as in the module docstring); validated. One builder for
    every job config (phileo.train.config.build_config); this only says what the launcher's layers are."""
    from phileo.train.config import build_config as build_job_config

    site = {"data": {"num_workers": num_workers}} if num_workers is not None and base_file is None else None
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if "data.root" in flags:
        flags["data.root"] = str(Path(flags["data.root"]).expanduser().absolute())
    flags["run.dir"] = str(run_dir)
    return build_job_config(_config_class(), base_file, list(args.overrides), base=site, flags=flags,
                            recipe=args.recipe)


def list_chunks(data_root: Path) -> list[tuple[Path, int]]:
    """(file, recorded bytes) of every chunk in the shard manifest under `data_root` (phileo.data.load_manifest
    reads and checks it); preflight stats each file against its size."""
    from phileo.data import load_manifest

    manifest = load_manifest(data_root)
    return [(manifest.chunk_path(c), c.bytes) for c in manifest.chunks]


def is_run_dir(p: Path) -> bool:
    """Whether a folder already holds a run (a config, checkpoints or a launch record)."""
    return any((p / name).exists() for name in (CONFIG_FILE, "checkpoints", "launch.json", "DONE"))


def default_run_dir(site, job_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return site.resolve_run_root() / f"{job_name}-{stamp}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses flags, builds and checks the job, submits it (or prints it with --dry-run). Returns the exit code
    (phileo.exit_codes): 0 submitted (or, with --wait, completed), 1 the job failed, 2 refused (nothing
    submitted), 75 (with --wait) it stopped with a checkpoint after its last allowed requeue.
    """
    args = build_parser().parse_args(argv)
    try:
        return _launch(args)
    except ConfigError as e:
        return cli.refuse(str(e))


def _launch(args: argparse.Namespace) -> int:
    saved: dict[str, Any] = {}
    base_file = Path(args.config) if args.config else None
    if args.resume:
        run_dir = Path(args.resume).expanduser().absolute()
        if not (run_dir / CONFIG_FILE).is_file():
            return cli.refuse(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not a run folder "
                              f"(a run's folder holds config.yaml, checkpoints/ and logs/)")
        if args.run_dir and Path(args.run_dir).absolute() != run_dir:
            return cli.refuse("--resume and --run-dir name different folders; give only --resume")
        if base_file is not None:
            return cli.refuse("--resume continues the run's own config.yaml; change keys with key=value instead "
                              "of --config")
        record = read_launch_record(run_dir)
        saved = record.get("resources", {})
        base_file = run_dir / CONFIG_FILE
        saved_site = record.get("site_path")
        args.site = args.site or (saved_site if saved_site and Path(saved_site).is_file() else record.get("site"))
        if args.cluster == "auto" and record.get("cluster"):
            args.cluster = record["cluster"]
    site = cli.pick_site(args.site, args.cluster)
    res = cli.resources_from_args(site, args, saved, default_job_name="phileo-pretrain")
    cluster = resolve_cluster(args.cluster, site, res.nodes, args.dry_run)
    opts = cli.submit_options(args)
    if not args.resume:
        run_dir = (Path(args.run_dir).expanduser().absolute() if args.run_dir
                   else default_run_dir(site, res.job_name))
    if args.data is None and site.data_root and not args.resume:
        args.data = site.data_root
    cfg = build_config(args, run_dir, site.defaults.workers_for(res.cpus_per_task), base_file)
    data_root = Path(cfg.data.root) if getattr(cfg.data, "root", None) else None

    report: PreflightReport = preflight(site, res, run_dir=run_dir, fresh_run=not args.resume,
                                        is_run=is_run_dir, data_root=data_root, list_chunks=list_chunks,
                                        live=cluster == "slurm", after=opts.after)
    report.problems[:0] = check_model(cfg.model.name, cfg.model.overrides)
    if cluster == "local":
        report.problems += check_local_request(res, opts.any)
    plan = make_plan(cluster, site, res, run_dir / "logs", dependency=opts.dependency, extra_sbatch=opts.sbatch)

    if args.dry_run:
        return cli.print_job_dry_run(plan, cluster, site, cfg, run_dir / CONFIG_FILE, report)
    if (refused := cli.refused_by_preflight(report)) is not None:
        return refused

    prepare_run_dir(run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    record_pending(run_dir, cfg.train.steps)
    job = submit(plan, TrainingJob("pretrain", {"config": to_dict(cfg)}, max_requeues=res.max_requeues,
                                   max_failures=getattr(args, "max_failures", 3)))
    update_launch_record(run_dir, site=site.name, site_path=site.path, cluster=cluster,
                         resources=res.to_dict(), argv=list(sys.argv), job_ids=[job.job_id])
    record_job_id(run_dir, job.job_id)
    print(f"submitted {cluster} job {job.job_id} ({job_cost(site, res).describe()} at most)")
    print(f"run folder:  {run_dir}")
    print(f"job logs:    {run_dir / 'logs'}")
    print(f"TensorBoard: {cli.tensorboard_line(run_dir)}")
    if not args.wait:
        return cli.EXIT_OK
    return wait_and_report(job, run_dir, args.wait_timeout_s)


def _readable(value: Any) -> str:
    """Floats (the final loss: the mean of the last log window) to 4 significant figures."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def wait_and_report(job: Any, run_dir: Path, timeout_s: Optional[float] = None) -> int:
    """Blocks until the job (requeues included) has ended; prints and returns its exit status (the job's final
    status through phileo.exit_codes.for_status; FAILED when it left no result)."""
    from phileo.launch.status import ProgressPrinter

    print(f"waiting for job {job.job_id} (requeues included); progress every logged step:", flush=True)
    progress = ProgressPrinter(run_dir)
    try:
        wait_for([job], timeout_s=timeout_s, poll_s=2.0, on_poll=progress.poll)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_JOB_FAILED
    finally:
        progress.close()
    outcome = read_task_result(job, 0)
    if outcome is None:
        # The failover's verdict when it gave up (state.json), else what this job's own rank logs say.
        try:
            state = read_state(run_dir) or {}
        except ValueError:
            state = {}
        cause = state.get("reason") if state.get("state") == "failed" else None
        cause = cause or rank_log_cause(run_dir / "logs", job_id=str(job.job_id))
        print(f"job {job.job_id} ended without a result from rank 0: "
              f"{cause or 'killed, out of memory, or cancelled (nothing telling in the rank logs)'}; "
              f"see {run_dir / 'logs'}", file=sys.stderr)
        return cli.EXIT_JOB_FAILED
    state, value = outcome
    if state != "success":
        print(f"job {job.job_id} failed on rank 0:\n{value}", file=sys.stderr)
        return cli.EXIT_JOB_FAILED
    status = getattr(value, "status", None)
    # Pretraining returns a TrainResult (step, final_loss); fine-tuning a FinetuneResult whose `train` holds one.
    train = value if hasattr(value, "step") else getattr(value, "train", None)
    details = "".join(f" {k}={_readable(getattr(train, k))}" for k in ("step", "final_loss") if hasattr(train, k))
    message = getattr(value, "message", "")
    print(f"job {job.job_id} ended: status={status}{details}" + (f" ({message})" if message else ""))
    return exit_codes.for_status(status)
