"""Engine overhead: the Trainer's step time vs a bare PyTorch loop, same model, same batch, side by side.

    python benchmarks/engine.py [--model phileo_cnn_tiny] [--img-size 128] [--batch-size 4] [--steps 16]

Both sides do the same work per step: two corrupted views of the batch, one forward pass on the stacked views,
the foundation loss, backward, gradient clipping, AdamW, the LR schedule. The bare loop is that and nothing else,
on a batch already in memory. The engine adds its DataLoader (in-memory dataset, no worker processes, so its
cost is counted in the step), the per-step loss/flag reduction, NaN checks, timing, metrics.jsonl and TensorBoard
(every --log-every steps): everything the real runs do except checkpoints (--checkpoint-every to include them).

Side by side means interleaved, step by step: every time the engine is about to start a step, one step of the
bare loop (its own model copy, optimizer and schedule) runs first and is timed. The engine's step is the time
from the start of its forward pass to the start of its next one, minus the bare step run in between, so the
engine's bookkeeping between steps is inside it. Both are timed in wall-clock and in CPU time of the process
(all threads: TensorBoard's writer thread counts against the engine). Interleaving makes both see the same
machine: on a shared machine, separate runs see different loads and their ratio is noise. Figures are medians
over all timed steps of all rounds. One process, CPU, `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phileo.config import apply_overrides  # noqa: E402
from phileo.train.config import PretrainConfig  # noqa: E402
from phileo.train.engine import Trainer  # noqa: E402
from phileo.train.loss import FoundationLoss, make_views  # noqa: E402
from phileo.train.optim import build_optimizer, build_scheduler  # noqa: E402
from phileo.train.pretrain import FoundationTask  # noqa: E402


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class MemoryPatches(Dataset):
    """`n` fixed samples in the PretrainDataset item format, held in memory (the benchmark measures the engine,
    not the storage)."""

    def __init__(self, n: int, img_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.rand(n, 10, img_size, img_size, generator=g)
        self.coords = torch.rand(n, 4, generator=g)
        self.cloud = torch.softmax(torch.randn(n, 4, generator=g), -1)

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, i: int):
        return {"image": self.image[i], "coords": self.coords[i], "cloud_fraction": self.cloud[i]}


class BareLoop:
    """The same training as a plain loop, one step per call (seeded like the engine, same ops)."""

    def __init__(self, cfg, dataset):
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.model = FoundationTask(cfg).build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.loss_fn = FoundationLoss(cfg.loss)
        b = cfg.data.batch_size
        self.batch = {k: torch.stack([dataset[i][k] for i in range(b)]) for k in ("image", "coords",
                                                                                  "cloud_fraction")}
        self.step_no = 0

    def step(self) -> None:
        g = torch.Generator().manual_seed(self.step_no)
        self.step_no += 1
        views, targets = make_views(self.batch["image"], g, erase_fraction=tuple(self.cfg.loss.erase_fraction))
        outputs = self.model(views)
        loss, _ = self.loss_fn(outputs, {"images": targets, "coords": self.batch["coords"],
                                         "cloud_fraction": self.batch["cloud_fraction"]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # a loop that never looks at its loss is not a training loop


class InterleavedTask(FoundationTask):
    """The pretraining task on MemoryPatches; before each engine step it runs and times one bare-loop step."""

    def __init__(self, cfg, dataset, bare: BareLoop):
        super().__init__(cfg)
        self.dataset, self.bare = dataset, bare
        self.engine_starts: list[tuple[float, float]] = []
        self.bare_times: list[tuple[float, float]] = []

    def train_dataset(self, info):
        return self.dataset

    def forward(self, model, batch, ctx):
        if ctx.micro_step == 0:
            t0 = now()
            self.bare.step()
            t1 = now()
            self.bare_times.append((t1[0] - t0[0], t1[1] - t0[1]))
            self.engine_starts.append(t1)
        return super().forward(model, batch, ctx)

    def step_times(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """(engine, bare) per step as (wall s, CPU s); engine step i excludes the bare step run before i+1."""
        engine = []
        for i in range(len(self.engine_starts) - 1):
            a, b, bare_next = self.engine_starts[i], self.engine_starts[i + 1], self.bare_times[i + 1]
            engine.append((b[0] - a[0] - bare_next[0], b[1] - a[1] - bare_next[1]))
        return engine, self.bare_times[:len(engine)]


def run_round(cfg, dataset) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    task = InterleavedTask(cfg, dataset, BareLoop(cfg, dataset))
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = apply_overrides(cfg, [f"run.dir={run_dir}"])
        task.cfg = cfg
        result = Trainer(cfg, task).fit()
        if result.status != "completed":
            raise RuntimeError(f"engine run ended {result.status}: {result.message}")
    return task.step_times()


def _med(times: list[tuple[float, float]], which: int) -> float:
    """Median in ms of the wall (0) or CPU (1) times."""
    return statistics.median(t[which] for t in times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="phileo_cnn_tiny")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="steps per round (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, OpenMP spin-waits turn contention into noise)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--checkpoint-every", type=int, default=10 ** 9)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = apply_overrides(PretrainConfig(), [
        f"model.name={args.model}", f"model.overrides={{img_size: {args.img_size}}}",
        f"data.patch_size={args.img_size}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
        f"train.steps={args.steps}", "train.precision=fp32", "train.device=cpu", "optim.warmup_steps=2",
        f"run.log_every_steps={args.log_every}", "run.image_every_steps=0",
        f"checkpoint.every_steps={args.checkpoint_every}", "run.dir=unused"])
    dataset = MemoryPatches(4 * args.batch_size, args.img_size)
    engine_times, bare_times = [], []
    for r in range(args.rounds):
        e, b = run_round(cfg, dataset)
        e, b = e[args.warmup:], b[args.warmup:]
        engine_times += e
        bare_times += b
        print(f"round {r + 1}: engine {_med(e, 0):.1f} ms wall / {_med(e, 1):.1f} ms CPU per step, "
              f"bare {_med(b, 0):.1f} ms wall / {_med(b, 1):.1f} ms CPU", file=sys.stderr)
    figures = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
               "threads": args.threads, "rounds": args.rounds, "timed_steps_each": len(engine_times),
               "engine_wall_ms_per_step": round(_med(engine_times, 0), 2),
               "bare_wall_ms_per_step": round(_med(bare_times, 0), 2),
               "engine_cpu_ms_per_step": round(_med(engine_times, 1), 2),
               "bare_cpu_ms_per_step": round(_med(bare_times, 1), 2),
               "torch": torch.__version__}
    figures["overhead_wall_pct"] = round(100 * (_med(engine_times, 0) / _med(bare_times, 0) - 1), 2)
    figures["overhead_cpu_pct"] = round(100 * (_med(engine_times, 1) / _med(bare_times, 1) - 1), 2)
    print(json.dumps(figures, indent=2))
    print(f"\n| model | batch | engine ms/step (wall / CPU) | bare loop ms/step (wall / CPU) | overhead (wall / CPU) |"
          f"\n|---|---|---|---|---|\n| {args.model} @ {args.img_size} px | {args.batch_size} (×2 views) | "
          f"{figures['engine_wall_ms_per_step']:.1f} / {figures['engine_cpu_ms_per_step']:.1f} | "
          f"{figures['bare_wall_ms_per_step']:.1f} / {figures['bare_cpu_ms_per_step']:.1f} | "
          f"{figures['overhead_wall_pct']:+.1f} % / {figures['overhead_cpu_pct']:+.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
