"""``create_model``: a registry variant at any image and window size, optionally from a checkpoint of any layout."""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Sequence, Union

import torch

from ..errors import CheckpointError, ConfigError
from .checkpoint import infer_num_classes, load_into_model, read_checkpoint
from .config import RUNTIME_FIELDS, SwinConfig, per_stage
from .hub import (
    HF_PREFIX,
    apply_preprocessing,
    build_pretrained_cfg,
    fetch,
    list_tags,
    resolve_tag,
    split_tag,
    weights_source,
)
from .registry import get_variant
from .swin import SwinTransformer, stage_geometry

# what a swinlab checkpoint's saved config must share with the variant it is loaded as
ARCHITECTURE_FIELDS = ("embed_dim", "depths", "num_heads", "version", "patch_size")


def cpb_source_windows(config: SwinConfig) -> List[List[int]]:
    """The window each stage's CPB was trained against at ``config``: its pretrained window if set, else its clamped
    window (what a V2 model moved to another size needs as ``pretrained_window_size``)."""
    pretrained = per_stage(config.pretrained_window_size, config.num_stages, "pretrained_window_size")
    geometry = stage_geometry(config.img_size, config.patch_size, config.window_size, config.num_stages)
    return [list(p if p[0] > 0 else g["window"]) for p, g in zip(pretrained, geometry)]


def _hub_architecture(repo: str) -> str:
    """The architecture (and tag) a ``hf-hub:org/name[@rev]`` model name stands for: timm names its repos
    ``arch.tag``."""
    arch, tag = split_tag(repo.split("@")[0].split("/")[-1])
    try:
        name = get_variant(arch).name
    except ConfigError:
        raise ConfigError(f"cannot tell the architecture of {HF_PREFIX}{repo} from its name: call "
                          f"create_model(<architecture>, checkpoint='{HF_PREFIX}{repo}')") from None
    return f"{name}.{tag}" if tag in list_tags(name) else name  # a timm tag: its pretrained_cfg


def create_model(
        name: str,
        *,
        pretrained: Union[bool, str] = False,
        checkpoint: Optional[str] = None,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        window_size: Optional[Union[int, Sequence[Any]]] = None,
        pretrained_window_size: Optional[Union[int, Sequence[Any]]] = None,
        num_classes: Optional[int] = None,
        features_only: bool = False,
        out_indices: Optional[Union[int, Sequence[int]]] = None,
        feature_fmt: str = "NHWC",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        **overrides: Any,
) -> SwinTransformer:
    """Build a registry model, optionally loading ``checkpoint`` and moving it to another size/window.

    The name gives the checkpoint's architecture; ``img_size`` / ``window_size`` give the target; ``overrides`` are
    other :class:`~swinlab.models.config.SwinConfig` fields. With a checkpoint: V1 bias tables are resized
    bicubically, V2's CPB MLP is re-evaluated with ``pretrained_window_size`` set to the checkpoint's windows (unless
    given). ``checkpoint`` may be a swinlab safetensors file or Lightning .ckpt (their saved config gives the source
    geometry), a timm state_dict, or an official microsoft/Swin-Transformer checkpoint; ``hf-hub:org/repo[@rev]``
    (downloaded through the Hugging Face cache) or an ``http(s)://`` URL (through the torch.hub cache).

    Pretrained weights by timm's names: ``create_model("swinv2_tiny_window8_256.ms_in1k", pretrained=True)``, or
    the architecture with ``pretrained=True`` (timm's default tag) or ``pretrained="ms_in1k"`` (that tag), or the
    name ``"hf-hub:timm/<arch>.<tag>"``. ``model.pretrained_cfg`` is timm's config of that tag (input size, mean/std,
    crop) at the model's own size; with a ``checkpoint`` that records its preprocessing (every file swinlab writes:
    the run's mean, std, interpolation, crop_pct), those, so ``timm.data.resolve_data_config(model=model)`` gives
    the transforms the weights were trained with (``model.preprocessing``: that record, None without one).
    ``features_only=True``: a feature extractor returning the maps of stages ``out_indices`` (default all) as timm's
    ``features_only`` Swin models do (NHWC; ``feature_fmt="NCHW"``), with ``feature_info``
    (:meth:`~swinlab.models.swin.SwinTransformer.as_features`). ``device`` / ``dtype``: as timm's factory arguments,
    where the parameters and buffers are created (``"meta"``: none allocated) and their floating-point dtype.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    if name.startswith(HF_PREFIX):  # timm's hf-hub:org/arch.tag model names: the repo gives the weights
        if checkpoint is not None or pretrained:
            raise ConfigError(f"{name} already names its weights: drop checkpoint=/pretrained=")
        checkpoint, name = name, _hub_architecture(name[len(HF_PREFIX):])
    arch, tag = split_tag(name)
    if isinstance(pretrained, str) and pretrained:
        if tag is not None and tag != pretrained:
            raise ConfigError(f"{name} and pretrained={pretrained!r} name two tags: give one")
        tag, pretrained = pretrained, True
    variant = get_variant(arch)
    tag_classes = None
    if tag is not None or pretrained:
        cfg = resolve_tag(variant.name, tag)  # one line naming the tags there are if this one is not
        tag, tag_classes = cfg["tag"], cfg.get("num_classes")
        if pretrained:
            if checkpoint is not None:
                raise ConfigError(f"pretrained=True and checkpoint={checkpoint!r} both give weights: pass one")
            checkpoint = weights_source(cfg)
    source = variant.config
    state_dict, saved_preprocessing = None, None
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(fetch(checkpoint))  # a local path is returned as it is
        saved_preprocessing = meta.get("pretrained_cfg")
        saved: Optional[SwinConfig] = meta.get("config")
        if saved is not None:  # a swinlab file knows the geometry it was saved at
            given = {k: v for k, v in overrides.items() if k in ARCHITECTURE_FIELDS}  # e.g. a narrower embed_dim
            ours, theirs = variant.config.replace(**given).resolved(), saved.resolved()
            mismatched = [k for k in ARCHITECTURE_FIELDS if getattr(theirs, k) != getattr(ours, k)]
            if mismatched:
                asked = f"{name!r} with {given}" if given else repr(name)
                saved_from = meta.get("model")  # None in a file saved without a variant name
                fix = (f"model={saved_from!r}{' and the same settings' if given else ''}" if saved_from
                       else ", ".join(f"{k}={getattr(saved, k)!r}" for k in mismatched))
                raise CheckpointError(
                    f"checkpoint {checkpoint} was saved from {repr(saved_from) if saved_from else 'another model'}, "
                    f"whose {', '.join(mismatched)} differ from {asked}: create it with {fix}")
            source = saved.replace(**{k: getattr(variant.config, k) for k in RUNTIME_FIELDS})
    changes = dict(overrides)
    if img_size is not None:
        changes["img_size"] = img_size
    if window_size is not None:
        changes["window_size"] = window_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    elif state_dict is not None:
        inferred = infer_num_classes(state_dict)
        if inferred is not None:
            changes["num_classes"] = inferred
    elif tag_classes:  # as timm: "arch.tag" has the tag's classifier (e.g. 21841 classes for ImageNet-22k)
        changes["num_classes"] = tag_classes
    target = source.replace(**changes)
    moved = img_size is not None or window_size is not None
    if pretrained_window_size is not None:
        target = target.replace(pretrained_window_size=pretrained_window_size)
    elif checkpoint is not None and moved and target.resolved().position_bias.startswith("cpb"):
        target = target.replace(pretrained_window_size=cpb_source_windows(source))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = SwinTransformer(target)
    model.variant_name = variant.name
    model.pretrained_cfg = build_pretrained_cfg(model.config, variant.name, tag)
    model.preprocessing = saved_preprocessing  # what the weights were trained with, as the file recorded it
    if saved_preprocessing:
        model.pretrained_cfg = apply_preprocessing(model.pretrained_cfg, saved_preprocessing)
    if state_dict is not None:
        load_into_model(model, state_dict, source=source, checkpoint=str(checkpoint),
                        reset_head=num_classes is not None)
    if dtype is not None:
        model.to(dtype=dtype)
    if features_only:
        model.as_features(out_indices, feature_fmt)
    elif out_indices is not None:
        raise ConfigError("out_indices is for features_only=True models: add features_only=True, or drop it")
    return model
