"""Forward+backward throughput, peak memory and FLOPs of the PhilEO models, eager vs torch.compile, side by side.

    PYTHONPATH=. python benchmarks/models.py --threads 1    # CPU defaults: tiny models + 44M U-Net, eager and
                                                            # compile_blocks (~2 min warm, ~6 min cold, 2 cores)
    PYTHONPATH=. python benchmarks/models.py --table-only   # models table: parameters, GFLOPs (no compute)
    PYTHONPATH=. python benchmarks/models.py --device cuda --models all --downstream --dtype bf16 --channels-last

One training step = forward, a loss touching every output, backward (no optimizer: it is model-independent).
FLOPs/sample are forward FLOPs counted by torch.utils.flop_counter (2 per multiply-add; see README.md, "Models");
achieved FLOP/s use the usual 3× forward for forward+backward. Step memory = peak during one step minus the
memory held before it (weights; gradients are freed before each step), i.e. activations + gradients: CUDA
max_memory_allocated on GPU; on CPU the peak RSS (Linux /proc, peak reset per step) of one extra, untimed step
during which glibc is told (mallopt) to serve and return large blocks with mmap, so that RSS follows live memory;
timed steps run with large blocks kept in the heap, as a normal training process does.
CPU timings on a shared machine are noisy: eager and compiled steps are interleaved so their ratio is fair, and
with other processes running use --threads 1 (OpenMP barriers with a descheduled thread cost 10-30x).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phileo.fsutil import atomic_write_json  # noqa: E402
from phileo.models import create_downstream_model, create_model, list_models  # noqa: E402

# Published figures (shared/reference/ARCHITECTURE.md and *.state_dict.json), for the comparison columns.
PUBLISHED_PARAMS = {"phileo_cnn_44m": 43_667_714, "phileo_cnn_200m": 223_216_378, "phileo_vit_100m": 141_178_690}
PUBLISHED_GFLOPS = {"phileo_cnn_44m": 5.87, "phileo_cnn_200m": 82.2, "phileo_vit_100m:downstream": 388.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--models", default=None,
                   help="comma-separated registry names, or 'all' (default: CPU tiny + phileo_cnn_44m, GPU all)")
    p.add_argument("--downstream", action="store_true",
                   help="also time the fine-tuning model of each (U-Net / ViT-UPerNet, 11 outputs)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per step (default: CPU 4 for tiny models, 2 otherwise; GPU 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default CPU 3, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default CPU 1, GPU 5)")
    p.add_argument("--compile", default=None,
                   help="compiled modes besides eager, comma-separated: 'blocks' (model.compile_blocks(): each\n"
                        "CNN/transformer block compiled, minutes on a 2-core CPU), 'model' (torch.compile of the\n"
                        "whole model, ~5 min for the tiny U-Net on 2 cores), or 'none' (default: CPU blocks,\n"
                        "GPU blocks,model)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="bf16 = autocast (default CPU fp32, GPU bf16)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--table-only", action="store_true", help="print the models table (parameters, GFLOPs) and exit")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here (atomic)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.models is None:
        args.models = "all" if gpu else "phileo_cnn_tiny,phileo_vit_tiny,phileo_cnn_44m"
    args.models = list_models() if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(list_models()))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list_models()}")
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.compile = args.compile or ("blocks,model" if gpu else "blocks")
    args.compile = [] if args.compile == "none" else [c.strip() for c in args.compile.split(",")]
    if set(args.compile) - {"blocks", "model"}:
        p.error(f"--compile takes 'blocks', 'model' or 'none', got {args.compile}")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    return args


# ---- memory -------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class GlibcMalloc:
    """Switches glibc between serving large blocks from the heap (fast, RSS never drops) and from mmap (freed
    blocks go back to the OS, so peak RSS measures live memory). No-op where glibc is not available."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        try:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self.available = hasattr(self.libc, "mallopt") and hasattr(self.libc, "malloc_trim")
        except OSError:
            self.available = False

    def set_mmap_threshold(self, nbytes: int) -> None:
        if self.available:
            self.libc.mallopt(ctypes.c_int(self.M_MMAP_THRESHOLD), ctypes.c_int(nbytes))
            self.libc.malloc_trim(ctypes.c_size_t(0))

    def heap_mode(self) -> None:
        self.set_mmap_threshold(32 << 20)  # glibc's own ceiling for its dynamic threshold (64-bit)

    def measure_mode(self) -> None:
        self.set_mmap_threshold(128 << 10)  # glibc's initial threshold


MALLOC = GlibcMalloc()


class PeakMemory:
    """Peak memory of the timed region above what was held before it: CUDA allocator, or RSS (VmHWM) on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS counter of this process (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self.resettable = True
            except OSError:
                self.resettable = False
            self.rss_before = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.allocated_before
            self.kind = "cuda_max_allocated_growth"
        else:
            hwm = _proc_status_bytes("VmHWM")
            ok = self.resettable and hwm is not None and self.rss_before is not None and MALLOC.available
            self.peak_bytes = hwm - self.rss_before if ok else None
            self.kind = "cpu_peak_rss_growth" if ok else "unavailable"


# ---- timing -------------------------------------------------------------------------------------------------

def step_fn(model, x, dtype: str):
    device_type = x.device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x)
            outs = out.values() if isinstance(out, dict) else [out]
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_one(name: str, downstream: bool, args) -> list[dict]:
    device = torch.device(args.device)
    tiny = name.endswith("_tiny")
    batch = args.batch_size or (16 if device.type == "cuda" else (4 if tiny else 2))

    def build():
        torch.manual_seed(0)  # every mode gets the same weights
        m = create_downstream_model(name, 11) if downstream else create_model(name)
        m = m.to(device).train()
        if args.grad_checkpointing:
            m.set_grad_checkpointing(True)
        return m.to(memory_format=torch.channels_last) if args.channels_last else m

    model = build()
    x = torch.rand(batch, 10, 128, 128, device=device) * 0.6
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    flops = model.flops_per_sample()
    label = f"{name}:downstream" if downstream else name

    # mode -> (callable, module holding the parameters); compile(model) wraps the eager module itself,
    # compile(blocks) compiles the blocks of a second instance in place.
    modes = {"eager": (model, model)}
    if "blocks" in args.compile:
        regional = build().compile_blocks()
        modes["compile(blocks)"] = (regional, regional)
    if "model" in args.compile:
        modes["compile(model)"] = (torch.compile(model), model)
    steps = {m: step_fn(fn, x, args.dtype) for m, (fn, _) in modes.items()}
    first_s = {}
    for mode, step in steps.items():  # first call (compilation for the compiled modes), then warm-up
        t0 = time.perf_counter()
        step()
        sync(device)
        first_s[mode] = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        modes[mode][1].zero_grad(set_to_none=True)
    times = {m: [] for m in modes}
    for i in range(args.steps):  # interleaved so that load changes on a shared machine hit both modes alike
        for mode, step in steps.items():
            modes[mode][1].zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[mode].append(time.perf_counter() - t0)
    peaks, mem_kind = {}, None
    for mode, step in steps.items():  # one untimed step per mode for memory
        for _, holder in modes.values():  # only this mode's gradients may be alive
            holder.zero_grad(set_to_none=True)
        if device.type == "cpu":
            MALLOC.measure_mode()
        with PeakMemory(device) as mem:
            step()
        if device.type == "cpu":
            MALLOC.heap_mode()
        peaks[mode], mem_kind = mem.peak_bytes, mem.kind
    rows = []
    for mode in modes:
        step_s = statistics.median(times[mode])
        rows.append({
            "model": label, "mode": mode, "device": str(device), "dtype": args.dtype,
            "channels_last": args.channels_last, "grad_checkpointing": args.grad_checkpointing, "batch": batch,
            "params": model.num_params(), "weights_mib": sum(p.numel() * p.element_size()
                                                              for p in model.parameters()) / 2**20,
            "fwd_gflops_per_sample": flops / 1e9,
            "step_s_median": step_s, "step_s_all": times[mode], "samples_per_s": batch / step_s,
            "achieved_gflops_per_s": 3 * flops * batch / step_s / 1e9,
            "peak_mem_mib": None if peaks[mode] is None else peaks[mode] / 2**20, "mem_kind": mem_kind,
            "first_call_s": first_s[mode],
        })
    del model, modes, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---- reporting ----------------------------------------------------------------------------------------------

def models_table() -> tuple[str, list[dict]]:
    rows = []
    for name in list_models():
        with torch.device("meta"):
            pre, down = create_model(name), create_downstream_model(name, 11)
        rows.append({"model": name, "params": pre.num_params(), "gflops": pre.flops_per_sample() / 1e9,
                     "published_params": PUBLISHED_PARAMS.get(name), "published_gflops": PUBLISHED_GFLOPS.get(name),
                     "downstream_params": down.num_params(), "downstream_gflops": down.flops_per_sample() / 1e9,
                     "published_downstream_gflops": PUBLISHED_GFLOPS.get(f"{name}:downstream")})
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = ["| model | parameters | fwd GFLOPs/sample | published | fine-tuning model | its parameters "
             "| its GFLOPs | published |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        kind = "U-Net, 11 out" if r["model"].startswith("phileo_cnn") else "ViT-UPerNet, 11 out"
        pub = " / ".join(x for x in (fmt(r["published_params"], ","), fmt(r["published_gflops"], ".2f")) if x)
        lines.append(f"| {r['model']} | {r['params']:,} | {r['gflops']:.2f} | {pub} | {kind} | "
                     f"{r['downstream_params']:,} | {r['downstream_gflops']:.2f} | "
                     f"{fmt(r['published_downstream_gflops'], '.1f')} |")
    return "\n".join(lines), rows


def results_table(rows: list[dict]) -> str:
    lines = ["| model | batch | mode | samples/s | step ms | weights MiB | step mem MiB | fwd GFLOPs/sample "
             "| achieved GFLOP/s | first call s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['samples_per_s']:.2f} | "
                     f"{1000 * r['step_s_median']:.0f} | {r['weights_mib']:.0f} | {mem} | "
                     f"{r['fwd_gflops_per_sample']:.2f} | "
                     f"{r['achieved_gflops_per_s']:.1f} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    MALLOC.heap_mode()
    if args.threads:
        torch.set_num_threads(args.threads)
    table, table_rows = models_table()
    print("## Models\n")
    print(table)
    if args.table_only:
        return 0
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"\n## Forward+backward ({json.dumps(env)}; dtype {args.dtype}, channels_last {args.channels_last}, "
          f"grad_checkpointing {args.grad_checkpointing}, {args.steps} timed steps, median)\n", flush=True)
    rows = []
    for name in args.models:
        for downstream in ((False, True) if args.downstream else (False,)):
            new = benchmark_one(name, downstream, args)
            rows += new
            for r in new:
                print(f"  {r['model']} {r['mode']}: {r['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)
    print(results_table(rows))
    if hasattr(os, "getloadavg"):
        print(f"\nload average (1 min) at start {env['load_average_1min']:.1f}, at end {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
    if args.out:
        atomic_write_json(args.out, {"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                     "models": table_rows, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
