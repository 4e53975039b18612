"""Site profiles: what a cluster offers and expects, in one YAML file per site (`slurm/sites/<name>.yaml`).

A profile holds the facts a launcher needs and a user should not have to repeat on every command: the partition,
the node type (GPUs, cores, memory), the QOS limits, whether an account is required, where runs go (shared
scratch), the shell lines that prepare the environment on a compute node (modules, conda), the environment
variables every job exports (NCCL, offline flags), how early the pre-timeout signal comes, and how often a job
may requeue itself. Profiles are validated into `SiteProfile` when loaded; a mistake names the file and key.

    site = load_site("leonardo")            # slurm/sites/leonardo.yaml
    site = load_site("path/to/mysite.yaml") # any file
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from phileo.config import ConfigError, from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
SITES_DIR = REPO_ROOT / "slurm" / "sites"

# Environment variable values are written into batch scripts inside double quotes so that `$SLURM_...`
# expands on the node; command substitution and quote characters are refused so a profile cannot run code there.
_UNSAFE_ENV_VALUE = re.compile(r"[`\"\\\n\r]|\$\(")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class NodeType:
    """One compute node as SLURM allocates it."""

    gpus: int = 0  # GPUs per node; 0 = CPU-only (then --gpus-per-node counts CPU tasks per node)
    gpu_model: str = ""
    cpus: int = 1  # cores per node that SLURM hands out
    mem_mb: int = 0  # memory per node that SLURM hands out (0 = unknown, not checked)

    def validate(self) -> None:
        if self.gpus < 0 or self.cpus < 1 or self.mem_mb < 0:
            raise ConfigError(f"node: gpus >= 0, cpus >= 1 and mem_mb >= 0 required, got {self}")


@dataclass
class QosLimit:
    """Limits of one QOS (quality of service) for one job; `None` means no limit."""

    name: str = ""
    min_nodes: int = 1
    max_nodes: Optional[int] = None
    max_time_min: Optional[int] = None
    note: str = ""

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("every qos entry needs a name")
        if self.max_nodes is not None and self.max_nodes < self.min_nodes:
            raise ConfigError(f"qos {self.name}: max_nodes {self.max_nodes} < min_nodes {self.min_nodes}")

    def describe(self) -> str:
        nodes = (f"{self.min_nodes}-{self.max_nodes}" if self.min_nodes > 1 else f"<= {self.max_nodes}") \
            if self.max_nodes is not None else f">= {self.min_nodes}"
        time = "no time limit" if self.max_time_min is None else f"<= {format_minutes(self.max_time_min)}"
        return f"{self.name} ({nodes} nodes, {time})"

    def fits(self, nodes: int, time_min: int) -> bool:
        return (nodes >= self.min_nodes and (self.max_nodes is None or nodes <= self.max_nodes)
                and (self.max_time_min is None or time_min <= self.max_time_min))


@dataclass
class JobDefaults:
    """What a job asks for when the command line does not say."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: Optional[int] = None  # None: the node's cores shared evenly between its tasks
    mem: Optional[str] = None  # SLURM syntax ("494000M", "64G"); None: the site's default
    time: str = "60"  # SLURM syntax: minutes, HH:MM:SS, D-HH:MM:SS
    num_workers: Optional[int] = None  # DataLoader workers per task; None: cpus_per_task - 1

    def workers_for(self, cpus_per_task: int) -> int:
        """DataLoader workers per task: the profile's number, else one per core beside the training process."""
        return self.num_workers if self.num_workers is not None else max(0, cpus_per_task - 1)


CHARGE_UNITS = ("node-hours", "gpu-hours", "core-hours")
CHARGE_BY = ("share", "node")


@dataclass
class Charging:
    """How the site bills a job against the project's budget, so the launcher can say what a job costs."""

    unit: str = "node-hours"  # what the budget counts: node-hours | gpu-hours | core-hours
    # share: a job is billed for the largest share of a node's GPUs, cores or memory it holds (1 of 4 GPUs = 1/4
    # node); node: every node is billed whole (exclusive nodes).
    by: str = "share"

    def validate(self) -> None:
        if self.unit not in CHARGE_UNITS:
            raise ConfigError(f"charging.unit must be one of {', '.join(CHARGE_UNITS)}, got {self.unit!r}")
        if self.by not in CHARGE_BY:
            raise ConfigError(f"charging.by must be one of {', '.join(CHARGE_BY)}, got {self.by!r}")


@dataclass
class CpuJobs:
    """Where CPU-only jobs (preprocessing) go when the site has a CPU partition beside its GPU one.

    Every field left unset (None) is the site's own; `node` describes the CPU partition's nodes.
    """

    partition: Optional[str] = None
    node: Optional[NodeType] = None
    default_qos: Optional[str] = None
    qos: Optional[list[QosLimit]] = None
    max_nodes: Optional[int] = None
    max_time_min: Optional[int] = None
    charging: Optional[Charging] = None


@dataclass
class SiteProfile:
    """A cluster's facts and defaults. Load with `load_site`; every field is documented in slurm/sites/*.yaml."""

    name: str = ""
    description: str = ""
    partition: Optional[str] = None
    account_required: bool = False
    account: Optional[str] = None
    default_qos: Optional[str] = None
    qos: list[QosLimit] = field(default_factory=list)
    # Limits of the partition itself, checked when the site has no QOS table (e.g. the dev cluster).
    max_nodes: Optional[int] = None
    max_time_min: Optional[int] = None
    node: NodeType = field(default_factory=NodeType)
    defaults: JobDefaults = field(default_factory=JobDefaults)
    run_root: str = "runs"  # default parent of run folders; $VARS expand; relative = from the current folder
    data_root: Optional[str] = None  # default --data
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun
    env: dict[str, str] = field(default_factory=dict)  # exported in the batch script before srun
    signal_delay_s: int = 120  # USR2 this long before the time limit: enough to write a checkpoint
    max_requeues: int = 10
    max_array_size: Optional[int] = None  # None: ask `scontrol show config` (MaxArraySize) at submission
    # SLURM's ClusterName of this site (`scontrol show config`): picks the profile when --site is not given, and
    # says whether the live checks (sinfo, sacctmgr) of this machine are about this site.
    cluster_name: Optional[str] = None
    # --cluster auto may run this site's one-node jobs as local processes when there is no sbatch (the laptop /
    # dev profile). Off for real clusters: their jobs are never turned into local ones.
    local_fallback: bool = False
    charging: Charging = field(default_factory=Charging)
    # The site's own file systems (top folders such as /leonardo_work): a path under one that this machine does
    # not have (a laptop) is noted "not checked here" by preflight instead of refused.
    mounts: list[str] = field(default_factory=list)
    cpu_jobs: Optional[CpuJobs] = None  # the CPU partition for CPU-only jobs (None: the same partition)
    path: str = ""  # the file it was loaded from (set by load_site)

    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"site name must be a plain word (letters, digits, _ . -), got {self.name!r}")
        names = [q.name for q in self.qos]
        if len(set(names)) != len(names):
            raise ConfigError(f"site {self.name}: qos names repeat: {names}")
        if self.default_qos is not None and self.qos and self.default_qos not in names:
            raise ConfigError(f"site {self.name}: default_qos {self.default_qos!r} is not one of {names}")
        if self.signal_delay_s < 10:
            raise ConfigError(f"site {self.name}: signal_delay_s must be >= 10 s (time to write a checkpoint)")
        if self.max_requeues < 0:
            raise ConfigError(f"site {self.name}: max_requeues must be >= 0")
        if self.max_array_size is not None and self.max_array_size < 1:
            raise ConfigError(f"site {self.name}: max_array_size must be >= 1")
        for k, v in self.env.items():
            if not _ENV_NAME.match(str(k)):
                raise ConfigError(f"site {self.name}: env name {k!r} is not a valid variable name")
            if _UNSAFE_ENV_VALUE.search(str(v)):
                raise ConfigError(f"site {self.name}: env {k}={v!r} contains a quote, backslash, backtick, "
                                  f"newline or $(...); only plain values and $VARIABLES are allowed")
        self.env = {str(k): str(v) for k, v in self.env.items()}
        self.charging.validate()
        if self.cpu_jobs is not None:
            if self.cpu_jobs.node is not None:
                self.cpu_jobs.node.validate()
            if self.cpu_jobs.charging is not None:
                self.cpu_jobs.charging.validate()
            for q in self.cpu_jobs.qos or []:
                q.validate()

    def for_cpu_jobs(self) -> "SiteProfile":
        """The profile CPU-only jobs are checked and written against: the `cpu_jobs` partition where the site
        has one (its node type, QOS table, limits and charging), else this profile unchanged."""
        c = self.cpu_jobs
        if c is None:
            return self
        changes = {k: getattr(c, k) for k in ("partition", "node", "qos", "max_nodes", "max_time_min", "charging")
                   if getattr(c, k) is not None}
        if c.qos is not None or c.default_qos is not None:
            changes["default_qos"] = c.default_qos
        return dataclasses.replace(self, cpu_jobs=None, **changes)

    def find_qos(self, name: str) -> Optional[QosLimit]:
        return next((q for q in self.qos if q.name == name), None)

    def qos_fitting(self, nodes: int, time_min: int) -> list[QosLimit]:
        """QOS entries whose limits admit `nodes` for `time_min`, in profile order."""
        return [q for q in self.qos if q.fits(nodes, time_min)]

    def resolve_run_root(self) -> Path:
        """`run_root` with $VARIABLES and ~ expanded; refuses when a variable is not set here."""
        expanded = os.path.expanduser(os.path.expandvars(self.run_root))
        if "$" in expanded:
            var = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
            raise ConfigError(f"site {self.name}: run_root {self.run_root!r} uses ${var.group(1) if var else '?'}, "
                              f"which is not set in this shell; pass --run-dir, or export it")
        return Path(expanded).absolute()


def site_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file for a site name (looked up in slurm/sites/) or a path to a profile file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p
    return SITES_DIR / f"{name_or_path}.yaml"


def available_sites() -> list[str]:
    """Names of the profiles shipped in slurm/sites/."""
    return sorted(p.stem for p in SITES_DIR.glob("*.yaml"))


def load_site(name_or_path: str | os.PathLike) -> SiteProfile:
    """Reads and validates a site profile.

    Takes a site name (`leonardo`, `local`: files in slurm/sites/) or a path to a YAML file. Returns a
    validated `SiteProfile`. Refuses (ConfigError naming the file) a missing file, invalid YAML, unknown keys,
    values of the wrong type and impossible limits.
    """
    path = site_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no site profile {path}; known sites: {', '.join(available_sites()) or 'none'} "
                          f"(or pass a path to a YAML profile)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"site profile {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site profile {path} must be a mapping of keys to values")
    data.setdefault("name", path.stem)
    try:
        site = from_dict(SiteProfile, data, where="site")
        site.node.validate()
        for q in site.qos:
            q.validate()
        site.validate()
        site.for_cpu_jobs().validate()
    except ConfigError as e:
        raise ConfigError(f"site profile {path}: {e}") from None
    site.path = str(path)
    return site


def format_minutes(minutes: int) -> str:
    """1440 -> '24:00:00', 5760 -> '4-00:00:00' (SLURM's own notation)."""
    days, rest = divmod(int(minutes), 1440)
    hours, mins = divmod(rest, 60)
    hms = f"{hours:02d}:{mins:02d}:00"
    return f"{days}-{hms}" if days else hms
