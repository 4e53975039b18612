"""PhilEO CNN configurations with one-block stages: the published code creates a block scaler for every stage
(forward uses it only where a stage has two or more blocks). Such state dicts must load strictly, the unused
scalers must not trouble DDP, and a checkpoint of another configuration gets a build call that fits it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from phileo.models import create_downstream_model, create_model
from phileo.models.checkpoint import CheckpointMismatchError, load_state_dict_checked
from phileo.models.phileo_cnn import infer_config, unused_parameter_names

DEPTHS = (1, 2, 1, 2, 2)  # stages 0 and 2 have one block (in the decoder, reversed: stages 2 and 4)


def published_layout_keys(model) -> set[str]:
    """What the published code's state dict holds: a block scaler for *every* encoder and decoder stage."""
    n = len(model.config.depths)
    return {f"{part}.block_scalers.{i}.{p}" for part in ("encoder", "decoder") for i in range(n)
            for p in ("x_skipscale", "y_skipscale", "y_skipbias", "x_skipbias")}


def test_one_block_stages_keep_their_scalers_frozen_and_load_strictly():
    src = create_model("phileo_cnn_tiny", depths=DEPTHS)
    assert published_layout_keys(src) <= set(src.state_dict())
    unused = unused_parameter_names(src)
    assert unused == {k for k in published_layout_keys(src)
                      if k.startswith(("encoder.block_scalers.0.", "encoder.block_scalers.2.",
                                       "decoder.block_scalers.2.", "decoder.block_scalers.4."))}
    assert all(not p.requires_grad for n, p in src.named_parameters() if n in unused)

    dst = create_model("phileo_cnn_tiny", depths=DEPTHS)
    report = load_state_dict_checked(dst, src.state_dict(), strict=True)
    assert report.ok and not report.initialised
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_a_checkpoint_without_the_unused_scalers_still_loads_and_says_so():
    src = create_model("phileo_cnn_tiny", depths=DEPTHS)
    unused = unused_parameter_names(src)
    older = {k: v for k, v in src.state_dict().items() if k not in unused}  # written before they were kept
    report = load_state_dict_checked(create_model("phileo_cnn_tiny", depths=DEPTHS), older, strict=True)
    assert report.ok and sorted(report.initialised) == sorted(unused)


def test_unfreezing_the_encoder_leaves_unused_scalers_frozen():
    model = create_downstream_model("phileo_cnn_tiny", 1, freeze_encoder=True, depths=DEPTHS)
    model.set_encoder_frozen(False)
    unused = unused_parameter_names(model)
    assert unused and all(not p.requires_grad for n, p in model.named_parameters() if n in unused)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in unused)


def test_other_configuration_gets_the_build_call_that_fits():
    ckpt = create_model("phileo_cnn_tiny", depths=DEPTHS, dims=(8, 8, 16, 16, 24)).state_dict()
    assert infer_config({k: tuple(v.shape) for k, v in ckpt.items()}).depths == DEPTHS
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_checked(create_model("phileo_cnn_tiny"), ckpt, source="other.pt")
    assert "create_model('phileo_cnn_tiny', depths=(1, 2, 1, 2, 2), dims=(8, 8, 16, 16, 24))" in str(err.value)
    # And that call does build a model the checkpoint fits.
    assert load_state_dict_checked(create_model("phileo_cnn_tiny", depths=(1, 2, 1, 2, 2),
                                                dims=(8, 8, 16, 16, 24)), ckpt).ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, downstream: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        if downstream:
            model = create_downstream_model("phileo_cnn_tiny", 1, freeze_encoder=True, depths=DEPTHS)
            model.set_encoder_frozen(False)
        else:
            model = create_model("phileo_cnn_tiny", depths=DEPTHS)
        ddp = DDP(model)  # find_unused_parameters=False, as the engine uses it
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(rank)
        for _ in range(2):  # the second step is where DDP reports parameters that got no gradient
            y = ddp(torch.rand(2, 10, 128, 128))
            loss = sum(v.float().square().mean() for v in y.values()) if isinstance(y, dict) else y.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        unused = unused_parameter_names(model)
        out[(downstream, rank)] = (
            all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in unused),
            any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n not in unused),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("downstream", [False, True], ids=["pretraining", "fine-tuning-unfrozen"])
def test_ddp_trains_a_one_block_stage_config_without_unused_parameter_errors(downstream):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), downstream, out), nprocs=2, join=True)
        results = dict(out)
    # On both ranks: the unused scalers never changed, the rest trained.
    assert results == {(downstream, 0): (True, True), (downstream, 1): (True, True)}
