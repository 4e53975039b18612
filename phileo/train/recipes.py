"""Recipes: named layers of config values that build_config puts between a job's defaults and the user's file,
flags and key=value overrides (so anything the user sets still wins).

    python -m phileo.train.pretrain --recipe published data.root=SHARDS model.name=phileo_vit_100m
    build_config(PretrainConfig, "my.yaml", recipe="published")    # or `recipe: published` in the file

"default" is the project's own recipe: the schema's defaults, nothing added. "published" reproduces the
hyperparameters of the published code, quirks included: ESA-PhiLab/PhilEO-MajorTOM (read at commit b883970),
train_model_ddp.py (CNN) and train_model_vit_ddp.py (ViT) for pretraining, phileo-bench/training_script_ddp.py
and phileo-bench/trainers/train_base.py for fine-tuning. Each value below says where it comes from; the README
section "Fidelity to the published code" lists what this recipe does not (or cannot) reproduce.

A preset may depend on the model family ("cnn" or "vit", from phileo.models' registry), because the published
scripts did: the CNN and ViT pretraining scripts differ in LR, batch size and patience.
"""

from __future__ import annotations

from typing import Any

from phileo.config import ConfigError

RECIPES = ("default", "published")

# ------------------------------------------------------------------------------------------------- pretraining
# Both families: train_model_ddp.py and train_model_vit_ddp.py are the same script but for the lines in
# PUBLISHED_PRETRAIN_FAMILY.
PUBLISHED_PRETRAIN: dict[str, Any] = {
    # init_args: learning_rate * np.sqrt(self.WORLD_SIZE)
    "optim.lr_scaling": "sqrt",
    # --warmup_epochs 0: no warm-up
    "optim.warmup_steps": 0,
    # The LR is effectively constant, for two different reasons. CNN: cosine_scheduler(lr, lr_end, num_epochs=
    # 100000, ...) is indexed by *epoch*, so after 300 epochs it still is above 0.9999·lr. ViT: the loop sets
    # param_group['flr'] (a typo for 'lr'), so the schedule never reaches the optimizer. Here: constant.
    "optim.min_lr_ratio": 1.0,
    # optim.AdamW(self.model.parameters(), lr=..., weight_decay=1e-2): one group, so every parameter (biases,
    # norms, cls/pos tokens) is decayed; betas and eps are torch's defaults.
    "optim.weight_decay": 0.01,
    "optim.decay_norm_and_bias": False,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    # scaler.scale(loss).backward(); scaler.step(self.optimizer): no clip_grad_norm_ anywhere
    "train.grad_clip_norm": 0.0,
    # self.early_stopper(to_log["loss"], epoch): the epoch's mean *training* loss (all-reduced), --es_delta 0.
    # The patience is per family (below).
    "train.early_stop_min_delta": 0.0,
    # torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16): bf16 where the GPU has it ("auto"). The
    # published GradScaler around bf16 only skips steps with inf/NaN gradients (bf16 has fp32's range); here a
    # non-finite gradient ends the run as failed instead (train.precision=fp16 would bring a scaler).
    "train.precision": "auto",
    # loss/losses.py foundation_loss: the weights of the terms
    "loss.reconstruction": 1.0,
    "loss.coords": 1.0,
    "loss.clouds": 100.0,
    "loss.buildings": 100.0,
    "loss.landcover": 1.0,
    "loss.embedding_positive": 1.5,  # cossim_loss: loss_cos_positive * (1 + alpha), alpha=0.5
    "loss.embedding_distance": 1.0,  # + euclidean_distance.mean()
    # cossim_loss: F.cosine_embedding_loss(flip(e), e_aug, torch.zeros(B)) * (1 - alpha). torch defines that
    # loss for targets 1 and -1 only; for target 0 it is exactly 0 (tests/test_recipes.py checks it in torch), so
    # the negative term never contributed. Reproduced by weight 0: the term is still computed and logged
    # (loss/embedding_negative, a collapse diagnostic), and adds nothing to the total or the gradient.
    "loss.embedding_negative": 0.0,
    # RandomErasing(p=1.0, scale=(0.25, 0.50), ...): one erased rectangle per view covering 25-50 %
    "loss.erase_fraction": [0.25, 0.5],
}
PUBLISHED_PRETRAIN_FAMILY: dict[str, dict[str, Any]] = {
    # train_model_ddp.py: --learning_rate 1e-4, --batch_size 4 (per GPU), --es_patience 10
    "cnn": {"optim.lr": 1e-4, "data.batch_size": 4, "train.early_stop_patience_epochs": 10},
    # train_model_vit_ddp.py: --learning_rate 3e-5, --batch_size 16 (per GPU), --es_patience 30
    "vit": {"optim.lr": 3e-5, "data.batch_size": 16, "train.early_stop_patience_epochs": 30},
}

# -------------------------------------------------------------------------------------------------- fine-tuning
PUBLISHED_FINETUNE: dict[str, Any] = {
    # training_script_ddp.py: --learning_rate 1e-3, then * np.sqrt(self.WORLD_SIZE)
    "optim.lr": 1e-3,
    "optim.lr_scaling": "sqrt",
    # train_base.py set_optimizer: AdamW(self.model.parameters(), lr=..., eps=1e-06): torch's weight decay 0.01
    # on every parameter, torch's betas
    "optim.eps": 1e-6,
    "optim.weight_decay": 0.01,
    "optim.decay_norm_and_bias": False,
    "optim.betas": [0.9, 0.999],
    # --lr_scheduler None: constant after the warm-up
    "optim.min_lr_ratio": 1.0,
    # --warmup_epochs 5, --warmup_gamma 10: the LR starts at lr / int(10 ** 5) and a MultiStepLR with milestones
    # 1..5 and gamma 10, stepped once per epoch, multiplies it by 10 after each of the first 5 epochs
    "finetune.warmup_epochs": 5,
    "optim.warmup": "geometric",
    "optim.warmup_gamma": 10.0,
    # autocast(dtype=torch.float16) with torch.amp.GradScaler('cuda') (CUDA only; refused on CPU)
    "train.precision": "fp16",
    # scaler.step(self.optimizer): no clipping
    "train.grad_clip_norm": 0.0,
    # --batch_size 16 (per GPU), --epochs 250, --es_patience 50 (validation loss, es_delta 0)
    "data.batch_size": 16,
    "finetune.max_epochs": 250,
    "finetune.patience_epochs": 50,
    "finetune.min_delta": 0.0,
}
PUBLISHED_FINETUNE_FAMILY: dict[str, dict[str, Any]] = {
    # models/model_GeoAwarePretrained.py CoreEncoderGeoPretrained(freeze_body=True): every parameter loaded
    # from the checkpoint is frozen, the stem among them
    "cnn": {"model.freeze_stem": True},
    # models/model_PhiViTUperNet.py phivit_upernet_pretrained(freeze_body=True): only model.vit_encoder's
    # parameters are frozen, the CNN stem in front of it keeps training
    "vit": {"model.freeze_stem": False},
}

_PRESETS = {
    ("pretrain", "published"): (PUBLISHED_PRETRAIN, PUBLISHED_PRETRAIN_FAMILY),
    ("finetune", "published"): (PUBLISHED_FINETUNE, PUBLISHED_FINETUNE_FAMILY),
}


def model_family(model_name: str) -> str:
    """"cnn" or "vit" for a registered model name; ConfigError naming model.name otherwise."""
    from phileo.models.registry import get_model_spec

    try:
        return get_model_spec(model_name).family
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None


def preset(job_kind: str, recipe: str, model_name: str) -> dict[str, Any]:
    """The {dotted.key: value} layer of `recipe` for a job of kind `job_kind` ("pretrain" or "finetune") training
    `model_name`; {} for "default". Refuses (ConfigError) an unknown recipe, naming the known ones."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)} (--recipe or the config's "
                          f"`recipe` key)")
    if recipe == "default":
        return {}
    try:
        common, per_family = _PRESETS[(job_kind, recipe)]
    except KeyError:
        raise ConfigError(f"recipe {recipe!r} has no preset for {job_kind} jobs") from None
    return {**common, **per_family[model_family(model_name)]}


__all__ = ["RECIPES", "preset", "model_family", "PUBLISHED_PRETRAIN", "PUBLISHED_PRETRAIN_FAMILY",
           "PUBLISHED_FINETUNE", "PUBLISHED_FINETUNE_FAMILY"]
