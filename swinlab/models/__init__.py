"""Pure-PyTorch Swin V1/V2 (no Lightning import here)."""
from .checkpoint import load_into_model, read_checkpoint, remap_state_dict, resize_bias_table, save_safetensors
from .compile import compile_model
from .config import CHOICES, PRESETS, SwinConfig
from .factory import create_model
from .flops import model_macs
from .registry import ALIASES, REGISTRY, Variant, count_params, get_variant, list_models
from .swin import SwinTransformer, stage_geometry

__all__ = [
    "ALIASES", "CHOICES", "PRESETS", "REGISTRY", "SwinConfig", "SwinTransformer", "Variant", "compile_model",
    "count_params", "create_model", "get_variant", "list_models", "load_into_model", "model_macs", "read_checkpoint",
    "remap_state_dict", "resize_bias_table", "save_safetensors", "stage_geometry",
]
