"""Checks a job before it is queued, so that a mistake costs seconds on the login node, not hours in the queue.

Each check that fails adds one line saying what is wrong and what to change; all lines are reported together in
one `PreflightError`. Checks: values that cannot be written safely into a batch script; nodes and time against
the QOS (or partition) limits, with a QOS that would fit; GPUs, cores and memory per node against the node type;
the account where the site needs one; the data manifest exists, has at least one chunk per node, and every chunk
file it lists is there with its recorded size; the run folder can be written (or, on a fresh launch, does not
already hold a run). The launchers add what only they know (model and task names, --init, a sweep's ${VAR}s).

Live checks ask this machine's SLURM (`sinfo` for the partition, `sacctmgr` for the account, `squeue` for the
jobs named by --after). They run only where the SLURM client is installed and is the profile's cluster; anywhere
else (a laptop, another cluster) they are reported as skipped, so a dry run works on any machine.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from phileo import run_lock
from phileo.launch.resources import JobResources, job_cost, parse_mem_mb
from phileo.launch.sites import SiteProfile, format_minutes
from phileo.launch import slurm as slurm_cli

# An array job or job that ended in one of these can never satisfy `afterok`.
_NEVER_OK = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                       "PREEMPTED", "REVOKED"})


class PreflightError(ValueError):
    """The job would be refused or would fail; `problems` lists each reason with what to change."""

    def __init__(self, problems: list[str], header: str = "the job was not submitted"):
        self.problems = list(problems)
        super().__init__(f"{header}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class PreflightReport:
    """What preflight found: hard problems (the job must not be submitted) and notes worth printing."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unchecked(self) -> list[str]:
        """Notes of checks that could not run here (no SLURM client, the site's file systems not mounted)."""
        return [n for n in self.notes if "skipped" in n or "not checked" in n]

    def add(self, problems: list[str], notes: list[str] = ()) -> "PreflightReport":
        self.problems += problems
        self.notes += list(notes)
        return self

    def raise_if_failed(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


def unsafe_value_reason(value: str) -> Optional[str]:
    """Why `value` cannot go into a batch script, or None when it can (after shlex quoting).

    Quoting handles spaces, quotes and `$(...)`; it cannot handle a line break (a #SBATCH directive ends at the
    line end, so the rest would run as shell), and SLURM expands `%` patterns in file names and job names.
    """
    if any(c in value for c in "\n\r\0"):
        return "contains a line break or NUL"
    return None


def check_script_values(values: dict[str, Optional[str]], paths: dict[str, Optional[str]] = None) -> list[str]:
    """Problems for user-provided strings (job name, account ...) and paths that go into a batch script."""
    problems = []
    for what, v in values.items():
        if v is not None and (why := unsafe_value_reason(str(v))):
            problems.append(f"{what} {v!r} {why}; choose one without it")
    for what, v in (paths or {}).items():
        if v is None:
            continue
        if why := unsafe_value_reason(str(v)):
            problems.append(f"{what} {str(v)!r} {why}; choose another path")
        elif "%" in str(v):
            problems.append(f"{what} {str(v)!r} contains '%', which SLURM expands in log file names "
                            f"(%j = job id ...); choose a path without '%'")
    return problems


def check_limits(site: SiteProfile, res: JobResources) -> list[str]:
    """Nodes/time against QOS or partition limits; tasks, GPUs, cores, memory against the node type; account."""
    problems: list[str] = []
    where = f"site {site.name} ({site.path or 'profile'})"
    if site.qos:
        if res.qos is None:
            problems.append(f"no QOS chosen and {where} has no default_qos; pass --qos "
                            f"(one of: {', '.join(q.describe() for q in site.qos)})")
        else:
            q = site.find_qos(res.qos)
            if q is None:
                problems.append(f"--qos {res.qos} is not a QOS of {where}; known: "
                                f"{', '.join(q.name for q in site.qos)}")
            elif not q.fits(res.nodes, res.time_min):
                fitting = [x for x in site.qos_fitting(res.nodes, res.time_min)]
                what = []
                if res.nodes < q.min_nodes or (q.max_nodes is not None and res.nodes > q.max_nodes):
                    what.append(f"{res.nodes} nodes")
                if q.max_time_min is not None and res.time_min > q.max_time_min:
                    what.append(f"--time {format_minutes(res.time_min)}")
                hint = (f"use --qos {fitting[0].describe()}" if fitting else
                        "lower --nodes or --time to fit one of: " + "; ".join(x.describe() for x in site.qos))
                problems.append(f"{' and '.join(what)} do not fit QOS {q.describe()} on {site.name}: {hint}")
    if site.max_nodes is not None and res.nodes > site.max_nodes:
        problems.append(f"--nodes {res.nodes} is more than the {site.max_nodes} nodes of {where}; "
                        f"use --nodes {site.max_nodes} or fewer")
    if site.max_time_min is not None and res.time_min > site.max_time_min:
        problems.append(f"--time {format_minutes(res.time_min)} is longer than the partition limit "
                        f"{format_minutes(site.max_time_min)} of {where}; shorten --time (the job requeues "
                        f"itself at the limit and resumes)")

    node = site.node
    if node.gpus > 0:
        if res.gpus_per_node > node.gpus:
            problems.append(f"--gpus-per-node {res.gpus_per_node} but a {site.name} node has {node.gpus} "
                            f"{node.gpu_model or 'GPUs'}; use --gpus-per-node {node.gpus} or fewer (and more --nodes)")
    if res.tasks_per_node * res.cpus_per_task > node.cpus:
        problems.append(f"{res.tasks_per_node} task(s) per node x --cpus-per-task {res.cpus_per_task} = "
                        f"{res.tasks_per_node * res.cpus_per_task} cores, but a {site.name} node has {node.cpus}; "
                        f"use --cpus-per-task {max(1, node.cpus // res.tasks_per_node)} or fewer")
    if res.mem is not None and node.mem_mb:
        mem_mb = parse_mem_mb(res.mem)
        if mem_mb > node.mem_mb:
            problems.append(f"--mem {res.mem} is more than the {node.mem_mb} MB a {site.name} node offers; "
                            f"use --mem {node.mem_mb}M or less (0 = the whole node)")
    if site.account_required and not res.account:
        problems.append(f"{where} needs an account: pass --account <project> (Leonardo: see `saldo -b`), "
                        f"set `account:` in the profile, or export SBATCH_ACCOUNT")
    if res.signal_delay_s >= res.time_min * 60:
        problems.append(f"the pre-timeout signal ({res.signal_delay_s} s before the limit) would come before the "
                        f"job starts; raise --time above {res.signal_delay_s // 60 + 1} min or lower "
                        f"--signal-delay-s")
    problems += check_script_values(
        {"--job-name": res.job_name, "--account": res.account, "--partition": res.partition, "--qos": res.qos,
         "--mem": res.mem})
    return problems


def absent_here(path: Optional[str | os.PathLike], site: SiteProfile) -> Optional[Path]:
    """The site file system (`mounts` in the profile, e.g. /leonardo_work) that `path` is on, when this machine
    does not have it (a laptop): nothing about the path can be checked here. None otherwise, and then a missing
    path is a real problem."""
    if not path or str(path) == "scratch":
        return None
    p = Path(path).absolute()
    for mount in map(Path, site.mounts):
        if (p == mount or mount in p.parents) and not mount.exists():
            return mount
    return None


def not_here_note(what: str, path: str | os.PathLike, top: Path) -> str:
    return (f"{what} {path}: not checked, {top} is not on this machine (run the same command on the site's "
            f"login node to check it)")


def check_run_dir(run_dir: Path, fresh: bool, is_run: Callable[[Path], bool] = None) -> list[str]:
    """The run folder (or its nearest existing parent) is writable; a fresh launch must not reuse a run's folder."""
    problems = check_script_values({}, {"--run-dir": str(run_dir)})
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        return problems + [f"--run-dir {p} exists and is not a folder; choose another path"]
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"run folder {p} cannot be created or written ({probe} is not writable by you); "
                        f"choose a --run-dir on your shared scratch")
    if fresh and p.is_dir() and is_run is not None and is_run(p):
        problems.append(f"run folder {p} already holds a run; continue it with --resume {p}, or choose "
                        f"another --run-dir")
    elif p.is_dir():
        # One writer per run: a --resume (or a relaunch) into a folder a live job still trains into.
        locked = run_lock.lock_problem(p)
        if locked:
            problems.append(locked)
    return problems


def run_dir_report(site: SiteProfile, run_dir: Path, fresh: bool, is_run: Callable[[Path], bool] = None,
                   flag: str = "--run-dir") -> tuple[list[str], list[str]]:
    """`check_run_dir`, except for a folder on a site file system this machine does not have (the cluster's
    scratch seen from a laptop): then a note that it was not checked. Returns (problems, notes)."""
    if top := absent_here(run_dir, site):
        return check_script_values({}, {flag: str(run_dir)}), [not_here_note(flag, run_dir, top)]
    return check_run_dir(Path(run_dir), fresh, is_run), []


def check_data(data_root: Optional[Path], nodes: int,
               list_chunks: Callable[[Path], list[tuple[Path, int]]],
               expected_from: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The manifest under `data_root` exists, lists at least one chunk per node, and every chunk file it lists is
    there with its recorded size (one stat each). Returns (problems, notes).

    `list_chunks(data_root)` reads the manifest (phileo.data.load_manifest) and returns (path, recorded bytes)
    per chunk, raising with the reader's own message when it cannot. With `expected_from` (job ids the job waits
    for, e.g. the preprocessing merge job) a manifest that does not exist yet is a note, not a problem.
    """
    if data_root is None:
        return ["no --data given and the site has no data_root; pass --data <folder with manifest.json>"], []
    try:
        chunks = list_chunks(Path(data_root))
    except FileNotFoundError as e:
        if expected_from:
            return [], [f"data: {data_root} has no manifest yet; expected from job(s) {', '.join(expected_from)} "
                        f"(--after), so its chunks are not checked here"]
        return [f"--data {data_root}: {e}"], []
    except Exception as e:  # the reader's message names the file and the fix
        return [f"--data {data_root}: {e}"], []
    problems = check_chunk_files(Path(data_root), chunks)
    n_chunks = len(chunks)
    if n_chunks < nodes:
        problems.append(f"--data {data_root} has {n_chunks} chunk(s) but the job has {nodes} nodes, and each node "
                        f"reads whole chunks: use --nodes {max(1, n_chunks)} or fewer, or preprocess more data into "
                        f"more chunks")
    if problems:
        return problems, []
    return [], [f"data: {n_chunks} chunks for {nodes} node(s) ({n_chunks / nodes:.1f} per node), every chunk file "
                f"there with its recorded size"]


def check_chunk_files(data_root: Path, chunks: Sequence[tuple[Path, int]], shown: int = 3) -> list[str]:
    """One line for chunk files that are missing and one for those whose size differs from the manifest's."""
    missing: list[Path] = []
    changed: list[str] = []
    for path, size in chunks:
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            missing.append(path)
            continue
        if actual != size:
            changed.append(f"{_rel(path, data_root)}: {actual} bytes, manifest says {size}")

    def listing(items: list[str]) -> str:
        more = f", and {len(items) - shown} more" if len(items) > shown else ""
        return "; ".join(items[:shown]) + more

    fix = (f"re-run the same conversion into --out {data_root} (it rewrites exactly those chunks and keeps the "
           f"others), then --merge")
    problems = []
    if missing:
        problems.append(f"--data {data_root}: {len(missing)} of {len(chunks)} chunk file(s) listed in manifest.json "
                        f"are missing ({listing([_rel(p, data_root) for p in missing])}): {fix}")
    if changed:
        problems.append(f"--data {data_root}: {len(changed)} chunk file(s) differ in size from manifest.json, "
                        f"truncated or replaced ({listing(changed)}): {fix}")
    return problems


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def check_paths_exist(paths: dict[str, Optional[str]], hint: str = "") -> list[str]:
    """One problem per flag whose path does not exist here (the login node sees the compute nodes' storage)."""
    return [f"{what} {p}: no such file or folder{hint}" for what, p in paths.items()
            if p is not None and not Path(p).exists()]


def check_model(name: str, overrides: Optional[dict] = None, flag: str = "--model") -> list[str]:
    """The model name (and its config overrides) against phileo.models' registry, as the job will build it.

    Imports phileo.models, and so torch (about 2 s, once per launch): the registry is the one source of names.
    """
    from phileo.models.registry import get_model_config

    try:
        get_model_config(name, **(overrides or {}))
    except (ValueError, TypeError) as e:
        return [f"{flag} {name}: {e}; choose one of those"]
    return []


def live_checks(site: SiteProfile, res: JobResources, after: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """What only this machine's SLURM can tell: the partition exists (sinfo), the account is one of yours
    (sacctmgr), the jobs of --after exist and can still succeed (squeue). Returns (problems, notes).

    Skipped, with a note saying why, where there is no SLURM client or it belongs to another cluster than the
    profile's `cluster_name`; a tool that does not answer skips its own check only.
    """
    if shutil.which("sinfo") is None or shutil.which("squeue") is None:
        return [], ["live checks (partition, account, --after jobs): skipped (no SLURM client here)"]
    here = slurm_cli.cluster_name_here()
    if site.cluster_name and here and here != site.cluster_name:
        return [], [f"live checks (partition, account, --after jobs): skipped (this machine is SLURM cluster "
                    f"{here!r}, the profile is for {site.cluster_name!r})"]
    problems: list[str] = []
    checked: list[str] = []
    skipped: list[str] = []
    if res.partition and (partitions := _ask("partition", slurm_cli.partitions_here, checked, skipped)) is not None:
        if res.partition not in partitions:
            problems.append(f"--partition {res.partition} is not a partition of this cluster (sinfo lists "
                            f"{', '.join(partitions) or 'none'}); pass --partition with one of them, or fix "
                            f"`partition:` in {site.path or 'the site profile'}")
    if res.account and (accounts := _ask("account", slurm_cli.user_accounts, checked, skipped)) is not None:
        if accounts and res.account.lower() not in {a.lower() for a in accounts}:
            problems.append(f"--account {res.account} is not one of your accounts here ({', '.join(accounts)}); "
                            f"pass --account with one of them (Leonardo: `saldo -b` lists them)")
    for job_id in after:
        checked.append(f"job {job_id}")
        states = slurm_cli.job_states(job_id)
        if not states:
            problems.append(f"--after {job_id}: SLURM lists no such job (a typo, or it ended long ago); drop "
                            f"--after when its work is done, or name a queued job")
        elif all(st in _NEVER_OK for st in states):
            problems.append(f"--after {job_id}: that job ended {'/'.join(sorted(set(states)))}, so this one would "
                            f"never start (afterok); fix and re-run it first, or drop --after")
    notes = []
    if checked:
        notes.append(f"live checks: {', '.join(checked)} checked against this cluster")
    if skipped:
        notes.append(f"live checks skipped: {'; '.join(skipped)}")
    return problems, notes


def _ask(name: str, query: Callable[[], list[str]], checked: list[str], skipped: list[str]) -> Optional[list[str]]:
    """query()'s answer, recording the check as done; None (recorded as skipped, with why) when SLURM did not
    answer."""
    try:
        answer = query()
    except RuntimeError as e:
        skipped.append(f"{name} ({e})")
        return None
    checked.append(name)
    return answer


def cost_note(site: SiteProfile, res: JobResources, count: int = 1) -> str:
    return f"asks for {job_cost(site, res, count).describe()} at most"


def preflight(site: SiteProfile, res: JobResources, *, run_dir: Optional[Path] = None, fresh_run: bool = True,
              is_run: Callable[[Path], bool] = None, data_root: Optional[Path] = None,
              list_chunks: Optional[Callable[[Path], list[tuple[Path, int]]]] = None,
              live: bool = False, after: Sequence[str] = ()) -> PreflightReport:
    """Every check for one job; returns a report (problems and notes) and never submits or writes anything.

    Data is checked only when `list_chunks` is given (pretraining); the run folder only when `run_dir` is; the
    live cluster only with `live` (SLURM jobs). Paths on a site file system this machine does not have (the
    profile's `mounts`, seen from a laptop) are noted as not checked instead of refused.
    """
    report = PreflightReport()
    report.problems += check_limits(site, res)
    # Off the cluster (a laptop) the site's file systems are not mounted: say so, do not refuse.
    if run_dir is not None:
        report.add(*run_dir_report(site, Path(run_dir), fresh_run, is_run))
    if list_chunks is not None:
        if top := absent_here(data_root, site):
            report.notes.append(not_here_note("--data", data_root, top))
        else:
            report.add(*check_data(data_root, res.nodes, list_chunks, expected_from=after))
    if live:
        report.add(*live_checks(site, res, after))
    report.notes.append(cost_note(site, res))
    return report
