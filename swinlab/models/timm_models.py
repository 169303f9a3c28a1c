"""swinlab's variants in timm's model registry, as ``swinlab_<name>`` (a prefix no timm model uses), so that
``timm.create_model("swinlab_swinv2_pico_patch2_window4_32", features_only=True)`` builds swinlab's model.

Registered through timm's public ``register_model`` when ``swinlab.models`` is imported (timm is imported by then
anyway: the blocks use its layers). ``pretrained=True`` / a tag go through :func:`swinlab.create_model`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from .factory import create_model
from .registry import REGISTRY

PREFIX = "swinlab_"
__all__: List[str] = []  # timm's register_model appends each entry point's name


def timm_name(name: str) -> str:
    """timm's name for swinlab variant ``name``."""
    return PREFIX + name


def _entry_point(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = False, pretrained_cfg: Optional[Any] = None,
              pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
              **kwargs: Any):
        # timm passes the tag of "swinlab_<name>.<tag>" as pretrained_cfg (swinlab registers no cfgs of its own;
        # the tag's is timm's, looked up by create_model); cache_dir: the Hugging Face cache's own is used
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) and pretrained_cfg else None
        model = create_model(name if tag is None else f"{name}.{tag}", pretrained=pretrained, **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = dict(model.pretrained_cfg, **pretrained_cfg_overlay)
        return model

    entry.__name__ = entry.__qualname__ = timm_name(name)
    entry.__module__ = __name__
    entry.__doc__ = f"swinlab's {name} (swinlab.create_model({name!r}, ...))."
    return entry


def register_timm_models() -> List[str]:
    """Register every swinlab variant with timm (again only if missing); returns timm's names."""
    from timm.models import is_model, register_model
    names = []
    for name in REGISTRY:
        names.append(timm_name(name))
        if not is_model(timm_name(name)):
            register_model(_entry_point(name))
    return names
