"""Named Swin variants (timm's names wherever timm has the architecture) and ``create_model``."""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import CheckpointError, ConfigError
from .swin import PRESETS, SwinTransformer, per_stage, stage_geometry


@dataclass(frozen=True)
class Variant:
    name: str
    version: str
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int = 4
    pretrained_window_size: Tuple[int, ...] = (0, 0, 0, 0)
    extra_norm_period: int = 0
    drop_path_rate: float = 0.1
    description: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> Dict[str, Any]:
        kw = dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                  depths=list(self.depths), num_heads=list(self.num_heads), window_size=self.window_size,
                  version=self.version, extra_norm_period=self.extra_norm_period,
                  pretrained_window_size=list(self.pretrained_window_size), drop_path_rate=self.drop_path_rate)
        kw.update(self.extra)
        return kw


_T, _S, _B, _L = (2, 2, 6, 2), (2, 2, 18, 2), (2, 2, 18, 2), (2, 2, 18, 2)
_HT, _HB, _HL = (3, 6, 12, 24), (4, 8, 16, 32), (6, 12, 24, 48)

_VARIANTS: List[Variant] = [
    # Swin V1 (timm names); drop path as the official configs
    Variant("swin_tiny_patch4_window7_224", "v1", 96, _T, _HT, 7, 224, drop_path_rate=0.2),
    Variant("swin_small_patch4_window7_224", "v1", 96, _S, _HT, 7, 224, drop_path_rate=0.3),
    Variant("swin_base_patch4_window7_224", "v1", 128, _B, _HB, 7, 224, drop_path_rate=0.5),
    Variant("swin_large_patch4_window7_224", "v1", 192, _L, _HL, 7, 224, drop_path_rate=0.2),
    Variant("swin_base_patch4_window12_384", "v1", 128, _B, _HB, 12, 384, drop_path_rate=0.2),
    Variant("swin_large_patch4_window12_384", "v1", 192, _L, _HL, 12, 384, drop_path_rate=0.2),
    # Swin V2 (timm names)
    Variant("swinv2_tiny_window8_256", "v2", 96, _T, _HT, 8, 256, drop_path_rate=0.2),
    Variant("swinv2_tiny_window16_256", "v2", 96, _T, _HT, 16, 256, drop_path_rate=0.2),
    Variant("swinv2_small_window8_256", "v2", 96, _S, _HT, 8, 256, drop_path_rate=0.3),
    Variant("swinv2_small_window16_256", "v2", 96, _S, _HT, 16, 256, drop_path_rate=0.3),
    Variant("swinv2_base_window8_256", "v2", 128, _B, _HB, 8, 256, drop_path_rate=0.5),
    Variant("swinv2_base_window16_256", "v2", 128, _B, _HB, 16, 256, drop_path_rate=0.5),
    Variant("swinv2_base_window12_192", "v2", 128, _B, _HB, 12, 192, drop_path_rate=0.2),
    Variant("swinv2_base_window12to16_192to256", "v2", 128, _B, _HB, 16, 256, pretrained_window_size=(12, 12, 12, 6),
            drop_path_rate=0.2),
    Variant("swinv2_base_window12to24_192to384", "v2", 128, _B, _HB, 24, 384, pretrained_window_size=(12, 12, 12, 6),
            drop_path_rate=0.2),
    Variant("swinv2_large_window12_192", "v2", 192, _L, _HL, 12, 192, drop_path_rate=0.2),
    Variant("swinv2_large_window12to16_192to256", "v2", 192, _L, _HL, 16, 256, pretrained_window_size=(12, 12, 12, 6),
            drop_path_rate=0.2),
    Variant("swinv2_large_window12to24_192to384", "v2", 192, _L, _HL, 24, 384, pretrained_window_size=(12, 12, 12, 6),
            drop_path_rate=0.2),
    # SwinV2-H / G (paper sec. 3.6): extra LayerNorm every 6 blocks; head dim 32
    Variant("swinv2_huge_window12_192", "v2", 352, _S, (11, 22, 44, 88), 12, 192, extra_norm_period=6,
            drop_path_rate=0.2, description="SwinV2-H (heads assumed at head dim 32; not in the released code)"),
    Variant("swinv2_giant_window12_192", "v2", 512, (2, 2, 42, 4), (16, 32, 64, 128), 12, 192, extra_norm_period=6,
            drop_path_rate=0.2, description="SwinV2-G, ~3B parameters"),
    # tiny variants for tests and CPU runs
    Variant("swin_pico_patch2_window4_32", "v1", 16, (2, 2, 2, 2), (1, 2, 4, 8), 4, 32, patch_size=2,
            drop_path_rate=0.0, description="test/CPU-sized V1"),
    Variant("swinv2_pico_patch2_window4_32", "v2", 16, (2, 2, 2, 2), (1, 2, 4, 8), 4, 32, patch_size=2,
            drop_path_rate=0.0, description="test/CPU-sized V2"),
    Variant("swinv2_giant_cpu_patch2_window4_32", "v2", 32, (2, 2, 6, 2), (1, 2, 4, 8), 4, 32, patch_size=2,
            extra_norm_period=6, drop_path_rate=0.0,
            description="SwinV2-G structure (extra norm every 6 blocks) shrunk for CPU runs"),
]
REGISTRY: Dict[str, Variant] = {v.name: v for v in _VARIANTS}

# short names: v1_t ... v1_l, v2_t ... v2_g
ALIASES: Dict[str, str] = {
    "v1_t": "swin_tiny_patch4_window7_224", "v1_s": "swin_small_patch4_window7_224",
    "v1_b": "swin_base_patch4_window7_224", "v1_l": "swin_large_patch4_window7_224",
    "v2_t": "swinv2_tiny_window8_256", "v2_s": "swinv2_small_window8_256", "v2_b": "swinv2_base_window8_256",
    "v2_l": "swinv2_large_window12_192", "v2_h": "swinv2_huge_window12_192", "v2_g": "swinv2_giant_window12_192",
    "v1_pico": "swin_pico_patch2_window4_32", "v2_pico": "swinv2_pico_patch2_window4_32",
}


def list_models(include_aliases: bool = False) -> List[str]:
    names = list(REGISTRY)
    return names + sorted(ALIASES) if include_aliases else names


def get_variant(name: str) -> Variant:
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    key = ALIASES.get(name, name)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(name, list_models(True), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown model {name!r}: {hint}(swinlab.list_models() or `python -m swinlab models` lists all)")


def source_pretrained_windows(cfg: Dict[str, Any]) -> List[Tuple[int, int]]:
    """The window each stage's CPB was trained against: its pretrained window if set, else its clamped window."""
    n = len(cfg["depths"])
    pretrained = per_stage(cfg.get("pretrained_window_size", 0), n, "pretrained_window_size")
    geo = stage_geometry(cfg["img_size"], cfg["patch_size"], cfg["window_size"], n)
    return [p if p[0] > 0 else g["window"] for p, g in zip(pretrained, geo)]


ARCH_KEYS = ("patch_size", "embed_dim", "depths", "num_heads", "version", "norm_placement", "attention",
             "position_bias", "qkv_bias", "merge_order", "extra_norm_period", "mlp_ratio", "in_chans")


def create_model(
        name: str,
        *,
        checkpoint: Optional[str] = None,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        window_size: Optional[Union[int, Sequence[Any]]] = None,
        pretrained_window_size: Optional[Union[int, Sequence[Any]]] = None,
        num_classes: Optional[int] = None,
        **overrides: Any,
) -> SwinTransformer:
    """Build a registry model, optionally loading ``checkpoint`` and moving it to another size/window.

    The name gives the checkpoint's architecture; ``img_size`` / ``window_size`` give the target. With a
    checkpoint: V1 bias tables are resized bicubically, V2's CPB MLP is re-evaluated with
    ``pretrained_window_size`` set to the checkpoint's windows (unless given). ``checkpoint`` may be a swinlab
    safetensors file or Lightning .ckpt, a timm state_dict, or an official microsoft/Swin-Transformer checkpoint.
    """
    from .checkpoint import infer_num_classes, load_into_model, read_checkpoint

    variant = get_variant(name)
    source: Dict[str, Any] = variant.model_kwargs()
    state_dict = None
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(checkpoint)
        saved = meta.get("config")
        if saved:  # a swinlab file knows the geometry it was saved at
            source.update({k: v for k, v in saved.items() if k not in ("fused_attn", "grad_checkpointing",
                                                                       "attn_chunk_size")})
            mismatched = [k for k in ("embed_dim", "depths", "num_heads", "version", "patch_size")
                          if k in saved and saved[k] != variant.model_kwargs().get(k, saved[k])]
            if mismatched:
                raise CheckpointError(
                    f"checkpoint {checkpoint} was saved from {meta.get('model', 'another model')!r}, whose "
                    f"{', '.join(mismatched)} differ from {name!r}: create it with model={meta.get('model')!r}")
    target = dict(source)
    target.update(overrides)
    if img_size is not None:
        target["img_size"] = img_size
    if window_size is not None:
        target["window_size"] = window_size
    if num_classes is not None:
        target["num_classes"] = num_classes
    elif state_dict is not None:
        inferred = infer_num_classes(state_dict)
        if inferred is not None:
            target["num_classes"] = inferred
    moved = (img_size is not None or window_size is not None)
    if pretrained_window_size is not None:
        target["pretrained_window_size"] = pretrained_window_size
    elif checkpoint is not None and moved:
        bias_kind = target.get("position_bias") or PRESETS[target.get("version", "v1")]["position_bias"]
        if bias_kind.startswith("cpb"):
            target["pretrained_window_size"] = [list(w) for w in source_pretrained_windows(source)]
    model = SwinTransformer(**target)
    model.variant_name = variant.name
    if state_dict is not None:
        load_into_model(model, state_dict, source=source, checkpoint=str(checkpoint),
                        reset_head=num_classes is not None)
    return model


def count_params(name: str, **overrides: Any) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    variant = get_variant(name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SwinTransformer(**{**variant.model_kwargs(), **overrides})
    return sum(p.numel() for p in model.parameters())
