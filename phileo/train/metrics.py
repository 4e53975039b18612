"""What a run tells its user: log.txt, metrics.jsonl, TensorBoard, env.json (all written by global rank 0).

TensorBoard tags are grouped by prefix: `loss/total` and `loss/<term>`, `lr`, `grad_norm`,
`perf/samples_per_s`, `perf/samples_per_s_per_gpu`, `perf/mfu`, `perf/step_time_s`, `perf/data_wait_s`,
`perf/data_wait_frac`, `mem/...`, and `loss_window/total` and `loss_window/<term>` (the mean of the last
run.log_every_steps steps: what log.txt prints); tasks add `val/...`, `test/...`, images under `images/...`, and
scalars of their start-up data checks at the start step (pretraining: `data/bad_chunks`).
metrics.jsonl holds the same scalars, one JSON object per logged step, at full precision (a resumed run appends;
when a step appears twice, the later line is the one that counts, and an evaluation's line repeats the training
scalars of its step so that it holds them all). Files are group-readable (shared scratch).
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


class ThroughputWindow:
    """Step times and data waits since the last logged step, turned into the perf/ and mem/ scalars."""

    def __init__(self, world_batch: int, world_size: int, device: str, flops_per_sample: float | None,
                 peak_tflops_per_device: float | None):
        self.world_batch, self.world_size, self.device = world_batch, world_size, device
        self.flops, self.peak = flops_per_sample, peak_tflops_per_device
        self.reset()

    def reset(self) -> None:
        self.steps, self.time_s, self.data_s = 0, 0.0, 0.0

    def add(self, step_time_s: float, data_wait_s: float) -> None:
        self.steps += 1
        self.time_s += step_time_s
        self.data_s += data_wait_s

    def scalars(self) -> dict[str, float]:
        """Throughput, step time, data wait, MFU (when the FLOPs and the peak are known) and peak memory of the
        window; starts a new window."""
        steps, secs = max(self.steps, 1), max(self.time_s, 1e-9)
        samples_per_s = self.world_batch * steps / secs
        per_gpu = samples_per_s / self.world_size
        out = {"perf/samples_per_s": samples_per_s, "perf/samples_per_s_per_gpu": per_gpu,
               "perf/step_time_s": secs / steps, "perf/data_wait_s": self.data_s / steps,
               "perf/data_wait_frac": self.data_s / secs}
        if self.flops and self.peak:
            out["perf/mfu"] = self.flops * per_gpu / (self.peak * 1e12)
        out.update(memory_stats(self.device))
        self.reset()
        return out


class LossWindow:
    """The losses of the last `size` steps (run.log_every_steps): what log.txt, the progress line and the final
    loss report is their mean, not one noisy batch. Saved in every checkpoint so a resumed run reports exactly
    what the uninterrupted one would have."""

    def __init__(self, size: int):
        self.size = max(int(size), 1)
        self.steps: list[tuple[float, dict[str, float]]] = []

    def add(self, loss: float, terms: Mapping[str, float]) -> None:
        self.steps = (self.steps + [(float(loss), {k: float(v) for k, v in terms.items()})])[-self.size:]

    def mean(self) -> dict[str, float]:
        """{"loss_window/total": ..., "loss_window/<term>": ...} over the window; {} before the first step."""
        if not self.steps:
            return {}
        n = len(self.steps)
        out = {"loss_window/total": sum(s[0] for s in self.steps) / n}
        for k in self.steps[-1][1]:
            out[f"loss_window/{k}"] = sum(s[1].get(k, 0.0) for s in self.steps) / n
        return out

    @property
    def total(self) -> float | None:
        return self.mean().get("loss_window/total")

    def state_dict(self) -> list[Any]:
        return [[loss, terms] for loss, terms in self.steps]

    def load_state_dict(self, state: list[Any] | None) -> None:
        self.steps = [(float(loss), dict(terms)) for loss, terms in (state or [])][-self.size:]


def fmt4(x: float | None) -> str:
    """A loss for people: 4 significant figures ("n/a" for None)."""
    return "n/a" if x is None else f"{x:.4g}"


class MetricsLogger:
    """Everything a run writes for its user, in one place: log.txt (through the "phileo.train" logger),
    metrics.jsonl and TensorBoard, all on global rank 0 (other ranks log warnings to stderr and write nothing).

        with MetricsLogger(run_dir, global_rank, tensorboard=True) as metrics:   # opens log.txt
            metrics.open_writers(start_step)    # metrics.jsonl + TensorBoard, once the resume step is known
            metrics.log_step(step, total, {"loss/total": ..., "lr": ..., ...})

    start_step: the step the run resumes after; TensorBoard discards events of later steps left by the
    interrupted launch (purge_step) so curves never fold back on themselves.
    """

    def __init__(self, run_dir: str | os.PathLike, global_rank: int, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.global_rank = global_rank
        self.enabled = global_rank == 0
        self.tensorboard = tensorboard
        self.tb = None
        self._jsonl = None
        self._last_line: tuple[int, dict[str, float]] = (-1, {})  # (step, scalars) of the newest jsonl line
        self._handlers: list[logging.Handler] = []
        self._at_start: dict[str, float] = {}  # scalars known before the writers open (at_start)

    def __enter__(self) -> "MetricsLogger":
        self._handlers = setup_logging(self.run_dir, self.global_rank)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        teardown_logging(self._handlers)
        self._handlers = []

    def at_start(self, values: Mapping[str, float] | None) -> None:
        """Scalars known before the writers open (the task's data checks: data/bad_chunks): open_writers logs
        them at the start step, merged into that step's line (a resumed run's last step keeps its scalars)."""
        self._at_start.update(values or {})

    def open_writers(self, start_step: int = 0) -> None:
        """Opens metrics.jsonl (appended) and the TensorBoard writer (global rank 0), then logs the at_start
        scalars at `start_step`."""
        if not self.enabled or self._jsonl is not None:
            return
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / "tensorboard"
            tb_dir.mkdir(parents=True, exist_ok=True)
            make_group_readable(tb_dir, directory=True)
            self.tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step > 0 else None)
        path = self.run_dir / "metrics.jsonl"
        self._jsonl = open(path, "a", encoding="utf-8")
        make_group_readable(path)
        if self._at_start:
            self.scalars(start_step, self._at_start, merge=True)
            self._at_start = {}

    def scalars(self, step: int, values: Mapping[str, float | None], merge: bool = False) -> None:
        """Logs `values` (None values are skipped) at `step`. merge=True: more scalars for a step already
        logged; metrics.jsonl keeps the later line of a step logged twice, so the line written repeats the
        earlier scalars of that step, while TensorBoard gets only the new tags."""
        if not self.enabled or self._jsonl is None:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        line = clean
        if merge:
            last_step, last = self._last_line
            if last_step == step:
                earlier = last
            elif last_step < 0:  # nothing written by this launch yet: the step may be in an earlier one's lines
                earlier = {k: v for k, v in read_metrics(self.run_dir).get(step, {}).items() if k != "time"}
            else:  # not logged by this launch; a line an earlier launch wrote for it is stale
                earlier = {}
            line = {**earlier, **clean}
        self._last_line = (step, line)
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **line}) + "\n")
        self._jsonl.flush()

    def log_step(self, step: int, total_steps: int, values: Mapping[str, float | None]) -> None:
        """The training scalars of one step (loss/total, lr, grad_norm, perf/..., mem/...) to metrics.jsonl,
        TensorBoard and one line of log.txt."""
        self.scalars(step, values)
        if not self.enabled:
            return
        grad_norm = values.get("grad_norm")
        mem = values.get("mem/gpu_max_allocated_gib", values["mem/host_rss_peak_gib"])
        # The printed loss is the window's mean (4 significant figures); metrics.jsonl keeps both at full precision.
        log.info("step %d/%d | loss %.4g | lr %.3g | grad_norm %s | %.1f samples/s (%.1f per process) | "
                 "data wait %.0f%% | mem %.2f GiB%s", step, total_steps,
                 values.get("loss_window/total", values["loss/total"]), values["lr"],
                 "n/a" if grad_norm is None else f"{grad_norm:.3g}",
                 values["perf/samples_per_s"], values["perf/samples_per_s_per_gpu"],
                 100 * values["perf/data_wait_frac"], mem,
                 f" | MFU {100 * values['perf/mfu']:.1f}%" if "perf/mfu" in values else "")

    def log_eval(self, step: int, values: Mapping[str, float] | None) -> None:
        """Evaluation scalars (val/..., test/...) of a step to metrics.jsonl (merged with the step's training
        scalars, see scalars()), TensorBoard and one line of log.txt."""
        if not values:
            return
        self.scalars(step, values, merge=True)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.6g}" for k, v in values.items()))

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
        """Closes metrics.jsonl and TensorBoard (log.txt stays open until the `with` block ends)."""
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
           "ThroughputWindow", "LossWindow", "fmt4", "MetricsLogger", "read_metrics", "host_record", "write_env_json"]
