"""Command-line pieces shared by the launchers in jobs/: site and cluster, resources, dry run and waiting."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from phileo.config import ConfigError
# The launchers' exit statuses: the one set of phileo.exit_codes, under the names the launchers use.
from phileo.exit_codes import FAILED as EXIT_JOB_FAILED, OK as EXIT_OK, REFUSED as EXIT_REFUSED
from phileo.launch.preflight import PreflightReport
from phileo.launch.resources import JobResources, resolve_resources
from phileo.launch.sites import SiteProfile, available_sites, load_site


def add_site_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--site", default=None,
                   help=f"site profile: a name ({', '.join(available_sites())}) or a YAML path "
                        f"(default: $PHILEO_SITE, else 'local')")
    g.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="slurm: submit with sbatch; local: the same job in local processes, no SLURM "
                        "(--gpus-per-node N starts N processes, on CPU without GPUs); auto: slurm when sbatch "
                        "is on PATH (default)")


def add_resource_args(p: argparse.ArgumentParser, gpus: bool = True) -> None:
    g = p.add_argument_group("resources (defaults from the site profile)")
    g.add_argument("--nodes", type=int, default=None, help="number of nodes")
    if gpus:
        g.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node = tasks per node (one task per GPU); CPU tasks on CPU-only sites")
    g.add_argument("--cpus-per-task", type=int, default=None, help="cores per task (default: node cores / tasks)")
    g.add_argument("--mem", default=None, help="memory per node, SLURM syntax (494000M, 64G; 0 = whole node)")
    g.add_argument("--time", default=None, help="walltime per job, SLURM syntax (90, 24:00:00, 1-00:00:00)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None, help="project to charge (needed on Leonardo)")
    g.add_argument("--qos", default=None)
    g.add_argument("--job-name", default=None)
    g.add_argument("--signal-delay-s", type=int, default=None,
                   help="send USR2 this many seconds before the time limit (checkpoint and requeue)")
    g.add_argument("--max-requeues", type=int, default=None, help="how often a job may requeue itself")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("submission")
    g.add_argument("--dry-run", action="store_true",
                   help="print the batch script, the resolved config and the preflight report; submit nothing")
    g.add_argument("--wait", action="store_true",
                   help="block until the job (requeues included) has ended; exit with its status")
    g.add_argument("--wait-timeout-s", type=float, default=None, help=argparse.SUPPRESS)


def pick_site(name: Optional[str]) -> SiteProfile:
    return load_site(name or os.environ.get("PHILEO_SITE") or "local")


def resources_from_args(site: SiteProfile, args: argparse.Namespace, saved: Optional[dict[str, Any]] = None,
                        default_job_name: str = "phileo", **fixed: Any) -> JobResources:
    """JobResources from the command line; unset flags fall back to `saved` (a resumed run's), then the site."""
    saved = saved or {}

    def pick(flag: str, saved_key: Optional[str] = None) -> Any:
        v = getattr(args, flag, None)
        return v if v is not None else saved.get(saved_key or flag)

    saved_time = saved.get("time_min")
    kwargs = dict(
        nodes=pick("nodes"),
        # A resumed run keeps its tasks per node (= the --gpus-per-node flag; on CPU sites no GPU is recorded).
        gpus_per_node=pick("gpus_per_node", "tasks_per_node"),
        cpus_per_task=pick("cpus_per_task"),
        mem=pick("mem"),
        time=args.time if getattr(args, "time", None) is not None else (saved_time if saved_time else None),
        partition=pick("partition"),
        account=pick("account"),
        qos=pick("qos"),
        job_name=pick("job_name") or default_job_name,
        signal_delay_s=pick("signal_delay_s"),
        max_requeues=pick("max_requeues"),
    )
    kwargs.update(fixed)
    return resolve_resources(site, **kwargs)


def print_report(report: PreflightReport, file=None) -> None:
    file = file or sys.stdout
    for note in report.notes:
        print(f"preflight: {note}", file=file)
    for problem in report.problems:
        print(f"preflight ERROR: {problem}", file=file)
    if report.ok:
        print("preflight: all checks passed", file=file)


def finish_dry_run(report: PreflightReport) -> int:
    """Ends a --dry-run printout with the preflight report; the exit status says whether it would be submitted."""
    print("# ---- preflight ----")
    print_report(report)
    return EXIT_OK if report.ok else EXIT_REFUSED


def print_job_dry_run(plan: Any, cluster: str, site: SiteProfile, cfg: Any, config_path: Path,
                      report: PreflightReport) -> int:
    """--dry-run of a single job: the exact batch script, the resolved config, the preflight report."""
    import yaml

    from phileo.config import to_dict

    print(f"# ---- batch script ({cluster}, site {site.name}) ----")
    print(plan.script(), end="")
    print(f"# ---- resolved config (would be written to {config_path}) ----")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return finish_dry_run(report)


def refused_by_preflight(report: PreflightReport) -> Optional[int]:
    """Prints the preflight report (stderr); returns EXIT_REFUSED when it failed, None when the job may go."""
    print_report(report, file=sys.stderr)
    if report.ok:
        return None
    print("nothing was submitted.", file=sys.stderr)
    return EXIT_REFUSED


def refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_REFUSED


def tensorboard_line(run_dir: Path) -> str:
    return f"tensorboard --logdir {shlex.quote(str(Path(run_dir) / 'tensorboard'))}"


__all__ = ["EXIT_OK", "EXIT_JOB_FAILED", "EXIT_REFUSED", "ConfigError", "add_site_args", "add_resource_args",
           "add_run_args", "pick_site", "resources_from_args", "print_report", "finish_dry_run", "print_job_dry_run",
           "refused_by_preflight", "refuse", "tensorboard_line"]
