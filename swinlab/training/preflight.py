"""Checks that stop a scaled-up run before it trains: strategy/accelerator, precision and memory-switch combinations
that cannot work, each reported as one ``ConfigError`` line naming the problem and the fix.

Two entry points:

- ``check_config(config)`` looks at the merged configuration (a dict or jsonargparse Namespace with ``trainer`` and
  ``model`` sections) before anything is instantiated: DeepSpeed and FSDP1 need CUDA, a V2 model cannot train in
  ``16-true`` (no gradient scaler), ``sharding`` options need ``ModelParallelStrategy``.
- ``check_run(trainer, pl_module)`` runs from the tasks' ``setup()`` on every rank, before ``configure_model`` and
  the first step, with the built model: the same precision/sharding rules plus the sequential-attention chunk size.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

from ..errors import ConfigError
from .sharding import check_sharding


def strategy_family(strategy: Any) -> str:
    """'deepspeed', 'fsdp' (Lightning's FSDPStrategy, FSDP1), 'fsdp2' (ModelParallelStrategy), 'ddp' or 'auto'."""
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        name = strategy.lower()
    elif isinstance(strategy, dict) or hasattr(strategy, "class_path"):
        path = strategy.get("class_path") if isinstance(strategy, dict) else strategy.class_path
        name = str(path or "").rsplit(".", 1)[-1].lower()
    else:
        name = " ".join(c.__name__.lower() for c in type(strategy).__mro__)
    if "deepspeed" in name:
        return "deepspeed"
    if "modelparallel" in name:
        return "fsdp2"
    if name.startswith("fsdp") or "fsdpstrategy" in name:
        return "fsdp"
    if "ddp" in name:
        return "ddp"
    return "auto" if name in ("auto", "") else name


def _as_dict(config: Any) -> Dict[str, Any]:
    if hasattr(config, "as_dict"):
        return config.as_dict()
    return dict(config or {})


def _is_v2(attention: Optional[str], position_bias: Optional[str]) -> bool:
    """Cosine attention (learnable logit scale) or a continuous position bias: the parts fp16 needs scaling for."""
    return attention == "cosine" or str(position_bias or "").startswith("cpb")


def _precision_rules(precision: str, v2: bool, family: str, sharding: Optional[Dict[str, Any]]) -> None:
    precision = str(precision)
    if v2 and precision in ("16-true", "16", "fp16-true"):
        raise ConfigError(f"precision {precision} on a SwinV2 model trains without a gradient scaler (fp16 logit "
                          f"scale and CPB gradients underflow): use bf16-mixed, bf16-true or 16-mixed (GradScaler)")
    if family == "fsdp2" and precision in ("16-mixed", "16"):
        raise ConfigError(f"precision {precision} cannot run under ModelParallelStrategy (FSDP2): Lightning has no "
                          f"gradient scaler for it: use bf16-mixed (or 32-true)")
    if sharding:
        low = str(sharding.get("param_dtype") or "float32")
        if low in ("bfloat16", "bf16", "float16", "fp16") and "mixed" not in precision:
            raise ConfigError(f"sharding.param_dtype {low} needs autocast but trainer.precision is {precision}: use "
                              f"precision bf16-mixed (param_dtype bfloat16), or sharding.param_dtype null for fp32")
        if family != "fsdp2":
            raise ConfigError(f"model.init_args.sharding is set but trainer.strategy is {family}: sharding options "
                              f"apply to ModelParallelStrategy (FSDP2) only: remove sharding or compose "
                              f"experiments/strategy/fsdp2.yaml")
        if v2 and str(sharding.get("param_dtype")) in ("float16", "fp16") and precision != "16-mixed":
            raise ConfigError(f"sharding.param_dtype float16 on a SwinV2 model needs a gradient scaler, which FSDP2 "
                              f"runs do not have (precision {precision}): use param_dtype bfloat16")


def check_config(config: Any) -> None:
    """Refuse impossible combinations in a merged config before any class is instantiated."""
    cfg = _as_dict(config)
    trainer = cfg.get("trainer") or {}
    model = cfg.get("model") or {}
    init = (model.get("init_args") or {}) if isinstance(model, dict) else {}
    family = strategy_family(trainer.get("strategy"))
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and family in ("deepspeed", "fsdp") and not _runs_on_cpu(trainer.get("strategy")):
        what = "DeepSpeed" if family == "deepspeed" else "FSDPStrategy (FSDP1)"
        raise ConfigError(f"{what} needs CUDA GPUs but trainer.accelerator is {accelerator} on a machine "
                          f"{'with' if torch.cuda.is_available() else 'without'} CUDA: on CPU use "
                          f"experiments/strategy/fsdp2.yaml (ModelParallelStrategy) or ddp.yaml")
    if family == "fsdp2":
        _check_mesh_sizes(trainer)
    name = init.get("model_name")
    kwargs = init.get("model_kwargs") or {}
    attention, bias = kwargs.get("attention"), kwargs.get("position_bias")
    if name and (attention is None or bias is None):
        try:
            from ..models.registry import get_variant
            variant = get_variant(name)
        except Exception:  # unknown names are reported by the task itself
            variant = None
        if variant is not None:
            from ..models.swin import PRESETS
            preset = PRESETS.get(kwargs.get("version", variant.config.version), {})
            attention = attention or preset.get("attention")
            bias = bias or preset.get("position_bias")
    sharding = init.get("sharding")
    if sharding:
        check_sharding(sharding)  # the options' own values first: a bad dtype is named before the strategy rule
    _precision_rules(str(trainer.get("precision") or "32-true"), _is_v2(attention, bias), family, sharding)


def _runs_on_cpu(strategy: Any) -> bool:
    """A strategy class that declares ``runs_on_cpu = True`` (the test suite's CPU DeepSpeed subclass) is exempt from
    the CUDA rule; Lightning's own DeepSpeedStrategy and FSDPStrategy are not."""
    path = strategy if isinstance(strategy, str) else (
        strategy.get("class_path") if isinstance(strategy, dict) else getattr(strategy, "class_path", None))
    if not path or "." not in str(path):
        return False
    import importlib
    module, _, name = str(path).rpartition(".")
    try:
        return bool(getattr(getattr(importlib.import_module(module), name), "runs_on_cpu", False))
    except (ImportError, AttributeError):
        return False


def _check_mesh_sizes(trainer: Dict[str, Any]) -> None:
    """ModelParallelStrategy: swinlab shards over data_parallel only (no tensor-parallel plan), so data_parallel_size
    must be the world size and tensor_parallel_size 1 (Lightning's "auto" means num_nodes x devices-per-node TP)."""
    strategy = trainer.get("strategy")
    args = (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}
    dp, tp = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes") or 1)
    world = devices * nodes if isinstance(devices, int) else len(devices) * nodes if isinstance(devices, list) else None
    if tp not in (1, "1"):
        raise ConfigError(f"ModelParallelStrategy tensor_parallel_size={tp}: swinlab has no tensor-parallel plan: set "
                          f"tensor_parallel_size: 1 and data_parallel_size: {world or 'devices x num_nodes'}")
    if world is not None and dp != world:
        raise ConfigError(f"ModelParallelStrategy data_parallel_size={dp} but devices x num_nodes = {world}: set "
                          f"trainer.strategy.init_args.data_parallel_size: {world}")


# -- sequential window attention ---------------------------------------------------------------------------------
def windows_per_stage(model: torch.nn.Module) -> List[int]:
    """Number of attention windows per image in each stage at the model's configured image size (after padding)."""
    out = []
    for geo in model.geometry:
        (h, w), (wh, ww) = geo["resolution"], geo["window"]
        out.append(-(-h // wh) * -(-w // ww))
    return out


def valid_chunk_sizes(windows: Iterable[int]) -> List[int]:
    """Chunk sizes c for which every stage either has at most c windows (no chunking) or a multiple of c."""
    windows = list(windows)
    top = max(windows, default=1)
    return [c for c in range(1, top + 1) if all(n <= c or n % c == 0 for n in windows)]


def check_chunk_size(model: torch.nn.Module) -> None:
    chunk = int(model.config.attn_chunk_size or 0)
    if chunk <= 0:
        return
    windows = windows_per_stage(model)
    bad = [(i, n) for i, n in enumerate(windows) if n > chunk and n % chunk]
    if bad:
        stages = ", ".join(f"stage {i}: {n} windows" for i, n in bad)
        raise ConfigError(f"attn_chunk_size={chunk} does not divide the number of windows ({stages}): use one of "
                          f"{valid_chunk_sizes(windows)} or 0 for off")


def check_run(trainer: Any, pl_module: Any) -> None:
    """Called from the tasks' ``setup()``: every rank, before ``configure_model`` and before the first step."""
    model = getattr(pl_module, "model", None)
    config = getattr(model, "config", None)
    if model is not None and hasattr(model, "geometry"):
        check_chunk_size(model)
    if trainer is None:
        return
    strategy = getattr(trainer, "strategy", None)
    family = strategy_family(strategy)
    precision = str(getattr(trainer, "precision", "32-true"))
    mesh = getattr(strategy, "device_mesh", None) if family == "fsdp2" else None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(f"ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}: swinlab "
                          f"has no tensor-parallel plan: set tensor_parallel_size: 1 and data_parallel_size: "
                          f"{trainer.world_size}")
    sharding = getattr(getattr(pl_module, "hparams", {}), "get", lambda k, d=None: d)("sharding")
    v2 = _is_v2(getattr(config, "attention", None), getattr(config, "position_bias", None))
    _precision_rules(precision, v2, family, sharding)
