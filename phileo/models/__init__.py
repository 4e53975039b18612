"""PhilEO CNN / ViT / UPerNet, checkpoint-compatible with the published weights.

    from phileo.models import create_model, create_downstream_model, load_pretrained, list_models

    model = create_model("phileo_cnn_44m")                 # pretraining model; forward(x) -> dict of outputs
    load_pretrained(model, "PhilEO_44M.pt")                # published {"model": state_dict}, strict
    ft = create_downstream_model("phileo_vit_100m", num_outputs=11, freeze_encoder=True)
    report = load_pretrained(ft, "phileo_vit_100m.pt")     # encoder transferred, UPerNet fresh

Every model reports num_params() and flops_per_sample() (forward FLOPs of one sample, 2 per multiply-add).
"""

from phileo.models.base import PhilEOModel, count_forward_flops
from phileo.models.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    guess_model_name,
    load_pretrained,
    load_state_dict_checked,
    read_state_dict,
    save_published,
    strip_wrapper_prefixes,
)
from phileo.models.phileo_cnn import PhilEOCNN, PhilEOCNNConfig, PhilEOCNNDownstream
from phileo.models.phileo_vit import PhilEOViT, PhilEOViTConfig
from phileo.models.registry import (
    ModelSpec,
    create_downstream_model,
    create_model,
    get_model_config,
    get_model_spec,
    list_models,
    register_model,
)
from phileo.models.upernet import PhilEOViTUPerNet, UPerNetHead

PRETRAINING_OUTPUTS = ("reconstruction", "embedding", "coords", "clouds", "buildings", "landcover")
"""Keys of the dict returned by every pretraining model's forward."""

__all__ = [
    "PRETRAINING_OUTPUTS",
    "PhilEOModel", "count_forward_flops",
    "CheckpointMismatchError", "LoadReport", "guess_model_name", "load_pretrained", "load_state_dict_checked",
    "read_state_dict",
    "save_published", "strip_wrapper_prefixes",
    "PhilEOCNN", "PhilEOCNNConfig", "PhilEOCNNDownstream", "PhilEOViT", "PhilEOViTConfig", "PhilEOViTUPerNet",
    "UPerNetHead",
    "ModelSpec", "create_downstream_model", "create_model", "get_model_config", "get_model_spec", "list_models",
    "register_model",
]
