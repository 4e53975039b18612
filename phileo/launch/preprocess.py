"""`jobs/launch_preprocess.py`: the MajorTOM -> HDF5 converter as three chained jobs.

    plan   (1 task)          preprocess/majortom_to_h5.py --plan-only      list and chunk the cells once
    array  (--tasks N)       ... --task-index i --num-tasks N               each task converts a disjoint slice
    merge  (1 task, afterok) ... --merge                                    part manifests -> OUT/manifest.json

On SLURM the three are queued at once, each waiting for the previous one to succeed (`--dependency=afterok`,
`--kill-on-invalid-dep=yes` so a failed stage cancels the rest instead of leaving them pending forever); the
merge job's id is printed so that pretraining can wait for it (`launch_pretrain.py --after <id>`). The jobs go
to the site's CPU partition (`cpu_jobs` in the profile: Leonardo's DCGP nodes), whole nodes, with about 2/3 of
the cores as converter workers (each worker decodes on one thread while writing on another). With
`--cluster local` the same commands run as local processes, stage after stage, at most `--parallel` at a time.
Flags the launcher does not know are passed to the converter (e.g. `--cells-per-chunk 2 --limit 100`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from phileo.config import ConfigError
from phileo.launch import cli
from phileo.launch.arrays import site_max_array_size
from phileo.launch.jobs import TrainingJob
from phileo.launch.preflight import (PreflightReport, absent_here, check_limits, cost_note, live_checks,
                                     not_here_note, run_dir_report)
from phileo.launch.slurm import have_sbatch
from phileo.launch.submit import (base_job_id, check_local_request, make_plan, read_task_result, resolve_cluster,
                                  submit, submit_array, update_launch_record, wait_for)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERTER = REPO_ROOT / "preprocess" / "majortom_to_h5.py"


def command_job(argv: Sequence[str]) -> TrainingJob:
    """One converter stage as a job (kind preprocess_task: a command line, never requeued)."""
    return TrainingJob("preprocess_task", {"argv": [str(a) for a in argv]}, max_requeues=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert MajorTOM into HDF5 chunks + manifest as a SLURM job array and a dependent merge "
                    "job (or the same locally). Unknown flags go to preprocess/majortom_to_h5.py.")
    cli.add_site_args(p)
    cli.add_resource_args(p, gpus=False)
    g = p.add_argument_group("conversion")
    g.add_argument("--source", required=True, help="MajorTOM folder (Core-S2L2A parquet shards or unpacked tree)")
    g.add_argument("--out", required=True, help="output folder: chunks/, manifest.json (and logs/)")
    g.add_argument("--tasks", type=int, default=4, help="array tasks, each converting a disjoint slice")
    g.add_argument("--parallel", type=int, default=None, help="at most this many tasks at once (the %%K)")
    g.add_argument("--train-nodes", type=int, default=1,
                   help="training nodes the manifest's chunk assignment is made for (converter --nodes)")
    g.add_argument("--workers", type=int, default=None,
                   help="converter worker processes per task (default: about 2/3 of the task's cores)")
    g.add_argument("--log-dir", default=None, help="job scripts and logs (default: OUT/logs)")
    g.add_argument("--aux-buildings", default=None, metavar="RASTER",
                   help="global building-percent raster for the buildings pretraining target (converter flag)")
    g.add_argument("--aux-landcover", default=None, metavar="RASTER",
                   help="global ESA WorldCover raster for the land-cover pretraining target (converter flag)")
    cli.add_run_args(p)
    return p


def converter_argv(args: argparse.Namespace, extra: Sequence[str], python: str = sys.executable) -> dict[str, Any]:
    """The converter command lines of the three stages: {"plan": argv, "tasks": [argv ...], "merge": argv}."""
    src, out = str(Path(args.source).absolute()), str(Path(args.out).absolute())
    aux = [a for flag, path in (("--aux-buildings", getattr(args, "aux_buildings", None)),
                                ("--aux-landcover", getattr(args, "aux_landcover", None))) if path
           for a in (flag, str(Path(path).absolute()))]  # absolute: the tasks run elsewhere
    base = [python, str(CONVERTER), "--source", src, "--out", out, "--nodes", str(args.train_nodes),
            "--no-progress", *aux, *extra]
    return {
        "plan": base + ["--plan-only"],
        "tasks": [base + ["--task-index", str(i), "--num-tasks", str(args.tasks), "--workers",
                          str(args.workers)] for i in range(args.tasks)],
        "merge": [python, str(CONVERTER), "--out", out, "--nodes", str(args.train_nodes), "--merge"],
    }


def default_workers(cores: int) -> int:
    """Converter workers for a task with `cores` cores: about 2/3 of them (README, "Convert"), since each worker
    decodes on one thread while its writes go on another."""
    return max(1, cores * 2 // 3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns 0 when submitted (or, waiting / locally, when the manifest was merged), 1 when a stage failed,
    2 when refused before anything was submitted."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        return _launch(args, extra)
    except ConfigError as e:
        return cli.refuse(str(e))


def _launch(args: argparse.Namespace, extra: list[str]) -> int:
    site = cli.pick_site(args.site, args.cluster)
    # CPU-only work: the site's CPU partition, unless --partition names the GPU one on purpose.
    if args.partition is None or args.partition != site.partition:
        site = site.for_cpu_jobs()
    if args.tasks < 1:
        return cli.refuse(f"--tasks must be >= 1, got {args.tasks}")
    res = cli.resources_from_args(site, args, default_job_name="phileo-preprocess", tasks_per_node=1,
                                  gpus_per_node=0, nodes=1)
    cluster = resolve_cluster(args.cluster, site, res.nodes, args.dry_run)
    opts = cli.submit_options(args)
    if args.workers is None:
        args.workers = default_workers(res.cpus_per_task)
    out = Path(args.out).absolute()
    log_dir = Path(args.log_dir).absolute() if args.log_dir else out / "logs"
    report = PreflightReport()
    report.problems += check_limits(site, res)
    report.add(*run_dir_report(site, out, fresh=False, flag="--out"))
    if args.log_dir:
        report.add(*run_dir_report(site, log_dir, fresh=False, flag="--log-dir"))
    if args.workers < 1 or args.workers > res.cpus_per_task:
        report.problems.append(f"--workers {args.workers} for {res.cpus_per_task} core(s) per task: use 1 to "
                               f"{res.cpus_per_task} (default {default_workers(res.cpus_per_task)}, about 2/3)")
    if top := absent_here(args.source, site):
        report.notes.append(not_here_note("--source", args.source, top))
    elif not Path(args.source).exists():
        report.problems.append(f"--source {args.source} does not exist (it must be on a file system the compute "
                               f"nodes see)")
    if not CONVERTER.is_file():
        report.problems.append(f"the converter {CONVERTER} is missing from this checkout")
    max_array = site_max_array_size(site, ask_slurm=cluster == "slurm" and have_sbatch())
    if args.tasks > max_array:
        report.problems.append(f"--tasks {args.tasks} is more than this site's MaxArraySize ({max_array}); use "
                               f"--tasks {max_array} or fewer (each task then converts more chunks)")
    if cluster == "slurm":
        report.add(*live_checks(site, res, opts.after))
    else:
        report.problems += check_local_request(res, opts.any)
    report.notes.append(f"{res.partition or 'default partition'}: {args.tasks} array task(s) of {res.cpus_per_task} "
                        f"core(s), {args.workers} converter worker(s) each")
    report.notes.append(f"the array {cost_note(site, res, args.tasks)}; with the plan and merge jobs (same time "
                        f"limit, usually minutes) {cost_note(site, res, args.tasks + 2)}")
    parallel = args.parallel or args.tasks
    cmds = converter_argv(args, extra)

    plans = {
        "plan": make_plan(cluster, site, res, log_dir / "plan", requeue=False, dependency=opts.dependency,
                          extra_sbatch=opts.sbatch),
        "array": make_plan(cluster, site, res, log_dir / "array", requeue=False, array_parallelism=parallel,
                           dependency="afterok:<plan job>", extra_sbatch=opts.sbatch),
        "merge": make_plan(cluster, site, res, log_dir / "merge", requeue=False,
                           dependency="afterok:<array job>", extra_sbatch=opts.sbatch),
    }
    if args.dry_run:
        for stage, plan in plans.items():
            print(f"# ---- {stage} job ({cluster}, site {site.name}) ----")
            print(plan.script(map_count=args.tasks if stage == "array" and cluster == "slurm" else None), end="")
        print("# ---- commands ----")
        print("plan:   " + " ".join(cmds["plan"]))
        for i, c in enumerate(cmds["tasks"]):
            print(f"task {i}: " + " ".join(c))
        print("merge:  " + " ".join(cmds["merge"]))
        return cli.finish_dry_run(report)
    if (refused := cli.refused_by_preflight(report)) is not None:
        return refused

    log_dir.mkdir(parents=True, exist_ok=True)
    if cluster == "local":
        return _run_local(plans, cmds, parallel, log_dir, args.wait_timeout_s)

    plan_job = submit(plans["plan"], command_job(cmds["plan"]))
    array_plan = make_plan(cluster, site, res, log_dir / "array", requeue=False, array_parallelism=parallel,
                           dependency=f"afterok:{plan_job.job_id}", extra_sbatch=opts.sbatch)
    array_jobs = submit_array(array_plan, [command_job(c) for c in cmds["tasks"]])
    array_id = base_job_id(array_jobs[0].job_id)
    merge_plan = make_plan(cluster, site, res, log_dir / "merge", requeue=False, dependency=f"afterok:{array_id}",
                           extra_sbatch=opts.sbatch)
    merge_job = submit(merge_plan, command_job(cmds["merge"]))
    update_launch_record(log_dir, kind="preprocess", site=site.name, cluster=cluster, resources=res.to_dict(),
                         argv=list(sys.argv), stages={"plan": plan_job.job_id, "array": array_id,
                                                      "merge": merge_job.job_id},
                         job_ids=[plan_job.job_id, array_id, merge_job.job_id])
    print(f"submitted plan job {plan_job.job_id}, array job {array_id} ({args.tasks} tasks, %{parallel}), "
          f"merge job {merge_job.job_id} (afterok)")
    print(f"output:  {out} (manifest.json when the merge job has run)")
    print(f"logs:    {log_dir}")
    print(f"merge job id: {merge_job.job_id}")
    print(f"chain pretraining to it: python jobs/launch_pretrain.py --after {merge_job.job_id} --data {out} ...")
    if not args.wait:
        return cli.EXIT_OK
    return _report([("plan", [plan_job]), ("array", array_jobs), ("merge", [merge_job])], args.wait_timeout_s)


def _report(stages: list[tuple[str, list[Any]]], timeout_s: Optional[float]) -> int:
    """Waits for every stage; prints which failed (with its error); 0 when all succeeded."""
    all_jobs = [j for _, jobs in stages for j in jobs]
    try:
        wait_for(all_jobs, timeout_s=timeout_s)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_JOB_FAILED
    failed = False
    for stage, jobs in stages:
        for j in jobs:
            outcome = read_task_result(j)
            if outcome is None or outcome[0] != "success":
                failed = True
                why = "never ran or was cancelled (an earlier stage failed?)" if outcome is None else outcome[1]
                print(f"{stage} job {j.job_id} failed: {why}", file=sys.stderr)
    if not failed:
        print("all stages succeeded")
    return cli.EXIT_JOB_FAILED if failed else cli.EXIT_OK


def _run_local(plans: dict[str, Any], cmds: dict[str, Any], parallel: int, log_dir: Path,
               timeout_s: Optional[float]) -> int:
    """The three stages as local processes, each stage after the previous one succeeded."""
    stages: list[tuple[str, list[Any]]] = []
    job = submit(plans["plan"], command_job(cmds["plan"]))
    print(f"plan: local job {job.job_id} (logs in {log_dir})", flush=True)
    stages.append(("plan", [job]))
    if _report(stages, timeout_s) != cli.EXIT_OK:
        return cli.EXIT_JOB_FAILED
    tasks: list[Any] = []
    todo = list(cmds["tasks"])
    while todo:  # at most `parallel` at once
        batch, todo = todo[:parallel], todo[parallel:]
        jobs = [submit(plans["array"], command_job(c)) for c in batch]
        tasks += jobs
        if _report([("array", jobs)], timeout_s) != cli.EXIT_OK:
            return cli.EXIT_JOB_FAILED
    merge = submit(plans["merge"], command_job(cmds["merge"]))
    return _report([("merge", [merge])], timeout_s)
