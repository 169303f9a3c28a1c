"""FSDP2 (``fully_shard``) for Swin models under Lightning's ModelParallelStrategy: one unit per block, then the
root, with optional bf16/fp16 parameters (fp32 gradient reduction) and CPU offload."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def _dtype(name: Optional[str], what: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"sharding.{what}={name!r} is unknown: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_sharding(sharding: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Validate the ``sharding`` options of a task (before any training starts)."""
    opts = dict(sharding or {})
    allowed = {"param_dtype", "reduce_dtype", "cpu_offload", "reshard_after_forward"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"unknown sharding option(s) {unknown}: use {sorted(allowed)}")
    _dtype(opts.get("param_dtype"), "param_dtype")
    _dtype(opts.get("reduce_dtype"), "reduce_dtype")
    return opts


def shard_swin(model: torch.nn.Module, device_mesh, sharding: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """Apply ``fully_shard`` to every Swin block and then the whole model; no-op without a device mesh."""
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    opts = check_sharding(sharding)
    names = device_mesh.mesh_dim_names or ()
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    kwargs: Dict[str, Any] = dict(mesh=mesh, reshard_after_forward=bool(opts.get("reshard_after_forward", True)))
    param_dtype = _dtype(opts.get("param_dtype"), "param_dtype")
    if param_dtype is not None:
        reduce_dtype = _dtype(opts.get("reduce_dtype", "float32"), "reduce_dtype")
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if opts.get("cpu_offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for blk in model.blocks():
        fully_shard(blk, **kwargs)
    fully_shard(model, **kwargs)
    return model


def defer_checkpointing_to_strategy(model: torch.nn.Module, trainer: Any) -> bool:
    """Under Lightning's FSDPStrategy with an ``activation_checkpointing_policy``, the strategy wraps each block in a
    checkpoint wrapper: turn the model's own per-block checkpointing off so blocks are not recomputed twice.
    Returns True when it did."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is None or not getattr(strategy, "_activation_checkpointing_kwargs", None):
        return False
    if not getattr(model, "config", {}).get("grad_checkpointing"):
        return False
    model.set_grad_checkpointing(False)
    import logging
    logging.getLogger(__name__).info("FSDPStrategy's activation_checkpointing_policy checkpoints the blocks: "
                                     "model_kwargs.grad_checkpointing is turned off to avoid recomputing twice")
    return True
