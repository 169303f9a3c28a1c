"""Putting a Swin model under a strategy: FSDP2 (``fully_shard``) under Lightning's ModelParallelStrategy, one unit
per block then the root, with optional bf16/fp16 parameters (fp32 gradient reduction), CPU offload and HSDP on
several nodes; per-block ``torch.compile``; and materialising a model built on the meta device (``empty_init``)
under FSDP2, DeepSpeed ZeRO-3 or any other strategy, without any rank holding the full model where it shards."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from ..errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
HSDP_CHOICES = ("auto", True, False)


def _dtype(name: Optional[str], what: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"sharding.{what}={name!r} is unknown: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_sharding(sharding: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Validate the ``sharding`` options of a task (before any training starts)."""
    opts = dict(sharding or {})
    allowed = {"param_dtype", "reduce_dtype", "cpu_offload", "reshard_after_forward", "hsdp"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"unknown sharding option(s) {unknown}: use {sorted(allowed)}")
    _dtype(opts.get("param_dtype"), "param_dtype")
    _dtype(opts.get("reduce_dtype"), "reduce_dtype")
    hsdp = opts.get("hsdp", "auto")
    if not any(hsdp is c if isinstance(c, bool) else hsdp == c for c in HSDP_CHOICES):
        raise ConfigError(f"sharding.hsdp={hsdp!r} is not valid: use auto (HSDP when the run spans several nodes), "
                          f"true or false")
    return opts


def hsdp_mesh_shape(world_size: int, num_nodes: int, hsdp: Any = "auto") -> Optional[Tuple[int, int]]:
    """The (replicate, shard) mesh shape for HSDP, or None for FSDP over all ``world_size`` ranks.

    ``auto``: HSDP when the run spans several nodes with several ranks each (shard within a node, replicate across
    nodes); ``true``: HSDP whenever there is more than one node; ``false``: never.
    """
    if hsdp is False:
        return None
    if num_nodes <= 1:
        if hsdp is True:
            raise ConfigError("sharding.hsdp is true but the run has one node: HSDP replicates across nodes; set "
                              "trainer.num_nodes, or sharding.hsdp: auto")
        return None
    if world_size % num_nodes:
        raise ConfigError(f"{world_size} ranks do not split evenly over {num_nodes} nodes: HSDP needs the same number "
                          f"of devices on every node (or set sharding.hsdp: false)")
    per_node = world_size // num_nodes
    if per_node == 1 and hsdp == "auto":  # one rank per node: nothing to shard within a node, plain FSDP
        return None
    return num_nodes, per_node


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` every Swin block in place (``nn.Module.compile``: parameter names and state-dict keys do not
    change). Activation checkpointing stays outside, in ``SwinStage.forward``; apply before ``fully_shard``."""
    for blk in model.blocks():
        blk.compile()


def shard_swin(model: torch.nn.Module, device_mesh, sharding: Optional[Dict[str, Any]] = None, *,
               num_nodes: int = 1) -> torch.nn.Module:
    """Apply ``fully_shard`` to every Swin block and then the whole model; no-op without a device mesh.

    On several nodes (``num_nodes`` > 1, ``sharding.hsdp`` auto or true) the data-parallel ranks form a 2-D
    (replicate across nodes, shard within a node) mesh: HSDP. Works on a model still on the meta device."""
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    opts = check_sharding(sharding)
    names = device_mesh.mesh_dim_names or ()
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    shape = hsdp_mesh_shape(mesh.size(), int(num_nodes), opts.get("hsdp", "auto"))
    if shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(mesh.device_type, shape, mesh_dim_names=("replicate", "shard"))
        log.info("HSDP: parameters sharded over the %d ranks of a node, replicated over %d nodes", shape[1], shape[0])
    kwargs: Dict[str, Any] = dict(mesh=mesh, reshard_after_forward=bool(opts.get("reshard_after_forward", True)))
    param_dtype = _dtype(opts.get("param_dtype"), "param_dtype")
    if param_dtype is not None:
        reduce_dtype = _dtype(opts.get("reduce_dtype", "float32"), "reduce_dtype")
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if opts.get("cpu_offload"):
        # pinned host memory needs a CUDA driver; a CPU-only run keeps the same code path unpinned
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for blk in model.blocks():
        fully_shard(blk, **kwargs)
    fully_shard(model, **kwargs)
    return model


class OffloadModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy for FSDP2 with CPU offload (experiments/strategy/fsdp2_offload.yaml).

    Lightning moves the whole module to the GPU after ``configure_model`` (``model_to_device``); with
    ``CPUOffloadPolicy`` FSDP2 keeps the sharded parameters on the CPU and refuses them anywhere else, so this
    strategy moves everything except those offloaded shards. Use it with ``process_group_backend:
    "cuda:nccl,cpu:gloo"`` so collectives on the offloaded (CPU) gradients, such as the norm for clipping, have a
    backend (on a machine without CUDA only the CPU part is kept). Without offload it behaves exactly as
    Lightning's."""

    def __init__(self, *args: Any, process_group_backend: Optional[str] = None, **kwargs: Any):
        if process_group_backend and ":" in process_group_backend and not torch.cuda.is_available():
            parts = dict(p.split(":", 1) for p in process_group_backend.split(",") if ":" in p)
            process_group_backend = parts.get("cpu", "gloo")
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    def model_to_device(self) -> None:
        from torch.distributed.tensor import DTensor
        device = self.root_device
        offloaded = device.type != "cpu" and any(isinstance(p, DTensor) and p.device.type == "cpu"
                                                 for p in self.model.parameters())
        if not offloaded:
            return super().model_to_device()
        with torch.no_grad():
            for module in self.model.modules():
                for _name, p in module.named_parameters(recurse=False):
                    if not isinstance(p, DTensor):
                        p.data = p.data.to(device)
                for name, b in module.named_buffers(recurse=False):
                    if b is not None and not isinstance(b, DTensor):
                        module._buffers[name] = b.to(device)


# -- materialising an empty (meta-device) model ----------------------------------------------------------------------
def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def materialize_local(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Any strategy that does not shard at build time: allocate on ``device``, initialise, load a deferred
    checkpoint. The full model on every rank (as an eager build), just built where it is used."""
    model.to_empty(device=device)
    model.init_weights()
    model.load_pending_state_dict()
    return model


def materialize_sharded(model: torch.nn.Module, device: torch.device, cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2 after ``fully_shard`` on the meta device: allocate each rank's shards only (on the CPU with offload),
    initialise them (:meth:`SwinTransformer.init_weights`, DTensor-aware), put the buffers on ``device``, then load a
    deferred checkpoint from rank 0 (``set_model_state_dict(full_state_dict, broadcast_from_rank0)``: rank 0 reads
    the file, every rank keeps its shards, one parameter at a time)."""
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    model.init_weights()
    if cpu_offload:
        model.reset_buffers(device)
    pending = model.pop_pending_state_dict()
    if pending is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        state_dict, strict = pending
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(model, state_dict if _rank() == 0 else {}, options=options)
        del state_dict
    return model


def materialize_zero3(meta_model: torch.nn.Module) -> torch.nn.Module:
    """DeepSpeed ZeRO-3: call inside ``deepspeed.zero.Init`` (Lightning's DeepSpeedStrategy runs ``configure_model``
    in it). Builds the model again from ``meta_model.config`` (parameters are partitioned as each module is
    created), then initialises and loads a deferred checkpoint one module at a time under
    ``GatheredParameters(modifier_rank=0)``: never more than one module's parameters gathered."""
    import deepspeed

    model = type(meta_model)(meta_model.config)
    for attr in ("variant_name", "true_param_shapes"):
        if hasattr(meta_model, attr):
            setattr(model, attr, getattr(meta_model, attr))
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                model.init_module_weights(module)  # every rank draws (RNG streams stay aligned); rank 0's values win
    model.reset_buffers()
    pending = meta_model.pop_pending_state_dict()
    if pending is not None:
        state_dict, strict = pending
        rank0 = _rank() == 0
        for prefix, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0):
                if rank0:
                    for name, param in own.items():
                        value = state_dict.get(f"{prefix}.{name}" if prefix else name)
                        if value is not None:
                            param.data.copy_(value.to(param.dtype))
        del state_dict
    return model


# Lightning's FSDPStrategy keeps its ``activation_checkpointing_policy`` (and the deprecated
# ``activation_checkpointing``) only in this private attribute, and hands it to ``_setup_activation_checkpointing`` in
# ``_setup_model``; it has no public property or method that tells whether it will checkpoint (checked up to
# lightning 2.6). This is the one place swinlab reads it; tests/test_lightning_private.py fails when Lightning drops
# or renames it.
FSDP_ACTIVATION_CHECKPOINTING_ATTR = "_activation_checkpointing_kwargs"


def strategy_checkpoints_activations(strategy: Any) -> bool:
    """True when ``strategy`` (Lightning's FSDPStrategy) wraps modules in activation checkpointing itself."""
    return bool(getattr(strategy, FSDP_ACTIVATION_CHECKPOINTING_ATTR, None))


def defer_checkpointing_to_strategy(model: torch.nn.Module, trainer: Any) -> bool:
    """Under Lightning's FSDPStrategy with an ``activation_checkpointing_policy``, the strategy wraps each block in a
    checkpoint wrapper: turn the model's own per-block checkpointing off so blocks are not recomputed twice.
    Returns True when it did."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is None or not strategy_checkpoints_activations(strategy):
        return False
    if not getattr(getattr(model, "config", None), "grad_checkpointing", False):
        return False
    model.set_grad_checkpointing(False)
    log.info("FSDPStrategy's activation_checkpointing_policy checkpoints the blocks: "
             "model_kwargs.grad_checkpointing is turned off to avoid recomputing twice")
    return True


def grad_total_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The total gradient norm over ``params`` as a plain tensor, where some gradients may be FSDP2 DTensor shards and
    others plain tensors (SimMIM's replicated decoder beside a sharded encoder): each kind is reduced on its own
    (the DTensor part over the mesh) and the two combined. No host sync."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    parts = []
    for kind in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if kind:
            norm = torch.nn.utils.get_total_norm(kind, norm_type)
            parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([p.to(device).float() for p in parts]), norm_type)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that mix DTensor shards and plain tensors."""
    from torch.distributed.tensor import DTensor
    params = [p for p in params if p.grad is not None]
    total = grad_total_norm(params, norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    groups: Dict[Any, List[torch.Tensor]] = {}
    for p in params:  # a DTensor's local shard is scaled in place (same coefficient on every rank)
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), grads in groups.items():
        torch._foreach_mul_(grads, coef.to(device=device, dtype=dtype))
    return total
