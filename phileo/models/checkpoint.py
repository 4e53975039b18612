"""Loading PhilEO weights from every checkpoint format we meet, with a report of what was loaded.

Accepted sources (all read on CPU):
  * a file holding `{"model": state_dict, ...}`: the published PhilEO checkpoints and the reference trainer's;
  * a file holding a bare state dict (name → tensor);
  * a DeepSpeed model-states file `{"module": state_dict, ...}` (`mp_rank_00_model_states.pt`);
  * our training checkpoint directory: a folder with `model.pt` = `{"model": state_dict, "step": int, ...}`;
  * a DeepSpeed checkpoint folder (with `latest` and/or `global_step*/`, or one `global_step*/` folder itself),
    consolidated to fp32 with deepspeed.utils.zero_to_fp32 (ZeRO 1-3; stage 0 falls back to the model-states file).
Prefixes added by wrappers (`module.` from DDP/DeepSpeed, `_orig_mod.` from torch.compile) are stripped.

Into a fine-tuning model (PhilEOCNNDownstream, PhilEOViTUPerNet), a pretraining checkpoint is *transferred*: the
pretrained parts (stem, encoder, and for the U-Net also its decoder) are loaded, the pretraining-only parts
(embedding heads, reconstruction decoder/head) are reported as ignored, the task head starts fresh. A checkpoint
of the fine-tuning model itself (resuming) is loaded whole.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from phileo.fsutil import atomic_path

_LEADING_WRAPPERS = ("module", "_orig_mod")  # DDP / DeepSpeed engine, torch.compile around the whole model
_INNER_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")  # compiled or checkpoint-wrapped submodules
_GLOBAL_STEP = re.compile(r"^global_step(\d+)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists missing / unexpected / mis-shaped keys."""


@dataclass
class LoadReport:
    """What load_pretrained did.

    source: the path read; format: "published" ({"model": ...}), "bare", "deepspeed_module" ({"module": ...}),
    "training_dir" (folder with model.pt), "deepspeed_dir" (consolidated ZeRO checkpoint);
    mode: "full" (every model key from the checkpoint) or "transfer" (pretrained parts into a fine-tuning model);
    loaded: model keys set from the checkpoint; missing / unexpected / mismatched (name, checkpoint shape, model
    shape): what did not fit (empty after a strict load); ignored: checkpoint keys deliberately not used
    (pretraining-only heads); initialised: model keys left at their fresh initialisation (the task head);
    step: the training step stored in the checkpoint, when there is one.
    """

    source: str
    format: str
    mode: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    step: int | None = None

    @property
    def ok(self) -> bool:
        """True when every expected key was loaded with the right shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source} ({self.format}, {self.mode})"]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatches", self.mismatched), ("ignored (pretraining-only)", self.ignored),
                             ("freshly initialised", self.initialised)):
            if items:
                parts.append(f"{len(items)} {label}")
        if self.step is not None:
            parts.append(f"step {self.step}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds pickled Python objects besides tensors, which torch.load(weights_only=True) refuses "
            f"({str(e).splitlines()[0]}). If you trust the file, call load_pretrained(..., allow_pickle=True)."
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({e}); it may be truncated by an interrupted "
                         f"copy: re-copy it, or point to another checkpoint") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """Finds the state dict inside a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        step = obj.get("step", obj.get("global_steps"))
        step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None
        for key, fmt in (("model", "published"), ("module", "deepspeed_module"), ("state_dict", "published")):
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key]), fmt, step
        if _is_state_dict(obj):
            return dict(obj), "bare", None
        keys = sorted(map(str, obj.keys()))[:12]
        raise ValueError(f"{path}: found no state dict (expected a 'model' or 'module' entry holding name → tensor, "
                         f"or a bare state dict); top-level keys: {keys}")
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict; expected {{'model': state_dict}}")


def _latest_global_step(folder: Path) -> str | None:
    steps = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := _GLOBAL_STEP.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None  # numeric order: global_step10 after global_step9


def _read_deepspeed_dir(ckpt_dir: Path, tag: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], int | None]:
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {ckpt_dir}: tag folder {tag_dir} does not exist (named in "
                                f"{ckpt_dir / 'latest'}?); pass the global_step* folder you want instead")
    m = _GLOBAL_STEP.match(tag)
    step = int(m.group(1)) if m else None
    if any(tag_dir.glob("*optim_states.pt")):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for a GPU runtime at import
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)), step
        except ValueError as e:
            if "zero" not in str(e).lower():  # anything but "not a ZeRO checkpoint" is a real error
                raise
    # ZeRO stage 0 (plain data parallel) keeps the whole model in the model-states file.
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"DeepSpeed checkpoint {tag_dir} has neither ZeRO optimizer shards nor "
                                f"mp_rank_*_model_states.pt; it is incomplete (interrupted save?): use an older tag")
    sd, _, _ = _unwrap(_torch_load(states[0], allow_pickle), states[0])
    return sd, step


def read_state_dict(path: str | os.PathLike,
                    allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """Reads the state dict from any accepted source (see module docstring), wrapper prefixes stripped.

    Returns (state_dict, format, step or None). Refuses paths that do not exist or hold no state dict, with a
    message naming the file and what was expected there.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        if (p / "model.pt").is_file():
            sd, _, step = _unwrap(_torch_load(p / "model.pt", allow_pickle), p / "model.pt")
            fmt = "training_dir"
        elif _GLOBAL_STEP.match(p.name) and any(p.glob("*model_states.pt")):
            sd, step = _read_deepspeed_dir(p.parent, p.name, allow_pickle)
            fmt = "deepspeed_dir"
        elif (p / "latest").is_file() or _latest_global_step(p):
            tag = (p / "latest").read_text().strip() if (p / "latest").is_file() else _latest_global_step(p)
            sd, step = _read_deepspeed_dir(p, tag, allow_pickle)
            fmt = "deepspeed_dir"
        else:
            raise ValueError(f"{p} is a folder but neither a training checkpoint (model.pt) nor a DeepSpeed "
                             f"checkpoint (latest, global_step*/); point to the checkpoint file or folder itself")
    else:
        sd, fmt, step = _unwrap(_torch_load(p, allow_pickle), p)
    return strip_wrapper_prefixes(sd), fmt, step


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes leading `module.` (DDP, DeepSpeed) and `_orig_mod.` (torch.compile) prefixes, and `_orig_mod` /
    `_checkpoint_wrapped_module` segments of wrapped submodules; refuses a state dict where two keys collapse to
    one name."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        while len(parts) > 1 and parts[0] in _LEADING_WRAPPERS:
            parts = parts[1:]
        new = ".".join(seg for seg in parts if seg not in _INNER_WRAPPERS)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} once wrapper prefixes are removed; the checkpoint "
                             f"mixes wrapped and unwrapped copies of the model")
        out[new] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Matching to a model
# ----------------------------------------------------------------------------------------------------------------


def _transfer_rules(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """For fine-tuning models: (prefixes loaded from a pretraining checkpoint, keys marking a pretraining
    checkpoint). None for models that load checkpoints whole."""
    from phileo.models.phileo_cnn import PhilEOCNNDownstream
    from phileo.models.upernet import PhilEOViTUPerNet

    if isinstance(model, PhilEOCNNDownstream):
        return ("stem.", "encoder.", "decoder."), ("encoder.head_coords.", "encoder.head_clouds.")
    if isinstance(model, PhilEOViTUPerNet):
        return ("stem.", "encoder.vit_encoder."), ("encoder.linear_proj.", "encoder.head_coords.")
    return None


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    allow_pickle: bool = False) -> LoadReport:
    """Loads weights from `path` (any format in the module docstring) into `model`; returns a LoadReport.

    For fine-tuning models a pretraining checkpoint is transferred (stem/encoder, plus the U-Net decoder), the
    pretraining-only keys are reported as ignored and the task head is left freshly initialised.
    strict=True: raises CheckpointMismatchError (naming the file, the missing, unexpected and mis-shaped keys, and
    what to do) unless every expected key is present with the right shape; nothing is loaded in that case.
    strict=False: loads the keys that fit and reports the rest; still raises if nothing at all fits.
    allow_pickle: permit checkpoints holding arbitrary pickled objects (only for files you trust).
    """
    state_dict, fmt, step = read_state_dict(path, allow_pickle=allow_pickle)
    return load_state_dict_checked(model, state_dict, strict=strict, source=str(path), fmt=fmt, step=step)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "<state dict>", fmt: str = "bare", step: int | None = None) -> LoadReport:
    """The matching half of load_pretrained, for a state dict already in memory (same rules, same report and
    errors; wrapper prefixes are stripped here too). Works on meta-device models, which makes it cheap to check
    that a checkpoint layout fits a large model."""
    state_dict = strip_wrapper_prefixes(state_dict)
    model_sd = model.state_dict()
    report = LoadReport(source=source, format=fmt, mode="full", step=step)

    rules = _transfer_rules(model)
    if rules is not None and any(k.startswith(rules[1]) for k in state_dict):
        report.mode = "transfer"
        prefixes = rules[0]
        report.ignored = sorted(k for k in state_dict if not k.startswith(prefixes) or _pretraining_only(k))
        ignored = set(report.ignored)
        candidates = {k: v for k, v in state_dict.items() if k not in ignored}
        expected = [k for k in model_sd if k.startswith(prefixes)]
        report.initialised = sorted(k for k in model_sd if not k.startswith(prefixes))
    else:
        candidates, expected = dict(state_dict), list(model_sd)

    fitting: dict[str, torch.Tensor] = {}
    never_used = _unused_in_forward(model)
    for key in expected:
        if key not in candidates and key in never_used:
            report.initialised.append(key)  # e.g. one-block stages' scalers, absent from older checkpoints
        elif key not in candidates:
            report.missing.append(key)
        elif tuple(candidates[key].shape) != tuple(model_sd[key].shape):
            report.mismatched.append((key, tuple(candidates[key].shape), tuple(model_sd[key].shape)))
        else:
            fitting[key] = candidates[key]
    report.unexpected = sorted(set(candidates) - set(expected))
    report.loaded = sorted(fitting)

    if (strict and not report.ok) or not fitting:
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        raise CheckpointMismatchError(_mismatch_message(model, source, report, strict, shapes))
    with torch.no_grad():
        result = model.load_state_dict(fitting, strict=False)
    if result.unexpected_keys:  # cannot happen: fitting is a subset of the model keys; guards against silent loss
        raise CheckpointMismatchError(f"{source}: keys not in the model: {result.unexpected_keys[:10]}")
    return report


def _pretraining_only(key: str) -> bool:
    return key.startswith(("encoder.head_", "encoder.linear_proj."))


def _mismatch_message(model: nn.Module, path, report: LoadReport, strict: bool,
                      checkpoint_shapes: Mapping[str, tuple[int, ...]]) -> str:
    def show(items, n=8):
        items = list(items)
        more = f" ... and {len(items) - n} more" if len(items) > n else ""
        return ", ".join(map(str, items[:n])) + more

    name = getattr(model, "model_name", None)
    if name is None:
        name = type(model).__name__
    else:
        from phileo.models.registry import get_model_config

        if getattr(model, "config", None) != get_model_config(name):
            name += " with overrides"
    expected = len(report.loaded) + len(report.missing) + len(report.mismatched)
    lines = [f"checkpoint {path} does not fit model {name} ({report.format} checkpoint, {report.mode} load): "
             f"{len(report.loaded)} of {expected} expected tensors fit"]
    if report.missing:
        lines.append(f"  missing from the checkpoint ({len(report.missing)}): {show(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(report.unexpected)}): {show(report.unexpected)}")
    if report.mismatched:
        lines.append(f"  shape mismatches ({len(report.mismatched)}, checkpoint vs model): "
                     + show(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in report.mismatched))
    guess = guess_model_name(checkpoint_shapes)
    build = None if guess else _build_call_for(model, checkpoint_shapes)
    if guess:
        lines.append(f"  the checkpoint has exactly the layout of {guess!r}: build that model "
                     f"(create_model({guess!r}) or create_downstream_model({guess!r}, ...)) and load again")
    elif build:
        lines.append(f"  the checkpoint is a PhilEO CNN of another configuration: build it with {build} "
                     f"(or the same overrides in create_downstream_model) and load again")
    else:
        lines.append("  fix: build the model with the checkpoint's configuration (see list_models() and the "
                     "overrides of create_model), or check that the file is the checkpoint you meant")
    if strict and report.loaded:
        lines.append("  or pass strict=False to load only the tensors that fit (the rest stays as initialised)")
    return "\n".join(lines)


def _unused_in_forward(model: nn.Module) -> set[str]:
    from phileo.models.phileo_cnn import unused_parameter_names

    return unused_parameter_names(model)


def _build_call_for(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`create_model(NAME, overrides...)` that builds a PhilEO CNN of the checkpoint's configuration, relative to
    the model's own preset (or phileo_cnn_44m); None when the shapes are no PhilEO CNN's or differ otherwise."""
    from phileo.models.phileo_cnn import PhilEOCNNConfig, infer_config
    from phileo.models.registry import get_model_config

    found = infer_config(dict(shapes))
    if found is None:
        return None
    name = getattr(model, "model_name", None)
    base = get_model_config(name) if name else None
    if not isinstance(base, PhilEOCNNConfig):
        name, base = "phileo_cnn_44m", get_model_config("phileo_cnn_44m")
    fields = ("input_dim", "depths", "dims", "img_size", "latent_dim")
    diffs = {f: getattr(found, f) for f in fields if getattr(found, f) != getattr(base, f)}
    if not diffs:
        return None
    return f"create_model({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in diffs.items()) + ")"


def guess_model_name(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The registered pretraining preset whose state dict has exactly these names and shapes, if any."""
    from phileo.models.registry import create_model, list_models

    for name in list_models():
        with torch.device("meta"):
            candidate = create_model(name)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == dict(shapes):
            return name
    return None


def save_published(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Writes `{"model": state_dict, **extra}` (the published PhilEO format) atomically; returns the path.

    The state dict is taken from the unwrapped model (DDP `.module` and torch.compile `._orig_mod` are looked
    through) and moved to CPU, so the file loads anywhere with load_pretrained or plain load_state_dict.
    """
    inner = model
    for attr in ("module", "_orig_mod"):
        while hasattr(inner, attr) and isinstance(getattr(inner, attr), nn.Module):
            inner = getattr(inner, attr)
    state_dict = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state_dict, **extra}, tmp)
    return Path(path)


__all__ = ["LoadReport", "CheckpointMismatchError", "load_pretrained", "load_state_dict_checked", "read_state_dict",
           "strip_wrapper_prefixes",
           "guess_model_name", "save_published"]
