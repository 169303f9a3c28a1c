"""``create_model``: a registry variant at any image and window size, optionally from a checkpoint of any layout."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from ..errors import CheckpointError
from .checkpoint import infer_num_classes, load_into_model, read_checkpoint
from .config import RUNTIME_FIELDS, SwinConfig, per_stage
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

    The name gives the checkpoint's architecture; ``img_size`` / ``window_size`` give the target; ``overrides`` are
    other :class:`~swinlab.models.config.SwinConfig` fields. With a checkpoint: V1 bias tables are resized
    bicubically, V2's CPB MLP is re-evaluated with ``pretrained_window_size`` set to the checkpoint's windows (unless
    given). ``checkpoint`` may be a swinlab safetensors file or Lightning .ckpt (their saved config gives the source
    geometry), a timm state_dict, or an official microsoft/Swin-Transformer checkpoint.
    """
    variant = get_variant(name)
    source = variant.config
    state_dict = None
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(checkpoint)
        saved: Optional[SwinConfig] = meta.get("config")
        if saved is not None:  # a swinlab file knows the geometry it was saved at
            ours, theirs = variant.config.resolved(), saved.resolved()
            mismatched = [k for k in ARCHITECTURE_FIELDS if getattr(theirs, k) != getattr(ours, k)]
            if mismatched:
                raise CheckpointError(
                    f"checkpoint {checkpoint} was saved from {meta.get('model', 'another model')!r}, whose "
                    f"{', '.join(mismatched)} differ from {name!r}: create it with model={meta.get('model')!r}")
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
    target = source.replace(**changes)
    moved = img_size is not None or window_size is not None
    if pretrained_window_size is not None:
        target = target.replace(pretrained_window_size=pretrained_window_size)
    elif checkpoint is not None and moved and target.resolved().position_bias.startswith("cpb"):
        target = target.replace(pretrained_window_size=cpb_source_windows(source))
    model = SwinTransformer(target)
    model.variant_name = variant.name
    if state_dict is not None:
        load_into_model(model, state_dict, source=source, checkpoint=str(checkpoint),
                        reset_head=num_classes is not None)
    return model
