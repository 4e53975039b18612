"""What a run tells its user: log.txt, metrics.jsonl, TensorBoard, env.json (all written by global rank 0).

TensorBoard tags are grouped by prefix: `loss/total` and `loss/<term>`, `lr`, `grad_norm`,
`perf/samples_per_s`, `perf/samples_per_s_per_gpu`, `perf/mfu`, `perf/step_time_s`, `perf/data_wait_s`,
`perf/data_wait_frac`, `mem/...`; tasks add `val/...`, `test/...`, and images under `images/...`.
metrics.jsonl holds the same scalars, one JSON object per logged step, at full precision (a resumed run appends;
when a step appears twice, the later line is the one that counts). Files are group-readable (shared scratch).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch

from phileo.fsutil import atomic_write_json, make_group_readable

log = logging.getLogger("phileo.train")

# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs we expect to meet; MFU is reported against these.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "L40S": 362.0, "A40": 150.0, "V100": 125.0}


def peak_tflops(device: str, precision_bf16: bool, configured: float | None) -> float | None:
    """Peak TFLOP/s of one device for the MFU estimate: the configured figure, else the bf16 table for a known
    GPU in bf16, else None (CPU, fp32 on GPU, unknown GPU: MFU is not reported)."""
    if configured:
        return float(configured)
    if not device.startswith("cuda") or not precision_bf16:
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def memory_stats(device: str) -> dict[str, float]:
    """Peak memory so far: GPU allocated/reserved (GiB) on CUDA, and this process's peak RSS (GiB) always."""
    stats = {"mem/host_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.startswith("cuda"):
        dev = torch.device(device)
        stats["mem/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        stats["mem/gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2 ** 30
    return stats


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(run_dir: Path, global_rank: int) -> list[logging.Handler]:
    """Routes the "phileo.train" logger: rank 0 → run_dir/log.txt (appended) + stderr at INFO; other ranks →
    stderr at WARNING. Returns the handlers added (pass them to teardown_logging)."""
    logger = logging.getLogger("phileo.train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO if global_rank == 0 else logging.WARNING)
    handlers.append(stream)
    if global_rank == 0:
        path = run_dir / "log.txt"
        fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        fh.setLevel(logging.INFO)
        handlers.append(fh)
        make_group_readable(path)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RankFilter(global_rank))
        logger.addHandler(h)
    return handlers


def teardown_logging(handlers: list[logging.Handler]) -> None:
    logger = logging.getLogger("phileo.train")
    for h in handlers:
        logger.removeHandler(h)
        h.close()


class MetricsWriter:
    """Scalars, images and hparams for one run: TensorBoard + metrics.jsonl on global rank 0, nothing elsewhere.

    start_step: the step the run resumes after; TensorBoard discards events of later steps left by the
    interrupted launch (purge_step) so curves never fold back on themselves.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self._jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / "tensorboard"
            tb_dir.mkdir(parents=True, exist_ok=True)
            make_group_readable(tb_dir, directory=True)
            self.tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step > 0 else None)
        path = self.run_dir / "metrics.jsonl"
        self._jsonl = open(path, "a", encoding="utf-8")
        make_group_readable(path)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._jsonl.flush()

    def images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """CHW float images in [0, 1] (grids), under their tags (images/...)."""
        if not self.enabled or self.tb is None:
            return
        for tag, img in images.items():
            self.tb.add_image(tag, img.detach().float().clamp(0, 1).cpu(), step)

    def hparams(self, hparams: Mapping[str, Any], metric_tags: list[str]) -> None:
        """Writes the hparams record into the run's own event file (not a sub-folder, as add_hparams would),
        pointing the HPARAMS tab at the scalar tags `metric_tags`."""
        if not self.enabled or self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hparams_summary(clean, {t: 0.0 for t in metric_tags})
        writer = self.tb._get_file_writer()
        for s in (exp, ssi, sei):
            writer.add_summary(s)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            for f in (self.run_dir / "tensorboard").iterdir():
                make_group_readable(f)

    def close(self) -> None:
        if self.tb is not None:
            self.flush()
            self.tb.close()
            self.tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: scalars}, the later line winning when a step was logged twice (resume)."""
    out: dict[int, dict[str, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[int(rec.pop("step"))] = rec
    return out


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def host_record(device: str) -> dict[str, Any]:
    """This process's host, SLURM node name, pid and device (gathered from every rank into env.json)."""
    rec: dict[str, Any] = {"host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
                           "pid": os.getpid(), "device": device}
    if device.startswith("cuda"):
        rec["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return rec


def write_env_json(run_dir: Path, info: Any, ranks: list[dict[str, Any]], extra: Mapping[str, Any]) -> Path:
    """env.json: package versions, the distributed layout, every rank's host, SLURM and NCCL variables, the git
    commit of this code. Rewritten at every (re)start; log.txt keeps the history."""
    env_keys = [k for k in os.environ if k.startswith(("SLURM_", "NCCL_", "TORCH_", "CUDA_", "OMP_", "MASTER_"))
                or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "HOSTNAME")]
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in ("phileo-hpc", "torch", "deepspeed", "numpy", "h5py",
                                                       "submitit", "tensorboard")},
        "torch_cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "layout": {k: getattr(info, k) for k in ("global_rank", "world_size", "local_world_size", "num_nodes",
                                                 "master_addr", "master_port", "source", "backend")},
        "ranks": ranks,
        "environment": {k: os.environ[k] for k in sorted(env_keys)},
        **extra,
    }
    return atomic_write_json(run_dir / "env.json", record)


__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "memory_stats", "setup_logging", "teardown_logging",
           "MetricsWriter", "read_metrics", "host_record", "write_env_json"]
