"""Fine-tuning end to end on tiny synthetic bench data: every task trains, test metrics are those of the best
weights on the whole test set, early stopping, resume after a stop, frozen encoders, init from checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from phileo.train import checkpoint as ckpt_io

from phileo.config import ConfigError, apply_overrides
from phileo.bench.data import BenchDataset, worldcover_to_class
from phileo.bench.synthetic import make_bench_data
from phileo.bench.finetune import FinetuneConfig, resolve_init, run_finetuning

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_bench_data(root, regions=("europe", "east-africa", "japan"), patches_per_file=4, val_patches_per_file=2,
                    patch_size=SIZE)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(data, run_dir, **over):
    base = {"data.root": str(data), "data.task": "building", "data.n_shot": 4, "data.batch_size": 4,
            "data.num_workers": 0, "model.name": "phileo_cnn_tiny", "model.overrides": {"img_size": SIZE},
            "finetune.max_epochs": 3, "finetune.warmup_epochs": 1, "finetune.checkpoint_every_epochs": 1,
            "run.dir": str(run_dir), "run.tensorboard": False}
    base.update(over)
    return apply_overrides(FinetuneConfig(), base)


def _independent_test_metrics(data, task, state):
    """Test metrics recomputed here from best_model.pt, every test patch, plain numpy: no shared code path."""
    from phileo.models import create_downstream_model

    model = create_downstream_model("phileo_cnn_tiny", num_outputs=11 if task == "lc" else 1, img_size=SIZE)
    model.load_state_dict(state)
    model.eval()
    ds = BenchDataset.test_set(data, task)
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            preds.append(model(item["image"][None])[0].numpy())
            labels.append(ds.read(i)[1])
    pred, raw = np.stack(preds), np.stack(labels)
    if task == "lc":
        cls = worldcover_to_class(raw[..., 0])
        keep = cls >= 0
        return {"overall_accuracy": float((pred.argmax(1)[keep] == cls[keep]).mean()), "n_pixels": int(keep.sum())}
    err = pred[:, 0].astype(np.float64) - raw[..., 0]
    return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()), "n_pixels": err.size}


@pytest.mark.parametrize("task", ["roads", "building", "lc"])
def test_each_task_trains_and_reports_best_weights_on_the_whole_test_set(data, tmp_path, task):
    out = run_finetuning(_cfg(data, tmp_path / "run", **{"data.task": task}))
    assert out.status == "completed"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "completed" and result["task"] == task and result["epochs_run"] == 3
    # The exact config (with the steps derived from epochs) and the n-shot index it used, by checksum.
    assert result["config"]["data"]["task"] == task and result["config"]["train"]["steps"] == 3 * result[
        "steps_per_epoch"]
    index = Path(result["nshot_index"]["path"])
    assert index.parent == data / "nshot_indices"
    import hashlib
    assert result["nshot_index"]["sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
    assert result["n_train"] == len(json.loads(index.read_text())["train"])
    # Validation every epoch; the best (lowest) one is what was kept and tested.
    hist = result["val_history"]
    assert [h[0] for h in hist] == [1, 2, 3]
    assert result["best_val_loss"] == min(h[1] for h in hist)
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=False)
    assert best["step"] == result["best_step"]
    ref = _independent_test_metrics(data, task, best["model"])
    assert result["test"]["n_pixels"] == ref["n_pixels"]
    for k, v in ref.items():
        assert result["test"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    if task == "lc":
        assert {"miou", "macro_f1", "per_class_precision"} <= set(result["test"])
    else:
        assert result["test"]["rmse"] == pytest.approx(result["test"]["mse"] ** 0.5)
        assert result["test_skipped_files"] == ([{"file": "japan_0_test_s2.npy", "reason":
                                                  "no japan_0_test_label_roads.npy"}] if task == "roads" else [])
    # metrics.jsonl (TensorBoard's twin) carries the validation curve and the test metrics.
    from phileo.train.metrics import read_metrics
    logged = read_metrics(tmp_path / "run")
    assert [s for s, m in sorted(logged.items()) if "val/loss" in m] == [e * result["steps_per_epoch"]
                                                                        for e in (1, 2, 3)]
    headline = "test/overall_accuracy" if task == "lc" else "test/rmse"
    assert logged[result["steps"]][headline] == pytest.approx(result["test"][headline[5:]])
    # Learning happened: the validation loss fell from the first epoch to the best.
    assert result["best_val_loss"] < hist[0][1]
    # Done is done: a second call returns the stored result without training again.
    again = run_finetuning(_cfg(data, tmp_path / "run", **{"data.task": task}))
    assert again.message == "already complete" and again.result == result


def test_early_stopping_keeps_the_best_epoch(data, tmp_path):
    # min_delta so large that nothing after the first validation counts as better: stop after `patience` epochs.
    out = run_finetuning(_cfg(data, tmp_path / "run", **{"finetune.max_epochs": 20, "finetune.patience_epochs": 2,
                                                         "finetune.min_delta": 1e9, "run.tensorboard": True,
                                                         "run.log_every_steps": 1}))
    r = out.result
    assert r["stopped_early"] is True and r["epochs_run"] == 3 and r["best_epoch"] == 1
    assert r["best_val_loss"] == r["val_history"][0][1]
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=False)
    assert best["step"] == r["steps_per_epoch"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"loss/total", "lr", "val/loss", "test/rmse", "test/f1"} <= tags
    assert [e.step for e in ev.Scalars("test/rmse")] == [r["steps"]]
    assert ev.Scalars("test/rmse")[0].value == pytest.approx(r["test"]["rmse"], rel=1e-6)


def test_a_stopped_run_resumes_to_the_same_result(data, tmp_path):
    # Kept (option) so that the crash below can be simulated: by default a finished run drops its checkpoint.
    whole = run_finetuning(_cfg(data, tmp_path / "whole", **{"checkpoint.keep_after_completion": True}))
    # Stop after 4 steps (as at a pre-timeout signal), then run again in the same folder.
    first = run_finetuning(_cfg(data, tmp_path / "split", **{"train.max_steps_per_launch": 4}))
    assert first.status == "preempted" and not (tmp_path / "split" / "result.json").exists()
    second = run_finetuning(_cfg(data, tmp_path / "split"))
    assert second.status == "completed"
    assert not list((tmp_path / "split" / "checkpoints").glob("step_*"))  # best_model.pt + result.json stay
    assert second.result["val_history"] == whole.result["val_history"]
    assert second.result["best_step"] == whole.result["best_step"]
    assert second.result["test"]["mse"] == pytest.approx(whole.result["test"]["mse"], rel=1e-9)
    # A crash after training but before the result: the test is redone from the checkpoint's best weights.
    (tmp_path / "whole" / "result.json").unlink()
    redo = run_finetuning(_cfg(data, tmp_path / "whole"))
    assert redo.result["test"] == whole.result["test"] and redo.result["best_step"] == whole.result["best_step"]


def test_frozen_encoder_from_a_pretraining_checkpoint(data, tmp_path):
    from phileo.models import create_model, save_published

    pre = create_model("phileo_cnn_tiny", img_size=SIZE)
    # A pretraining run folder in the engine's layout: its newest checkpoint is the one used.
    for step in (5, 10):
        torch.manual_seed(step)
        for p in pre.parameters():
            p.data.normal_()
        save_published(pre, tmp_path / "pre" / "checkpoints" / f"step_{step:08d}" / "model.pt", step=step)
        ckpt_io.write_manifest(tmp_path / "pre" / "checkpoints" / f"step_{step:08d}", step)  # saved, complete
    assert resolve_init(str(tmp_path / "pre")) == tmp_path / "pre" / "checkpoints" / "step_00000010"
    out = run_finetuning(_cfg(data, tmp_path / "run", **{"model.init": str(tmp_path / "pre"),
                                                         "model.freeze_encoder": True}))
    r = out.result
    assert r["init_report"]["mode"] == "transfer" and r["init_report"]["step"] == 10
    tuned = torch.load(tmp_path / "run" / "best_model.pt", weights_only=False)["model"]
    pre_sd = pre.state_dict()
    enc = [k for k in tuned if k.startswith(("stem.", "encoder."))]
    assert enc and all(torch.equal(tuned[k], pre_sd[k]) for k in enc), "a frozen encoder changed"
    dec = [k for k in tuned if k.startswith("decoder.") and k in pre_sd and tuned[k].is_floating_point()]
    assert any(not torch.equal(tuned[k], pre_sd[k]) for k in dec), "the decoder did not train"


def test_refusals_name_the_fix(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init=.*nope.pt: no such file"):
        run_finetuning(_cfg(data, tmp_path / "a", **{"model.init": str(tmp_path / "nope.pt")}))
    with pytest.raises(ConfigError, match=r"built for 64 px inputs but the patches .* are 32 px.*img_size: 32"):
        run_finetuning(_cfg(data, tmp_path / "b", **{"model.overrides": {"img_size": 64}}))
    with pytest.raises(ConfigError, match="fine-tuning runs with ddp"):
        _cfg(data, tmp_path / "c", **{"train.strategy": "zero2"})
    (tmp_path / "pre" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run folder without a complete checkpoint"):
        resolve_init(str(tmp_path / "pre"))


@pytest.mark.slow
def test_ddp_over_two_processes(data, tmp_path):
    """torchrun with 2 CPU processes (gloo): the test set is split between ranks and the metrics summed, so the
    pixel count is the full test set's, and only rank 0 writes the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "phileo.bench.finetune", f"data.root={data}", "data.task=lc", "data.n_shot=4", "data.batch_size=2",
           "data.num_workers=0", "model.name=phileo_cnn_tiny", f"model.overrides={{img_size: {SIZE}}}",
           "finetune.max_epochs=2", f"run.dir={tmp_path / 'run'}", "run.tensorboard=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["world_size"] == 2
    n_test_pixels = sum(int((worldcover_to_class(np.load(f)[..., 0]) >= 0).sum())
                        for f in sorted(data.glob("*_test_label_lc.npy")))
    assert r["test"]["n_pixels"] == n_test_pixels
    # 12 training patches / (2 per process x 2 processes) = 3 steps per epoch.
    assert r["steps_per_epoch"] == 3 and r["steps"] == 6
