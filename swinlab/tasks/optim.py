"""Parameter groups (weight decay / no decay / layer-wise LR decay) and the warmup + cosine schedule.

Kept free of Lightning so tests and other tools can check the grouping without training.
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

# Parameter-name fragments trained without weight decay in the official recipe (V1 table, V2 CPB MLP and logit
# scale). Biases and every 1-D parameter (norm weights, q/v biases) are excluded as well.
NO_DECAY_KEYWORDS: Tuple[str, ...] = ("relative_position_bias_table", "cpb_mlp", "logit_scale")
# Name components that wrappers insert (FSDP1, checkpoint_wrapper, torch.compile's OptimizedModule)
WRAPPER_PREFIXES: Tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_param_name(name: str) -> str:
    """The parameter's name in the unwrapped model (wrapper components removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def true_shape(name: str, param: torch.Tensor, shapes: Optional[Dict[str, Sequence[int]]] = None) -> Tuple[int, ...]:
    """A parameter's real shape, whatever a strategy did to it: DeepSpeed ZeRO-3 partitions to an empty tensor and
    keeps the shape in ``ds_shape``; FSDP1 (``use_orig_params``) exposes flat 1-D views, so the shape recorded from
    the unsharded model (``shapes``, keyed by clean name) is used; FSDP2's DTensors report the global shape."""
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None:
        return tuple(int(d) for d in ds_shape)
    if shapes:
        recorded = shapes.get(clean_param_name(name))
        if recorded is not None:
            return tuple(int(d) for d in recorded)
    return tuple(param.shape)


def record_param_shapes(module: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Record every parameter's true shape on ``module`` (``module.true_param_shapes``, clean names) while it is
    unsharded (or on the meta device), so ``param_groups`` decides weight decay by shape after wrapping."""
    shapes = {clean_param_name(n): true_shape(n, p) for n, p in module.named_parameters()}
    module.true_param_shapes = shapes
    return shapes


def is_no_decay(name: str, param: torch.Tensor, keywords: Iterable[str] = NO_DECAY_KEYWORDS,
                shapes: Optional[Dict[str, Sequence[int]]] = None) -> bool:
    """True for parameters the official recipe does not decay: biases, norms/1-D tensors and the keyword matches.

    The dimension is that of the parameter's true shape (:func:`true_shape`), not of the flat or partitioned tensor
    a sharding strategy leaves in the module. Keywords match any dotted component of the name
    (``layers.0.blocks.1.attn.cpb_mlp.0.weight`` matches ``cpb_mlp``); timm's training script compares whole names
    instead, so its V2 exclusions never match.
    """
    name = clean_param_name(name)
    if len(true_shape(name, param, shapes)) <= 1 or name.endswith(".bias"):
        return True
    parts = name.split(".")
    return any(k in parts or name.endswith(k) for k in keywords)


def layer_ids(model: nn.Module) -> Dict[str, int]:
    """Layer-wise LR decay ids by parameter name (wrapper components removed), from the model's own
    ``group_matcher()`` grouped by ``timm.models.group_parameters``: for swinlab's model the official recipe's ids
    (0 the patch embedding, 1..sum(depths) the blocks, a patch merging with the block before it, the last id the
    final norm and head; see ``SwinTransformer.group_matcher``)."""
    from timm.models import group_parameters
    names = [(clean_param_name(n), p) for n, p in model.named_parameters()]
    clean = types.SimpleNamespace(named_parameters=lambda: iter(names))
    return group_parameters(clean, model.group_matcher(coarse=False), reverse=True)


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: Optional[float] = None,
                 keywords: Optional[Iterable[str]] = None,
                 shapes: Optional[Dict[str, Sequence[int]]] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups for a SwinTransformer.

    Each group holds ``params``, ``weight_decay``, ``name`` (``decay``/``no_decay``, with ``_l<id>`` under layer
    decay), ``param_names`` (wrapper components removed) and, with ``layer_decay``,
    ``lr_scale = layer_decay ** (last id - id)`` (ids: :func:`layer_ids`) which timm's schedulers apply on top of the
    scheduled LR.
    Frozen parameters are left out. Shapes: ``shapes``, else ``model.true_param_shapes`` (recorded by the tasks'
    ``configure_model`` before sharding), else ZeRO-3's ``ds_shape`` / the tensor's own shape.
    """
    if shapes is None:
        shapes = getattr(model, "true_param_shapes", None)
    if keywords is None:
        keywords = getattr(model, "no_weight_decay_keywords", lambda: NO_DECAY_KEYWORDS)()
    keywords = tuple(keywords)
    layered = layer_decay is not None and layer_decay != 1.0
    ids = layer_ids(model) if layered else {}
    total = max(ids.values(), default=0)
    groups: Dict[str, Dict[str, Any]] = {}
    from torch.distributed.tensor import DTensor
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_param_name(name)
        no_decay = is_no_decay(name, p, keywords, shapes)
        key = "no_decay" if no_decay else "decay"
        scale = 1.0
        if layered:
            lid = ids[name]
            key = f"{key}_l{lid}"
            scale = float(layer_decay) ** (total - lid)
        if sharded and not isinstance(p, DTensor):
            # beside FSDP2 shards (SimMIM's replicated decoder and mask token): a group of their own, since torch's
            # foreach/fused AdamW kernels cannot take DTensors and plain tensors in one call
            key = f"{key}_replicated"
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [],
                                        "weight_decay": 0.0 if no_decay else float(weight_decay)})
        if layered:
            group["lr_scale"] = scale
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def scaled_lr(lr: float, global_batch: int, reference_batch: int = 512) -> float:
    """The official linear scaling rule: ``lr * global_batch / 512``."""
    return lr * global_batch / reference_batch


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                            warmup_lr: float, min_lr: float):
    """timm's CosineLRScheduler stepped per update: linear warmup from ``warmup_lr`` over ``warmup_steps``, then
    cosine from each group's LR down to ``min_lr`` at ``total_steps`` (groups' ``lr_scale`` applied on top)."""
    from timm.scheduler import CosineLRScheduler

    warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
    return CosineLRScheduler(optimizer, t_initial=max(1, int(total_steps) - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1,
                             t_in_epochs=False)


def global_batch_size(trainer: Any) -> Optional[int]:
    """batch_size x gradient accumulation x world size, or None when the data module has no ``batch_size``."""
    bs = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if bs is None:
        return None
    return int(bs) * int(trainer.accumulate_grad_batches) * int(trainer.world_size)


def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps per epoch; works before the train dataloader is loaded (``max_steps`` runs)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        dm = getattr(trainer, "datamodule", None)
        try:
            batches = len(dm.train_dataloader())
        except Exception:  # no sized loader: warmup_epochs cannot be converted, one step per epoch
            batches = 1
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def use_fused_adamw(trainer: Any, groups: List[Dict[str, Any]]) -> bool:
    """torch's fused AdamW kernel (one launch for all parameters, and a ``found_inf`` input that lets the non-finite
    guard skip a step on the device without a host sync) wherever it applies: floating parameters on CPU or CUDA,
    and no fp16 GradScaler (Lightning cannot clip gradients of an optimizer that unscales them itself)."""
    if str(getattr(trainer, "precision", "")) in ("16-mixed", "16"):
        return False
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def recipe_optimizer(trainer: Any, groups: List[Dict[str, Any]], *, base_lr: float, warmup_lr: float, min_lr: float,
                     scale_lr: bool, betas: Sequence[float], eps: float, weight_decay: float, warmup_epochs: float,
                     warmup_steps: Optional[int]) -> Dict[str, Any]:
    """AdamW + per-step linear warmup and cosine decay, LRs scaled by global batch / 512 (the official recipe)."""
    import warnings

    from ..errors import ConfigError

    lrs = {"lr": base_lr, "warmup_lr": warmup_lr, "min_lr": min_lr}
    if scale_lr:
        gb = global_batch_size(trainer)
        if gb is None:
            warnings.warn("global batch size unknown (the data module has no batch_size): LR not scaled",
                          stacklevel=2)
        else:
            lrs = {k: scaled_lr(v, gb) for k, v in lrs.items()}
    optimizer = torch.optim.AdamW(groups, lr=lrs["lr"], betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  fused=use_fused_adamw(trainer, groups))
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or int(total) <= 0:
        raise ConfigError("the training length is unbounded: set trainer.max_epochs or trainer.max_steps")
    warmup = int(warmup_steps) if warmup_steps is not None else int(round(warmup_epochs * steps_per_epoch(trainer)))
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=int(total), warmup_steps=warmup,
                                        warmup_lr=lrs["warmup_lr"], min_lr=lrs["min_lr"])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}, "lrs": lrs}
