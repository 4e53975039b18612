"""Command-line pieces shared by the launchers in jobs/: site and cluster, resources, dry run and waiting."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from phileo.config import ConfigError
# The launchers' exit statuses: the one set of phileo.exit_codes, under the names the launchers use.
from phileo.exit_codes import FAILED as EXIT_JOB_FAILED, OK as EXIT_OK, REFUSED as EXIT_REFUSED
from phileo.launch import slurm as slurm_cli
from phileo.launch.preflight import PreflightReport, check_script_values
from phileo.launch.resources import JobResources, resolve_resources
from phileo.launch.sites import SiteProfile, available_sites, load_site


def add_site_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--site", default=None,
                   help=f"site profile: a name ({', '.join(available_sites())}) or a YAML path (default: "
                        f"$PHILEO_SITE; else, on a machine with SLURM, the profile whose cluster_name is this "
                        f"cluster's; else 'local')")
    g.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="slurm: submit with sbatch (a --dry-run needs no SLURM here); local: the same job in local "
                        "processes, no SLURM (--gpus-per-node N starts N processes, on CPU without GPUs); auto "
                        "(default): slurm when sbatch is on PATH; without it, local only for one-node jobs of a "
                        "site that allows it (the local profile), else slurm")


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
    g.add_argument("--max-failures", type=_non_negative, default=3,
                   help="how often a failure that is not a preemption (an exception, a dead or hung rank) is "
                        "retried from the last good checkpoint before the run stops as failed (default 3)")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_recipe_arg(g: Any) -> None:
    """--recipe: the preset layer under --config, the flags and key=value (phileo.train.recipes)."""
    from phileo.train.recipes import RECIPES

    g.add_argument("--recipe", choices=RECIPES, default=None,
                   help="hyperparameter preset under --config, the flags and key=value: 'published' reproduces "
                        "the published code (README: Fidelity to the published code); default: the config's "
                        "`recipe` key, else 'default'")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("submission")
    g.add_argument("--dry-run", action="store_true",
                   help="print the batch script, the resolved config and the preflight report; submit nothing")
    g.add_argument("--wait", action="store_true",
                   help="block until the job (requeues included) has ended; exit with its status")
    g.add_argument("--wait-timeout-s", type=float, default=None, help=argparse.SUPPRESS)
    g.add_argument("--after", action="append", default=[], metavar="JOBID",
                   help="start only when job JOBID has succeeded (--dependency=afterok:JOBID; repeatable), e.g. "
                        "the merge job launch_preprocess.py prints")
    g.add_argument("--dependency", default=None, metavar="SPEC",
                   help="any other SLURM dependency, e.g. afterany:123 (combined with --after)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, passed through quoted (repeatable): mail-type=END,FAIL "
                        "mail-user=me@example.org reservation=R constraint=C exclusive ...")


# sbatch options the launcher writes itself from its own flags (and checks): --sbatch must not override them.
MANAGED_SBATCH = {
    "job-name": "--job-name", "partition": "--partition", "account": "--account", "qos": "--qos",
    "nodes": "--nodes", "ntasks-per-node": "--gpus-per-node", "ntasks": "--nodes and --gpus-per-node",
    "cpus-per-task": "--cpus-per-task", "gres": "--gpus-per-node", "gpus": "--gpus-per-node",
    "gpus-per-node": "--gpus-per-node", "mem": "--mem", "time": "--time", "signal": "--signal-delay-s",
    "output": "--run-dir", "error": "--run-dir", "array": "the launcher (arrays are its own)",
    "dependency": "--after or --dependency", "requeue": "--max-requeues", "open-mode": "the launcher",
    "wckey": "the launcher", "kill-on-invalid-dep": "the launcher",
}
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_DEPENDENCY = re.compile(r"^[a-z_]+(:\d+(_\d+)?(\+\d+)?)*([,?][a-z_]+(:\d+(_\d+)?(\+\d+)?)*)*$")


@dataclass
class SubmitOptions:
    """What --sbatch, --after and --dependency add to every job a launcher submits."""

    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options (True: a flag without value)
    after: list[str] = field(default_factory=list)  # job ids this job waits for (afterok)
    dependency: Optional[str] = None  # the full SLURM dependency spec, or None

    @property
    def any(self) -> bool:
        return bool(self.sbatch or self.dependency)


def submit_options(args: argparse.Namespace) -> SubmitOptions:
    """Parses --sbatch KEY=VALUE, --after JOBID and --dependency SPEC; refuses (ConfigError) keys the launcher
    sets itself, malformed keys, job ids and dependency specs, and values that cannot go into a script."""
    extra: dict[str, Any] = {}
    for item in getattr(args, "sbatch", None) or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not _SBATCH_KEY.match(key):
            raise ConfigError(f"--sbatch {item!r}: the key must be an sbatch long option such as mail-type or "
                              f"reservation (--sbatch mail-type=END)")
        if key in MANAGED_SBATCH:
            raise ConfigError(f"--sbatch {item!r}: the launcher writes --{key} itself; set it with "
                              f"{MANAGED_SBATCH[key]} instead")
        if sep and (problems := check_script_values({f"--sbatch {key}": value})):
            raise ConfigError(problems[0])
        extra[key] = value if sep else True
    after = [str(a).strip() for a in getattr(args, "after", None) or []]
    for job_id in after:
        if not _JOB_ID.match(job_id):
            raise ConfigError(f"--after {job_id!r} is not a SLURM job id (e.g. 1234567, or 1234567_3 for one "
                              f"array task)")
    spec = getattr(args, "dependency", None)
    if spec is not None and not _DEPENDENCY.match(spec.strip()):
        raise ConfigError(f"--dependency {spec!r} is not SLURM dependency syntax (e.g. afterany:123 or "
                          f"afterok:123:456,singleton)")
    parts = ([f"afterok:{':'.join(after)}"] if after else []) + ([spec.strip()] if spec else [])
    return SubmitOptions(extra, after, ",".join(parts) or None)


def pick_site(name: Optional[str], cluster: str = "auto") -> SiteProfile:
    """The profile named by --site or $PHILEO_SITE; without either, the profile whose `cluster_name` is this
    machine's SLURM cluster, or `local` on a machine without SLURM (or with --cluster local). Refuses
    (ConfigError) a machine with SLURM that no profile is for, instead of rendering another cluster's profile."""
    name = name or os.environ.get("PHILEO_SITE")
    if name:
        return load_site(name)
    if cluster == "local" or not slurm_cli.have_sbatch():
        return load_site("local")
    here = slurm_cli.cluster_name_here()
    for candidate in available_sites():
        site = load_site(candidate)
        if here and site.cluster_name == here:
            print(f"site: {site.name} (this machine is SLURM cluster {here!r}; --site to choose another)",
                  file=sys.stderr)
            return site
    raise ConfigError(f"this machine has SLURM (cluster {here or 'of unknown name'}) and no --site was given: pass "
                      f"--site NAME ({', '.join(available_sites())}) or --site path/to/profile.yaml, or export "
                      f"PHILEO_SITE; set `cluster_name: {here or '<ClusterName>'}` in a profile to have it picked here")


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
    if report.ok and report.unchecked:
        print(f"preflight: all checks that can run here passed ({len(report.unchecked)} not run here: see above)",
              file=file)
    elif report.ok:
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
           "add_recipe_arg", "add_run_args", "pick_site", "resources_from_args", "print_report", "finish_dry_run", "print_job_dry_run",
           "refused_by_preflight", "refuse", "tensorboard_line"]
