"""Pure-PyTorch Swin V1/V2 (no Lightning import here)."""
from .checkpoint import load_into_model, read_checkpoint, remap_state_dict, resize_bias_table, save_safetensors
from .compile import compile_model
from .config import CHOICES, PRESETS, SwinConfig
from .factory import create_model
from .flops import model_macs
from .hub import list_tags
from .registry import ALIASES, REGISTRY, Variant, count_params, get_variant, list_models
from .swin import FeatureInfoList, SwinTransformer, stage_geometry
from .timm_models import register_timm_models

register_timm_models()  # swinlab_<name> in timm.create_model / timm.list_models

__all__ = [
    "ALIASES", "CHOICES", "PRESETS", "REGISTRY", "FeatureInfoList", "SwinConfig", "SwinTransformer", "Variant",
    "compile_model", "count_params", "create_model", "get_variant", "list_models", "list_tags", "load_into_model",
    "model_macs", "read_checkpoint", "register_timm_models", "remap_state_dict", "resize_bias_table",
    "save_safetensors", "stage_geometry",
]
