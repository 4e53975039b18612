"""The distributed layout of this process, read from the environment, and the process group.

Three ways a training process is started, recognised in this order (`launcher()`, the one rule):

1. torchrun (or anything that sets its variables): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, and
   optionally LOCAL_WORLD_SIZE and GROUP_RANK (the node rank). Inside an srun step these count only when
   torchrun itself started this process (TORCHELASTIC_RUN_ID, `srun torchrun ...`): a RANK merely inherited
   from the submitting shell or an outer launcher would otherwise give every srun task the same wrong rank.
2. srun: SLURM_PROCID (global rank), SLURM_LOCALID (local rank), SLURM_NTASKS (world size), SLURM_NODEID,
   SLURM_NNODES, SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE; the master is the first host of the step's (or
   job's) node list and the port is derived from SLURM_JOB_ID, so all tasks agree without talking.
   MASTER_ADDR / MASTER_PORT already in the environment win (a user pinning them).
3. Neither: one process, rank 0 of 1.

`init_distributed()` also exports the torchrun variables for layouts 2 and 3, because DeepSpeed reads them
(it asserts LOCAL_RANK and otherwise tries MPI discovery).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.distributed as torch_dist

log = logging.getLogger("phileo.train")

# Ports derived from a job id land in 20000-29999: below the Linux ephemeral range (32768-60999), so a port
# picked for a job never collides with an outgoing connection's local port.
_PORT_BASE = 20000
_PORT_SPAN = 10000


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    global_rank/world_size: over all processes; local_rank/local_world_size: within this node;
    node_rank/num_nodes: which node (the data layer reads that node's chunks). source: "torchrun", "slurm" or
    "single". device is filled in by init_distributed().
    """

    global_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    backend: str = "gloo"
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that writes logs, TensorBoard and shared files)."""
        return self.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a SLURM host list ("node[1-3,7]", "gpu[001-002],login1", "a1,b2") into host names.

    Zero padding of ranges is kept ("gpu[001-002]" → gpu001, gpu002). Refuses a malformed list with the input in
    the message.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        if "[" in suffix:
            raise ValueError(f"cannot parse SLURM host list {hostlist!r}: more than one bracket in {item!r}")
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot parse SLURM host list {hostlist!r}: bad range {part!r}")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
    if not hosts:
        raise ValueError(f"empty SLURM host list {hostlist!r}")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expands SLURM's tasks-per-node notation ("4(x2),3" → [4, 4, 3])."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def port_for_job(job_id: str | int) -> int:
    """The rendezvous port all tasks of SLURM job `job_id` derive on their own (20000-29999)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return _PORT_BASE + int(digits) % _PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {key} is not set; it is needed to place this process")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None


def in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an srun step. Only there: the batch script itself also has
    SLURM_PROCID=0 and SLURM_NTASKS=N, and a process started there directly must not wait for N-1 peers."""
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def launcher(env: Mapping[str, str] | None = None) -> str:
    """Who placed this process: "torchrun", "slurm" or "single" (see the module docstring for the rule)."""
    env = os.environ if env is None else env
    has_torchrun_vars = "RANK" in env and "WORLD_SIZE" in env
    if has_torchrun_vars and ("TORCHELASTIC_RUN_ID" in env or not in_srun_step(env)):
        return "torchrun"
    if in_srun_step(env):
        return "slurm"
    return "single"


def detect_layout(env: Mapping[str, str] | None = None) -> DistInfo:
    """Reads the distributed layout from `env` (default os.environ) without touching anything.

    Returns a DistInfo (device/backend not yet chosen). Refuses inconsistent variables (rank >= world size, a
    world size that is not a whole number of nodes' tasks) with a message naming them.
    """
    env = os.environ if env is None else env
    source = launcher(env)
    if source == "torchrun":
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", 0)
        # Without LOCAL_WORLD_SIZE (a hand-rolled launcher) all ranks are taken to share one node.
        local_world = max(1, _int(env, "LOCAL_WORLD_SIZE", world))
        node_rank = _int(env, "GROUP_RANK", rank // local_world)
        num_nodes = _int(env, "GROUP_WORLD_SIZE", max(1, world // local_world))
        info = DistInfo(global_rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                        node_rank=node_rank, num_nodes=num_nodes,
                        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                        master_port=_int(env, "MASTER_PORT", 29500), source="torchrun")
    elif source == "slurm":
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        node_rank = _int(env, "SLURM_NODEID", 0)
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = expand_tasks_per_node(tpn)[node_rank] if tpn else max(1, world // num_nodes)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1")
        port = _int(env, "MASTER_PORT", port_for_job(env.get("SLURM_JOB_ID", "0")))
        info = DistInfo(global_rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
                        local_world_size=local_world, node_rank=node_rank, num_nodes=num_nodes,
                        master_addr=master, master_port=port, source="slurm")
    else:
        info = DistInfo(master_port=_int(env, "MASTER_PORT", 0) or free_port())
    if not 0 <= info.global_rank < info.world_size:
        raise RuntimeError(f"rank {info.global_rank} is outside world size {info.world_size} "
                           f"(source: {info.source}); check the launcher's rank variables")
    if not 0 <= info.local_rank < info.local_world_size:
        raise RuntimeError(f"local rank {info.local_rank} is outside the node's {info.local_world_size} tasks "
                           f"(source: {info.source}); check LOCAL_RANK/LOCAL_WORLD_SIZE or SLURM_LOCALID/"
                           f"SLURM_TASKS_PER_NODE")
    return info


def free_port() -> int:
    """A TCP port free on this host right now (for single-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(info: DistInfo, device: str = "auto") -> tuple[str, str]:
    """(device, backend): cuda:<local_rank mod visible GPUs> with NCCL when a GPU is there (or asked for),
    cpu with gloo otherwise. Refuses device="cuda" on a machine without one."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no GPU (CUDA_VISIBLE_DEVICES, driver, a CPU-only "
                               "torch build?); use train.device=auto or cpu")
        # srun --gpus-per-task shows each task one GPU; --gres=gpu:4 shows all four: modulo covers both.
        return f"cuda:{info.local_rank % torch.cuda.device_count()}", "nccl"
    return "cpu", "gloo"


def init_distributed(device: str = "auto", timeout_s: int = 900, env: Mapping[str, str] | None = None,
                     force_process_group: bool = False) -> DistInfo:
    """Places this process (see module docstring), selects its device, and joins the process group.

    Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (DeepSpeed needs them).
    The process group (NCCL on GPU, gloo on CPU, with `timeout_s` so a dead peer ends the others instead of
    hanging them) is created when the world has more than one process, or always with force_process_group
    (DeepSpeed wants one even alone). An already initialised group is reused. Returns the DistInfo.
    """
    info = detect_layout(env)
    dev, backend = choose_device(info, device)
    info = replace(info, device=dev, backend=backend)
    os.environ.update({"RANK": str(info.global_rank), "WORLD_SIZE": str(info.world_size),
                       "LOCAL_RANK": str(info.local_rank), "LOCAL_WORLD_SIZE": str(info.local_world_size),
                       "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port)})
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    if torch_dist.is_available() and not torch_dist.is_initialized() and (info.distributed or force_process_group):
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(dev)
            # A failed or timed-out NCCL collective aborts the communicator and raises on every rank, instead of
            # leaving the others blocked in the kernel (the default in recent torch; set in case a site unsets it).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch_dist.init_process_group(backend=backend, init_method="env://", rank=info.global_rank,
                                      world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                      **kwargs)
        log.debug("process group up: %s rank %d/%d via %s:%d", backend, info.global_rank, info.world_size,
                  info.master_addr, info.master_port)
    return info


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    """All ranks wait here (no-op without a process group)."""
    if is_initialized():
        torch_dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max"); a no-op without a process group. Returns the tensor."""
    if is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if not is_initialized() or torch_dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized() or torch_dist.get_world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy_process_group() -> None:
    """Leaves the process group if one is up (safe to call twice)."""
    if is_initialized():
        torch_dist.destroy_process_group()


__all__ = ["DistInfo", "detect_layout", "launcher", "in_srun_step", "init_distributed", "choose_device",
           "expand_hostlist", "expand_tasks_per_node", "port_for_job", "free_port", "barrier", "all_reduce_",
           "all_gather_object", "broadcast_object", "destroy_process_group", "is_initialized"]
