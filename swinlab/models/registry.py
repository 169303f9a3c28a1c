"""Named Swin variants (timm's names wherever timm has the architecture), their aliases and parameter counts."""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from ..errors import ConfigError
from .config import SwinConfig
from .swin import SwinTransformer


@dataclass(frozen=True)
class Variant:
    """A registered model: its name and its config, as written here (sizes and windows as single ints)."""
    name: str
    config: SwinConfig


# embed_dim, depths, num_heads of the paper sizes
_SIZES: Dict[str, Tuple[int, Tuple[int, ...], Tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
# drop path as the official ImageNet-1k configs (224 / 256 px); the 192 px and 384 px models use 0.2
_DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5, "large": 0.2}


def _paper(name: str, version: str, size: str, window: int, img: int, drop_path: float, **kw: Any) -> Variant:
    embed_dim, depths, num_heads = _SIZES[size]
    return Variant(name, SwinConfig(img_size=img, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                    window_size=window, version=version, drop_path_rate=drop_path, **kw))


def _test_size(name: str, version: str, embed_dim: int, depths: Tuple[int, ...], **kw: Any) -> Variant:
    """4 stages, heads 1-2-4-8, window 4 on 32 px images in 2 px patches, no drop path: CPU-sized."""
    return Variant(name, SwinConfig(img_size=32, patch_size=2, embed_dim=embed_dim, depths=depths,
                                    num_heads=(1, 2, 4, 8), window_size=4, version=version, drop_path_rate=0.0,
                                    **kw))


_PRETRAINED_12 = dict(pretrained_window_size=(12, 12, 12, 6))  # fine-tuned from the 192 px window-12 models
_VARIANTS: List[Variant] = [
    # Swin V1 (timm names)
    *(_paper(f"swin_{s}_patch4_window7_224", "v1", s, 7, 224, _DROP_PATH[s]) for s in _SIZES),
    *(_paper(f"swin_{s}_patch4_window12_384", "v1", s, 12, 384, 0.2) for s in ("base", "large")),
    # Swin V2 (timm names)
    *(_paper(f"swinv2_{s}_window{w}_256", "v2", s, w, 256, _DROP_PATH[s]) for s in ("tiny", "small", "base")
      for w in (8, 16)),
    *(v for s in ("base", "large") for v in (
        _paper(f"swinv2_{s}_window12_192", "v2", s, 12, 192, 0.2),
        _paper(f"swinv2_{s}_window12to16_192to256", "v2", s, 16, 256, 0.2, **_PRETRAINED_12),
        _paper(f"swinv2_{s}_window12to24_192to384", "v2", s, 24, 384, 0.2, **_PRETRAINED_12))),
    # SwinV2-H / G (paper sec. 3.6): an extra LayerNorm every 6 blocks; heads at head dim 32 (H: assumed, not in the
    # released code; G: ~3B parameters)
    Variant("swinv2_huge_window12_192", SwinConfig(
        img_size=192, embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=12, version="v2",
        extra_norm_period=6, drop_path_rate=0.2)),
    Variant("swinv2_giant_window12_192", SwinConfig(
        img_size=192, embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), window_size=12, version="v2",
        extra_norm_period=6, drop_path_rate=0.2)),
    # test/CPU-sized; the last one has SwinV2-G's structure (an extra norm every 6 blocks)
    _test_size("swin_pico_patch2_window4_32", "v1", 16, (2, 2, 2, 2)),
    _test_size("swinv2_pico_patch2_window4_32", "v2", 16, (2, 2, 2, 2)),
    _test_size("swinv2_giant_cpu_patch2_window4_32", "v2", 32, (2, 2, 6, 2), extra_norm_period=6),
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


def count_params(name: str, **overrides: Any) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SwinTransformer(get_variant(name).config, **overrides)
    return sum(p.numel() for p in model.parameters())
