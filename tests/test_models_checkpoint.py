"""load_pretrained: every accepted checkpoint format, encoder transfer into fine-tuning models, and refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from phileo.models import (
    CheckpointMismatchError,
    create_downstream_model,
    create_model,
    load_pretrained,
    save_published,
    strip_wrapper_prefixes,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def trained_like(name: str, seed: int = 0):
    """A pretraining model whose weights differ from any fresh initialisation."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def same_tensors(a: dict, b: dict, keys=None) -> bool:
    keys = list(a) if keys is None else keys
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("layout", ["published", "bare", "deepspeed_module", "training_dir"])
def test_each_file_layout_loads_strictly(layout, tmp_path):
    src = trained_like("phileo_cnn_tiny")
    sd = src.state_dict()
    if layout == "published":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": sd, "epoch": 4}, path)
    elif layout == "bare":
        path = tmp_path / "ckpt.pt"
        torch.save(sd, path)
    elif layout == "deepspeed_module":
        path = tmp_path / "mp_rank_00_model_states.pt"
        torch.save({"module": {f"module.{k}": v for k, v in sd.items()}, "global_steps": 12, "ds_version": "0"}, path)
    else:
        path = tmp_path / "run" / "step_00000040"
        path.mkdir(parents=True)
        torch.save({"model": sd, "step": 40, "optimizer": {}, "config": {"lr": 1e-4}}, path / "model.pt")
    model = create_model("phileo_cnn_tiny")
    report = load_pretrained(model, path)
    assert report.format == layout and report.mode == "full" and report.ok
    assert len(report.loaded) == len(sd)
    assert same_tensors(model.state_dict(), sd)
    assert report.step == {"published": None, "bare": None, "deepspeed_module": 12, "training_dir": 40}[layout]


def test_wrapper_prefixes_are_stripped(tmp_path):
    src = trained_like("phileo_vit_tiny")
    sd = src.state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}  # DDP around torch.compile
    torch.save({"model": wrapped}, tmp_path / "c.pt")
    model = create_model("phileo_vit_tiny")
    assert load_pretrained(model, tmp_path / "c.pt").ok
    assert same_tensors(model.state_dict(), sd)
    assert strip_wrapper_prefixes({"encoder._orig_mod.norm.weight": torch.ones(1)}).keys() == {"encoder.norm.weight"}
    with pytest.raises(ValueError, match="map to"):
        strip_wrapper_prefixes({"module.a": torch.ones(1), "a": torch.ones(1)})


def test_save_published_looks_through_compile_and_ddp_wrappers(tmp_path):
    src = trained_like("phileo_cnn_tiny")
    compiled = torch.compile(src)  # not run: only the wrapper matters
    path = save_published(compiled, tmp_path / "out" / "export.pt", step=3)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "step"} and set(obj["model"]) == set(src.state_dict())
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())  # atomic write left no temp file


@pytest.mark.parametrize("name", ["phileo_cnn_tiny", "phileo_vit_tiny"])
def test_pretraining_checkpoint_transfers_into_the_fine_tuning_model(name, tmp_path):
    src = trained_like(name)
    sd = src.state_dict()
    torch.save({"model": sd}, tmp_path / "pre.pt")
    model = create_downstream_model(name, num_outputs=11, freeze_encoder=True)
    task_prefixes = ("head.",) if name.startswith("phileo_cnn") else ("neck.", "decoder.")
    fresh_task_part = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(task_prefixes)}
    report = load_pretrained(model, tmp_path / "pre.pt")
    assert report.mode == "transfer" and report.ok
    msd = model.state_dict()
    # every encoder tensor came from the checkpoint
    enc_keys = [k for k in msd if k.startswith(("stem.", "encoder."))]
    assert enc_keys and set(enc_keys) <= set(report.loaded) and same_tensors(msd, sd, enc_keys)
    # pretraining-only parts are reported, not silently dropped
    assert any(k.startswith("encoder.head_coords") for k in report.ignored)
    assert all(k.startswith("head.") or k not in msd or k.startswith("encoder.head_") or
               k.startswith("encoder.linear_proj") or k.startswith("decoder.") for k in report.ignored)
    if name.startswith("phileo_cnn"):  # the U-Net decoder is pretrained too; only the head is new
        dec_keys = [k for k in msd if k.startswith("decoder.")]
        assert same_tensors(msd, sd, dec_keys)
    else:  # ViT: pyramid + UPerNet are new, the reconstruction decoder is not used
        assert any(k.startswith("decoder.decoder_blocks") for k in report.ignored)
    assert report.initialised == sorted(fresh_task_part)
    assert same_tensors(msd, fresh_task_part, list(fresh_task_part))  # task head untouched
    # the frozen flag survives loading
    assert not any(p.requires_grad for p in model.encoder_parameters())


def test_fine_tuned_checkpoint_resumes_whole(tmp_path):
    src = create_downstream_model("phileo_vit_tiny", 11)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    save_published(src, tmp_path / "ft.pt")
    model = create_downstream_model("phileo_vit_tiny", 11)
    report = load_pretrained(model, tmp_path / "ft.pt")
    assert report.mode == "full" and report.ok and same_tensors(model.state_dict(), src.state_dict())


def test_wrong_size_is_refused_with_the_keys_and_the_fix(tmp_path):
    torch.save({"model": create_model("phileo_cnn_tiny").state_dict()}, tmp_path / "tiny.pt")
    model = create_model("phileo_cnn_tiny", depths=[2, 2, 3, 2, 2], dims=[8, 8, 16, 16, 24])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(model, tmp_path / "tiny.pt")
    msg = str(err.value)
    assert "tiny.pt" in msg
    assert "missing from the checkpoint" in msg and "encoder.blocks_down.2.2." in msg
    assert "shape mismatches" in msg and "(32, 16, 1, 1) vs (24, 16, 1, 1)" in msg
    assert "phileo_cnn_tiny with overrides" in msg
    assert "'phileo_cnn_tiny'" in msg  # the layout is recognised and named
    assert "strict=False" in msg
    assert same_tensors(model.state_dict(), before)  # nothing half-loaded

    report = load_pretrained(model, tmp_path / "tiny.pt", strict=False)
    assert report.missing and report.mismatched and report.loaded
    assert not report.ok


def test_unrelated_checkpoint_is_refused_even_when_not_strict(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="unexpected in the checkpoint"):
        load_pretrained(create_model("phileo_vit_tiny"), tmp_path / "other.pt", strict=False)


def test_unreadable_inputs_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "nope.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "empty_dir")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated.pt"):
        load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "truncated.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "nosd.pt")
    with pytest.raises(ValueError, match="found no state dict"):
        load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "nosd.pt")


class _Opaque:  # a pickled Python object that weights_only loading must refuse
    pass


def test_pickled_objects_need_explicit_trust(tmp_path):
    sd = create_model("phileo_cnn_tiny").state_dict()
    torch.save({"model": sd, "args": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "pickled.pt")
    assert load_pretrained(create_model("phileo_cnn_tiny"), tmp_path / "pickled.pt", allow_pickle=True).ok


_DS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute op build on CPU
    from phileo.models import create_model
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    for stage in (0, 2, 3):
        model = create_model("phileo_vit_tiny")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
               "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        for _ in range(2):
            out = engine(torch.rand(2, 10, 128, 128))
            engine.backward(sum(v.float().mean() for v in out.values()))
            engine.step()
        ckpt = os.path.join(out_dir, f"zero{stage}")
        engine.save_checkpoint(ckpt)
        sd = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
        torch.save({k: v.detach().float().cpu() for k, v in sd.items()}, os.path.join(ckpt, "expected.pt"))
""")


@pytest.mark.slow
def test_deepspeed_checkpoint_folders_are_consolidated(tmp_path):
    """Real DeepSpeed (CPU, one process) ZeRO 0/2/3 checkpoints: the folder, and its global_step* folder,
    load strictly and give the trained weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = tmp_path / "make_ds.py"
    script.write_text(_DS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (0, 2, 3):
        folder = tmp_path / f"zero{stage}"
        expected = torch.load(folder / "expected.pt", weights_only=True)
        for path in (folder, folder / "global_step2"):
            model = create_model("phileo_vit_tiny")
            report = load_pretrained(model, path)
            assert report.format == "deepspeed_dir" and report.ok and report.step == 2
            got = model.state_dict()
            assert set(got) == set(expected)
            assert all(torch.equal(got[k], expected[k]) for k in expected), f"zero{stage} {path.name}"
