"""swinlab's variants in timm's model registry, as ``swinlab_<name>`` (a prefix no timm model uses), so that
``timm.create_model("swinlab_swinv2_pico_patch2_window4_32", features_only=True)`` builds swinlab's model.

Registered through timm's public ``register_model`` when ``swinlab.models`` is imported (timm is imported by then
anyway: the blocks use its layers), each with its default config (``default_cfgs`` below, as a timm model module
declares them: input size, pool size, mean/std, first conv, classifier; no weights, so ``timm.list_pretrained()``
leaves them out). ``pretrained=True`` / a tag go through :func:`swinlab.create_model`; so do timm's ``device`` and
``dtype``. ``features_only=True`` gives swinlab's own feature model (NHWC maps, ``output_fmt``); with a
``feature_cls`` ("getter", "fx", "list", "dict", "hook" or a class) or a ``feature_cfg``, timm's wrapper of that
class around swinlab's model, built by timm's ``build_model_with_cfg`` as for timm's own models.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from .factory import create_model
from .hub import build_pretrained_cfg
from .registry import REGISTRY

PREFIX = "swinlab_"
__all__: List[str] = []  # timm's register_model appends each entry point's name
default_cfgs: Dict[str, Dict[str, Any]] = {}  # timm's register_model reads the cfg of each name here


def timm_name(name: str) -> str:
    """timm's name for swinlab variant ``name``."""
    return PREFIX + name


def default_cfg(name: str) -> Dict[str, Any]:
    """timm's default (pretrained) config of swinlab variant ``name``: the model's own ``pretrained_cfg`` at its
    default size, without weights (swinlab loads weights itself: ``pretrained=True`` goes to swinlab.create_model)."""
    from timm.models import PretrainedCfg
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = build_pretrained_cfg(REGISTRY[name].config.resolved(), name)
    cfg.update(url="", hf_hub_id=None, file=None, state_dict=None)
    return {k: v for k, v in cfg.items() if k in fields and k not in ("architecture", "tag")}


def _entry_point(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = False, pretrained_cfg: Optional[Any] = None,
              pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
              features_only: bool = False, feature_cls: Optional[Any] = None,
              feature_cfg: Optional[Dict[str, Any]] = None, **kwargs: Any):
        # timm passes the tag of "swinlab_<name>.<tag>" as pretrained_cfg (swinlab registers no weights of its own;
        # the tag's are timm's, looked up by create_model); cache_dir: the Hugging Face cache's own is used
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) and pretrained_cfg else None
        arch = name if tag is None else f"{name}.{tag}"
        feature_cfg = dict(feature_cfg or {})
        if feature_cls is not None:
            feature_cfg["feature_cls"] = feature_cls
        if features_only and not feature_cfg:  # swinlab's own features-only model (timm's default class's maps)
            model = create_model(arch, pretrained=pretrained, features_only=True, **kwargs)
        else:
            out_indices = kwargs.pop("out_indices", None)
            model = create_model(arch, pretrained=pretrained, **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = dict(model.pretrained_cfg, **pretrained_cfg_overlay)
        if not features_only or not feature_cfg:
            return model
        from timm.models import build_model_with_cfg
        feature_cfg.setdefault("flatten_sequential", True)  # as timm's Swin: stage i is the module "layers.i"
        if out_indices is not None:
            feature_cfg["out_indices"] = out_indices
        feature_cfg.setdefault("out_indices", tuple(range(len(model.layers))))
        built = model
        return build_model_with_cfg(lambda **_: built, timm_name(name), pretrained=False,
                                    pretrained_cfg=dict(model.pretrained_cfg), feature_cfg=feature_cfg,
                                    features_only=True)

    entry.__name__ = entry.__qualname__ = timm_name(name)
    entry.__module__ = __name__
    entry.__doc__ = f"swinlab's {name} (swinlab.create_model({name!r}, ...))."
    return entry


def register_timm_models() -> List[str]:
    """Register every swinlab variant with timm (again only if missing), with its default config; returns timm's
    names."""
    from timm.models import is_model, register_model
    names = []
    for name in REGISTRY:
        names.append(timm_name(name))
        if not is_model(timm_name(name)):
            default_cfgs[timm_name(name)] = default_cfg(name)
            register_model(_entry_point(name))
    return names
