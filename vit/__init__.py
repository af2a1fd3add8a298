"""Vision Transformers for image classification."""

from vit.model import VisionTransformer, ViTConfig
from vit.pos_embed import resize_pos_embed
from vit.presets import PRESETS, create_model, preset_config
from vit.timm_compat import config_from_timm, from_timm, load_pretrained
from vit.weights import UnsafeCheckpointError, load_weights, read_state_dict

__all__ = [
    "PRESETS",
    "UnsafeCheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "config_from_timm",
    "create_model",
    "from_timm",
    "load_pretrained",
    "load_weights",
    "preset_config",
    "read_state_dict",
    "resize_pos_embed",
]
