"""What one job asks of the scheduler: nodes, tasks, cores, memory, time, partition, account, QOS.

`resolve_resources(site, ...)` fills what the command line left out from the site profile, so a job is fully
described by one `JobResources` before it is checked (preflight) and turned into a batch script.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Optional

from phileo.config import ConfigError
from phileo.launch.sites import SiteProfile, format_minutes

_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_time_min(value: str | int) -> int:
    """SLURM time syntax to whole minutes (seconds round up).

    Accepts what `sbatch --time` accepts: "90" (minutes), "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM",
    "D-HH:MM:SS", and an int (minutes). Refuses anything else, zero, and fields out of range (minutes or seconds
    of 60 and more after the first field, hours of 24 and more after a day count): SLURM would silently carry
    them over, so 99:99:99 would become 4-04:41:00.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        s = str(value).strip()
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
        if not m:
            raise ConfigError(f"--time {value!r} is not a SLURM time: use minutes (90), HH:MM:SS (24:00:00) "
                              f"or D-HH:MM:SS (1-00:00:00)")
        days, a, b, c = m.groups()
        a, b, c = int(a), (int(b) if b else None), (int(c) if c else None)
        if days is not None:  # D-HH[:MM[:SS]]
            _check_time_fields(value, [("hours", a, 24), ("minutes", b, 60), ("seconds", c, 60)])
            seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # HH:MM:SS
            _check_time_fields(value, [("minutes", b, 60), ("seconds", c, 60)])
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # MM:SS
            _check_time_fields(value, [("seconds", b, 60)])
            seconds = a * 60 + b
        else:  # minutes
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    if minutes <= 0:
        raise ConfigError(f"--time {value!r} must be at least one minute")
    return minutes


def _check_time_fields(value: Any, fields: list[tuple[str, Optional[int], int]]) -> None:
    for name, number, limit in fields:
        if number is not None and number >= limit:
            raise ConfigError(f"--time {value!r}: {name} {number} is not below {limit}; write the walltime as "
                              f"D-HH:MM:SS (e.g. 1-12:00:00 for 36 hours)")


def parse_mem_mb(value: str | int) -> int:
    """SLURM memory syntax ("494000M", "64G", "64GB", "1T", plain number = MB) to MB. "0" means the whole node."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _MEM.match(str(value))
    if not m:
        raise ConfigError(f"--mem {value!r} is not a SLURM memory size: use e.g. 494000M, 64G or 0 (whole node)")
    number, unit = float(m.group(1)), m.group(2).upper()
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return int(math.ceil(number * factor))


@dataclass
class JobResources:
    """A fully resolved request: every field is what goes into the batch script (None = leave to SLURM)."""

    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU (or per CPU worker slot on CPU-only sites)
    gpus_per_node: int = 0  # GPUs requested per node (--gres=gpu:N); 0 on CPU-only sites
    cpus_per_task: int = 1
    mem: Optional[str] = None  # SLURM syntax, per node
    time_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: str = "phileo"
    signal_delay_s: int = 120
    max_requeues: int = 10

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def node_hours(self) -> float:
        """Node-hours asked for: nodes x walltime (what the allocation is charged for a full-length job)."""
        return self.nodes * self.time_min / 60.0

    @property
    def gpu_hours(self) -> float:
        return self.node_hours * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobResources":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def resolve_resources(site: SiteProfile, *, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
                      cpus_per_task: Optional[int] = None, mem: Optional[str] = None, time: Optional[str] = None,
                      partition: Optional[str] = None, account: Optional[str] = None, qos: Optional[str] = None,
                      job_name: str = "phileo", signal_delay_s: Optional[int] = None,
                      max_requeues: Optional[int] = None, tasks_per_node: Optional[int] = None) -> JobResources:
    """Fills what the caller left as None from the site profile.

    `gpus_per_node` is the number of tasks per node (one per GPU); on a CPU-only site it is the number of CPU
    tasks per node and no GPU is requested. `tasks_per_node` overrides that for jobs that are not one-per-GPU
    (e.g. a single-task preprocessing job on a GPU node). The account comes from the argument, the profile, or
    $SBATCH_ACCOUNT, in that order. Refuses syntax errors in time and memory (ConfigError); limits are
    checked later by preflight.
    """
    d = site.defaults
    g = d.gpus_per_node if gpus_per_node is None else gpus_per_node
    if g < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0, got {g}")
    ntasks = tasks_per_node if tasks_per_node is not None else max(1, g)
    gpu_site = site.node.gpus > 0
    if cpus_per_task is None:
        if d.cpus_per_task is not None:
            cpus_per_task = d.cpus_per_task
        elif gpu_site and g > 0:
            # A GPU's share of the node's cores (8 of 32 per A100 on Leonardo), so 1-GPU jobs share nodes fairly.
            cpus_per_task = max(1, (site.node.cpus * g // site.node.gpus) // ntasks)
        else:
            cpus_per_task = max(1, site.node.cpus // ntasks)
    if mem is None:
        mem = d.mem
        if mem is None and gpu_site and g > 0 and site.node.mem_mb:
            mem = f"{site.node.mem_mb * min(g, site.node.gpus) // site.node.gpus}M"  # the GPUs' share of memory
    if mem is not None:
        parse_mem_mb(mem)  # syntax check now, limit check in preflight
    n = d.nodes if nodes is None else nodes
    if n < 1:
        raise ConfigError(f"--nodes must be >= 1, got {n}")
    if cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
    if account is None:
        account = site.account or os.environ.get("SBATCH_ACCOUNT") or None
    return JobResources(
        nodes=n,
        tasks_per_node=ntasks,
        gpus_per_node=g if site.node.gpus > 0 else 0,
        cpus_per_task=cpus_per_task,
        mem=str(mem) if mem is not None else None,
        time_min=parse_time_min(d.time if time is None else time),
        partition=site.partition if partition is None else partition,
        account=account,
        qos=site.default_qos if qos is None else qos,
        job_name=job_name,
        signal_delay_s=site.signal_delay_s if signal_delay_s is None else signal_delay_s,
        max_requeues=site.max_requeues if max_requeues is None else max_requeues,
    )


@dataclass(frozen=True)
class JobCost:
    """What a job (or `count` array tasks of it) may be billed at most: every task running its full walltime."""

    count: int  # array tasks; 1 for a single job
    nodes: int
    time_min: int
    node_share: float  # the share of each node billed (1.0 = whole nodes)
    share_reason: str  # what sets the share, e.g. "1 of 4 GPUs"
    gpus_per_node: int
    node_cpus: int
    unit: str  # what the site's budget counts (Charging.unit)

    @property
    def node_hours(self) -> float:
        return self.count * self.nodes * self.node_share * self.time_min / 60.0

    @property
    def gpu_hours(self) -> float:
        return self.count * self.nodes * self.gpus_per_node * self.time_min / 60.0

    @property
    def core_hours(self) -> float:
        return self.node_hours * self.node_cpus

    def amount(self, unit: str) -> float:
        return {"node-hours": self.node_hours, "gpu-hours": self.gpu_hours, "core-hours": self.core_hours}[unit]

    def describe(self) -> str:
        """E.g. '64 task(s) x 1 node(s) x 08:00:00 = 512 node-hours', '1 node(s) x 1-00:00:00 billed as 1/4 of
        a node (1 of 4 GPUs) = 6 node-hours (24 GPU-hours)': the site's unit first, the others in brackets."""
        tasks = f"{self.count} task(s) x " if self.count != 1 else ""
        share = ""
        if self.node_share < 1:
            share = f" billed as {_fraction(self.node_share)} of a node ({self.share_reason})"
        names = {"node-hours": "node-hours", "gpu-hours": "GPU-hours", "core-hours": "core-hours"}
        others = [u for u in ("node-hours", "gpu-hours") if u != self.unit and (u != "gpu-hours" or self.gpus_per_node)]
        extra = ", ".join(f"{self.amount(u):g} {names[u]}" for u in others)
        return (f"{tasks}{self.nodes} node(s) x {format_minutes(self.time_min)}{share} = "
                f"{self.amount(self.unit):g} {names[self.unit]}" + (f" ({extra})" if extra else ""))


def _fraction(x: float) -> str:
    f = Fraction(x).limit_denominator(128)
    return f"{f.numerator}/{f.denominator}" if abs(float(f) - x) < 1e-9 else f"{x:.0%}"


def job_cost(site: SiteProfile, res: JobResources, count: int = 1) -> JobCost:
    """The most `count` tasks of `res` can cost on `site`, billed as the site's `charging` says: whole nodes, or
    the largest share of a node's GPUs, cores and memory the job holds (a 1-GPU job on a 4-GPU node: 1/4)."""
    node = site.node
    share, reason = 1.0, "whole nodes"
    if site.charging.by == "share":
        # GPUs first: on a tie they are the reason given.
        shares = [(res.gpus_per_node / node.gpus, f"{res.gpus_per_node} of {node.gpus} GPUs")] if node.gpus else []
        shares.append((res.tasks_per_node * res.cpus_per_task / node.cpus,
                       f"{res.tasks_per_node * res.cpus_per_task} of {node.cpus} cores"))
        if res.mem is not None and node.mem_mb:
            mem_mb = parse_mem_mb(res.mem)
            shares.append((1.0 if mem_mb == 0 else mem_mb / node.mem_mb, f"{res.mem} of {node.mem_mb}M memory"))
        share, reason = max(shares, key=lambda s: s[0])
        share = min(1.0, share)
    return JobCost(count=count, nodes=res.nodes, time_min=res.time_min, node_share=share, share_reason=reason,
                   gpus_per_node=res.gpus_per_node, node_cpus=node.cpus, unit=site.charging.unit)
