"""`jobs/launch_finetune.py` (one fine-tuning run) and `jobs/launch_sweep.py SWEEP.yaml` (a sweep as a job array).

    python jobs/launch_finetune.py --site leonardo --account P --model phileo_cnn_44m --task roads --n-shot 100 \
        --data $WORK/phileo_bench --init $WORK/weights/phileo_cnn_44m.pt
    python jobs/launch_sweep.py slurm/sweeps/phileo_bench.yaml --site leonardo --account P --out SWEEP_DIR

A sweep goes in as ONE job array (`--array=0-(N-1)%K`) of `TrainingJob("sweep_task", ...)`s, each carrying its
index in the expanded grid, so a resubmission of only the unfinished tasks, or a sweep split into several arrays
because it is larger than the site's MaxArraySize, still runs the right tasks. Split arrays run one after the other
(`afterany`), so at most K tasks run at once overall. Both requeue themselves at the time limit like pretraining.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


from phileo import exit_codes
from phileo.config import ConfigError, save_config, to_dict
from phileo.launch import cli
from phileo.launch.arrays import site_max_array_size, split_for_arrays
from phileo.launch.jobs import TrainingJob
from phileo.launch.preflight import (PreflightReport, absent_here, check_limits, check_model, cost_note,
                                     live_checks, not_here_note, preflight, run_dir_report)
from phileo.launch.pretrain import wait_and_report
from phileo.launch.resources import job_cost
from phileo.launch.status import SweepProgress
from phileo.run_state import record_job_id, record_pending
from phileo.launch.submit import (base_job_id, check_local_request, make_plan, prepare_run_dir, read_task_result,
                                  resolve_cluster, submit, submit_array, update_launch_record, wait_for)
from phileo.ranges import format_ranges as _ranges

FINETUNE_FLAG_KEYS = {
    "model": "model.name",
    "init": "model.init",
    "task": "data.task",
    "n_shot": "data.n_shot",
    "nshot_index": "data.nshot_index",
    "data": "data.root",
    "batch_size": "data.batch_size",
    "seed": "train.seed",
    "lr": "optim.lr",
}


def _finetune_config_class():
    from phileo.bench.config import FinetuneConfig

    return FinetuneConfig


# ------------------------------------------------------------------------------------------ one fine-tuning run
def build_finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Submit one PhilEO Bench fine-tuning run (requeues itself at the "
                                            "time limit).",
                                epilog="Any other config key: key=value (e.g. train.max_epochs=50).")
    cli.add_site_args(p)
    cli.add_resource_args(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--model", default=None, help="model.name, e.g. phileo_cnn_44m")
    g.add_argument("--init", default=None, help="model.init: scratch, a checkpoint file or a pretraining run folder")
    g.add_argument("--task", default=None, help="data.task: roads, building or lc")
    g.add_argument("--n-shot", type=int, default=None, help="data.n_shot")
    g.add_argument("--data", default=None, help="data.root: the PhilEO Bench folder")
    g.add_argument("--nshot-index", default=None,
                   help="data.nshot_index: a published selection (phileo-bench/indices/*.json, or their folder) "
                        "instead of drawing one")
    g.add_argument("--batch-size", type=int, default=None, help="data.batch_size (per process)")
    g.add_argument("--lr", type=float, default=None, help="optim.lr")
    g.add_argument("--seed", type=int, default=None, help="train.seed")
    g.add_argument("--run-dir", default=None, help="run folder (default: <site run_root>/<job name>-<time>)")
    g.add_argument("--config", default=None, help="base config YAML (below the flags and overrides)")
    cli.add_recipe_arg(g)
    cli.add_run_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def build_finetune_config(args: argparse.Namespace, run_dir: Path) -> Any:
    """The FinetuneConfig of this launch: defaults, --config, the flags, then key=value (the one builder)."""
    from phileo.train.config import build_config

    flags = {k: getattr(args, f) for f, k in FINETUNE_FLAG_KEYS.items() if getattr(args, f) is not None}
    if "data.root" in flags:
        flags["data.root"] = str(Path(flags["data.root"]).expanduser().absolute())
    flags["run.dir"] = str(run_dir)
    return build_config(_finetune_config_class(), args.config or None, list(args.overrides), flags=flags,
                        recipe=args.recipe)


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code (phileo.exit_codes): 0 submitted (with --wait: completed), 1 failed, 2 refused, 75 (with
    --wait) stopped with a checkpoint after its last allowed requeue."""
    args = build_finetune_parser().parse_args(argv)
    try:
        site = cli.pick_site(args.site, args.cluster)
        if args.gpus_per_node is None:
            args.gpus_per_node = 1  # one fine-tuning run needs one GPU
        res = cli.resources_from_args(site, args, default_job_name="phileo-finetune")
        cluster = resolve_cluster(args.cluster, site, res.nodes, args.dry_run)
        opts = cli.submit_options(args)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(args.run_dir).expanduser().absolute() if args.run_dir
                   else site.resolve_run_root() / f"{res.job_name}-{stamp}")
        cfg = build_finetune_config(args, run_dir)
    except ConfigError as e:
        return cli.refuse(str(e))
    report = preflight(site, res, run_dir=run_dir, fresh_run=False, live=cluster == "slurm", after=opts.after)
    report.add(*check_finetune_inputs(site, [(cfg.model.name, cfg.model.init, cfg.data.root, cfg.data.task)],
                                      flags=True))
    if cluster == "local":
        report.problems += check_local_request(res, opts.any)
    plan = make_plan(cluster, site, res, run_dir / "logs", dependency=opts.dependency, extra_sbatch=opts.sbatch)
    if args.dry_run:
        return cli.print_job_dry_run(plan, cluster, site, cfg, run_dir / "config.yaml", report)
    if (refused := cli.refused_by_preflight(report)) is not None:
        return refused
    prepare_run_dir(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    record_pending(run_dir)
    job = submit(plan, TrainingJob("finetune", {"config": to_dict(cfg)}, max_requeues=res.max_requeues,
                                   max_failures=getattr(args, "max_failures", 3)))
    update_launch_record(run_dir, kind="finetune", site=site.name, cluster=cluster, resources=res.to_dict(),
                         argv=list(sys.argv), job_ids=[job.job_id])
    record_job_id(run_dir, job.job_id)
    print(f"submitted {cluster} job {job.job_id} ({job_cost(site, res).describe()} at most)")
    print(f"run folder:  {run_dir}")
    print(f"TensorBoard: {cli.tensorboard_line(run_dir)}")
    return wait_and_report(job, run_dir, args.wait_timeout_s) if args.wait else cli.EXIT_OK


def check_finetune_inputs(site: Any, runs: Iterable[tuple[str, str, str, str]],
                          flags: bool = False) -> tuple[list[str], list[str]]:
    """What a fine-tuning run reads, checked from here: the model name against the registry, model.init exists
    (a weights file, a checkpoint, or a pretraining run folder with a complete checkpoint; 'scratch' reads
    nothing), and data.root holds PhilEO Bench training files for the task. `runs` are (model.name, model.init,
    data.root, data.task); each distinct value is checked once. Returns (problems, notes): one line per problem;
    off the cluster, a path on a file system this machine does not have is a note (not checked)."""
    from phileo.bench.data import BenchDataError, scan_bench_files
    from phileo.bench.finetune import resolve_init

    flag = {"model": "--model", "init": "--init", "data": "--data"} if flags else \
        {"model": "model.name", "init": "model.init", "data": "data.root"}
    problems: list[str] = []
    notes: list[str] = []
    seen: set[tuple[str, str]] = set()
    for model, init, root, task in runs:
        for kind, value in (("model", model), ("init", init), ("data", (root, task))):
            if (kind, repr(value)) in seen:
                continue
            seen.add((kind, repr(value)))
            path = init if kind == "init" else root if kind == "data" else None
            if top := absent_here(path, site):
                notes.append(not_here_note(flag[kind], path, top))
            elif kind == "model":
                problems += check_model(model, flag=flag["model"])
            elif kind == "init":
                try:
                    resolve_init(init)
                except FileNotFoundError as e:
                    problems.append(str(e).replace(f"model.init={init}", f"{flag['init']} {init}", 1))
            elif not root:
                problems.append(f"no {flag['data']} given: pass the PhilEO Bench folder (the *_s2.npy files)")
            else:
                try:
                    scan = scan_bench_files(root, task, "train")
                except BenchDataError as e:
                    problems.append(f"{flag['data']} {root}: {e}")
                    continue
                if not scan.files:
                    problems.append(f"{flag['data']} {root} holds no *_train_s2.npy file with a {task} label: "
                                    f"point it at the PhilEO Bench folder (python -m phileo.bench.data scan "
                                    f"{root} lists what is there)")
    return problems, notes


# --------------------------------------------------------------------------------------------------- sweeps
def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Submit a fine-tuning sweep (SWEEP.yaml) as one SLURM job array, "
                                            "split only where the site's MaxArraySize demands it.")
    p.add_argument("sweep", help="sweep file (see phileo.bench.sweep), e.g. slurm/sweeps/phileo_bench.yaml")
    cli.add_site_args(p)
    cli.add_resource_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--out", default=None, help="sweep folder (default: <site run_root>/sweeps/<sweep name>)")
    g.add_argument("--parallel", type=int, default=None,
                   help="at most this many tasks at once, the %%K of --array (default: the sweep's max_parallel)")
    g.add_argument("--indices", default=None,
                   help="only these task indices, e.g. '17' or '0-9,17' (re-run a failed task alone)")
    g.add_argument("--all", action="store_true", help="also submit tasks that already finished (they exit at once)")
    g.add_argument("--max-array-size", type=int, default=None, help="override the site's MaxArraySize")
    g.add_argument("--sbatch-args", action="store_true",
                   help="print the sbatch options that submit this sweep through slurm/finetune_array.sh instead "
                        "(sbatch $(... --sbatch-args) slurm/finetune_array.sh): the same walltime, signal and "
                        "sweep folder as this launcher's own array")
    cli.add_run_args(p)
    return p


def parse_indices(text: str) -> list[int]:
    """'0-9,17' -> [0..9, 17]. Refuses anything else."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"--indices {text!r}: use numbers and ranges such as 0-9,17")
        out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return sorted(set(out))


def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code (phileo.exit_codes): 0 submitted (with --wait: every task finished), 1 some task failed,
    2 refused, 75 (with --wait) none failed but some stopped with a checkpoint after their last requeue."""
    args = build_sweep_parser().parse_args(argv)
    try:
        return _launch_sweep(args)
    except ConfigError as e:
        return cli.refuse(str(e))


def _launch_sweep(args: argparse.Namespace) -> int:
    from phileo.bench.sweep import (SweepError, active_tasks, expand_sweep, load_sweep, record_array,
                                    task_finished)

    sweep_path = Path(args.sweep).absolute()
    try:
        sweep = load_sweep(sweep_path)
        specs = expand_sweep(sweep_path)
    except SweepError as e:
        return cli.refuse(str(e))
    site = cli.pick_site(args.site, args.cluster)
    if args.gpus_per_node is None:
        args.gpus_per_node = 1  # one fine-tuning run per array task, on one GPU
    if args.time is None:
        args.time = sweep.time_per_task  # sized for one fine-tune (the sweep file), not the site's maximum
    res = cli.resources_from_args(site, args, default_job_name=f"sweep-{sweep.name}")
    # --sbatch-args only prints, like a dry run: no SLURM needed on this machine.
    cluster = resolve_cluster(args.cluster, site, res.nodes, args.dry_run or args.sbatch_args)
    opts = cli.submit_options(args)
    out = Path(args.out).expanduser().absolute() if args.out else site.resolve_run_root() / "sweeps" / sweep.name
    indices = parse_indices(args.indices) if args.indices else [s.index for s in specs]
    outside = [i for i in indices if i >= len(specs)]
    if outside:
        return cli.refuse(f"--indices {outside} are outside the sweep's {len(specs)} tasks (0-{len(specs) - 1})")
    finished = [i for i in indices if task_finished(out, i)]
    if not args.all:
        indices = [i for i in indices if i not in finished]
    # Never a second writer: tasks SLURM still runs or queues are left alone, --all or not.
    busy = sorted(set(indices) & (active_tasks(out) or set())) if cluster == "slurm" else []
    indices = [i for i in indices if i not in busy]
    if busy:
        print(f"skipping tasks {_ranges(busy)}: running or pending in SLURM (see phileo-status {out})")
    if not indices:
        print(f"every selected task of {sweep_path.name} has finished in {out} or is running or pending; nothing "
              f"to submit" + ("" if args.all else " (--all to run finished ones again)"))
        return cli.EXIT_OK
    parallel = args.parallel or sweep.max_parallel or len(indices)
    if args.sbatch_args:
        print(" ".join(finetune_array_args(site, res, sweep_path, out, indices, parallel)))
        return cli.EXIT_OK
    max_array = args.max_array_size or site_max_array_size(site, ask_slurm=cluster == "slurm")
    groups = split_for_arrays(indices, max_array)

    report = PreflightReport()
    report.problems += check_limits(site, res)
    report.add(*run_dir_report(site, out, fresh=False, flag="--out"))
    report.add(*check_sweep_inputs(site, sweep_path, [s for s in specs if s.index in set(indices)]))
    if cluster == "local":
        report.problems += check_local_request(res, opts.any)
    else:
        report.add(*live_checks(site, res, opts.after))
    report.notes.append(f"{len(indices)} task(s) of {len(specs)} ({len(finished)} already finished"
                        f"{', skipped' if not args.all else ''}) as {len(groups)} array(s) of at most {max_array} "
                        f"(MaxArraySize), at most {parallel} at once")
    report.notes.append(f"each task {cost_note(site, res)}; the sweep {cost_note(site, res, len(indices))}")
    logs = out / "logs"
    if args.dry_run:
        plan = make_plan(cluster, site, res, logs, array_parallelism=parallel, dependency=opts.dependency,
                         extra_sbatch=opts.sbatch)
        for k, group in enumerate(groups):
            print(f"# ---- array {k + 1}/{len(groups)}: sweep tasks {_ranges(group)} ----")
            if k == 0:
                print(plan.script(map_count=len(group) if cluster == "slurm" else None), end="")
            else:
                print(f"# (the same script with --array=0-{len(group) - 1}%{min(parallel, len(group))} and "
                      f"--dependency=afterany:<array {k}>)")
        return cli.finish_dry_run(report)
    if (refused := cli.refused_by_preflight(report)) is not None:
        return refused

    out.mkdir(parents=True, exist_ok=True)
    all_jobs: list[Any] = []
    array_ids: list[str] = []
    previous: Optional[str] = None
    for group in groups:
        # The first array waits for --after/--dependency; each later one for the array before it.
        plan = make_plan(cluster, site, res, logs, array_parallelism=parallel,
                         dependency=f"afterany:{previous}" if previous else opts.dependency,
                         extra_sbatch=opts.sbatch)
        fns = [TrainingJob("sweep_task", {"sweep_path": str(sweep_path), "index": i, "out_dir": str(out)},
                           max_requeues=res.max_requeues) for i in group]
        if cluster == "local":
            jobs = _run_local_batches(plan, fns, parallel, args.wait_timeout_s, SweepProgress(out))
        else:
            jobs = submit_array(plan, fns)
        array_id = base_job_id(jobs[0].job_id)
        if cluster == "slurm":  # status and re-submission map array index k -> sweep task group[k] through it
            record_array(out, array_id, "launch_sweep", group, sweep_path, site.name)
        array_ids.append(array_id)
        previous = array_id
        all_jobs += jobs
    update_launch_record(out, kind="sweep", sweep=str(sweep_path), site=site.name, cluster=cluster,
                         resources=res.to_dict(), argv=list(sys.argv), job_ids=array_ids,
                         arrays=[{"job_id": a, "tasks": g} for a, g in zip(array_ids, groups)])
    print(f"submitted {len(indices)} sweep task(s) as {cluster} array job(s) {', '.join(array_ids)}")
    print(f"sweep folder: {out}  (task i in {out}/tasks/<i, 5 digits>; logs in {logs})")
    print(f"results:      python jobs/collect_results.py {out}")
    if not (args.wait or cluster == "local"):
        return cli.EXIT_OK
    return _sweep_report(all_jobs, [i for g in groups for i in g], args.wait_timeout_s, SweepProgress(out))


def finetune_array_args(site: Any, res: Any, sweep_path: Path, out: Path, indices: Sequence[int],
                        parallel: int) -> list[str]:
    """The sbatch options for slurm/finetune_array.sh that match this launcher's array: walltime (the sweep
    file's time_per_task unless --time), the pre-timeout signal (the site's signal_delay_s), partition,
    account, QOS, GPUs and the sweep folder (<site run_root>/sweeps/<name> unless --out). One source for both
    paths; shell-quoted."""
    import shlex

    from phileo.bench.sweep import format_array_spec
    from phileo.launch.sites import format_minutes

    opts = [f"--array={format_array_spec(indices, parallel)}", f"--time={format_minutes(res.time_min)}",
            f"--signal=USR2@{res.signal_delay_s}", f"--job-name={res.job_name}"]
    opts += [f"--{k}={v}" for k, v in (("partition", res.partition), ("account", res.account), ("qos", res.qos))
             if v]
    if res.gpus_per_node:
        opts.append(f"--gres=gpu:{res.gpus_per_node}")
    opts.append(f"--cpus-per-task={res.cpus_per_task}")
    opts.append(f"--export=ALL,PHILEO_SWEEP={sweep_path},PHILEO_SWEEP_DIR={out},PHILEO_SITE={site.path or site.name},"
                f"PHILEO_MAX_REQUEUES={res.max_requeues}")
    return [shlex.quote(o) for o in opts]


_SWEEP_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")  # what phileo.bench.sweep.expand_env expands on the node


def check_sweep_inputs(site: Any, sweep_path: Path, specs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Every ${VAR} the tasks use is set in this shell (the array tasks inherit its environment), then, with
    them expanded, every task's model, init weights and data as `check_finetune_inputs` checks one run.
    Returns (problems, notes)."""
    from phileo.bench.sweep import build_task_config

    used: dict[str, set[str]] = {}
    for spec in specs:
        for key, value in spec.overrides.items():
            for text in (value if isinstance(value, list) else [value]):
                for a, b in _SWEEP_VAR.findall(text) if isinstance(text, str) else []:
                    used.setdefault(a or b, set()).add(key)
    unset = sorted(v for v in used if v not in os.environ)
    if unset:
        keys = sorted({k for v in unset for k in used[v]})
        return [f"sweep {sweep_path.name} uses {', '.join('${' + v + '}' for v in unset)} (in {', '.join(keys)}), "
                f"not set in this shell: export {' '.join(v + '=...' for v in unset)} before submitting (the "
                f"tasks inherit this shell's environment)"], []
    runs = []
    for spec in specs:
        cfg = build_task_config(spec, sweep_path.parent)  # what the task will run, ${VAR}s expanded as there
        runs.append((cfg.model.name, cfg.model.init, cfg.data.root, cfg.data.task))
    problems, notes = check_finetune_inputs(site, runs)
    return [f"sweep {sweep_path.name}: {p}" for p in problems], notes


def _run_local_batches(plan: Any, fns: list[Any], parallel: int, timeout_s: Optional[float],
                       progress: Any = None) -> list[Any]:
    """Local stand-in for an array: `parallel` task groups at a time; progress.poll() while they run."""
    jobs: list[Any] = []
    for k in range(0, len(fns), parallel):
        batch = [submit(plan, f) for f in fns[k:k + parallel]]
        wait_for(batch, timeout_s=timeout_s, poll_s=1.0, on_poll=progress.poll if progress else None)
        jobs += batch
    return jobs


def _sweep_report(jobs: list[Any], indices: list[int], timeout_s: Optional[float], progress: Any = None) -> int:
    try:
        wait_for(jobs, timeout_s=timeout_s, on_poll=progress.poll if progress else None)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_JOB_FAILED
    counts: dict[str, int] = {}
    failed: list[int] = []
    statuses: list[str] = []
    for job, index in zip(jobs, indices):
        outcome = read_task_result(job)
        status = (getattr(outcome[1], "status", "?") if outcome and outcome[0] == "success" else "failed")
        counts[status] = counts.get(status, 0) + 1
        statuses.append(status)
        if status not in ("completed", "skipped"):
            failed.append(index)
    print("sweep tasks: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if failed:
        print(f"not finished: tasks {_ranges(failed)}; re-run them alone with --indices {_ranges(failed)} "
              f"(failed.json in each task folder has the traceback)", file=sys.stderr)
    return exit_codes.for_statuses(statuses)
