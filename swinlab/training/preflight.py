"""Checks that stop a scaled-up run before it trains: strategy/accelerator, precision and memory-switch combinations
that cannot work, each reported as one ``ConfigError`` line naming the problem and the fix.

Entry points:

- ``check_config(config)`` looks at the merged configuration (a dict or jsonargparse Namespace with ``trainer`` and
  ``model`` sections) before anything is instantiated: the trainer's values (``max_epochs``, ``devices``,
  ``limit_*_batches``, ... in the ranges Lightning accepts; strategy and accelerator names, with the closest names for
  a misspelt one), DeepSpeed and FSDP1 need CUDA, a V2 model cannot train in ``16-true`` (no gradient scaler),
  ``sharding`` options need ``ModelParallelStrategy``. It depends on the config only, not on this machine.
- ``check_machine(config)`` asks whether this machine has what the config asks for (``trainer.accelerator: gpu``
  without a CUDA device, more CUDA devices than there are); the CLI calls it after ``check_config``.
- ``check_run(trainer, pl_module)`` runs from the tasks' ``setup()`` on every rank, before ``configure_model`` and
  the first step, with the built model: the same precision/sharding rules plus the sequential-attention chunk size.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, List, Optional, Sequence

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


def close_matches(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean a or b?)`` for a misspelt name (difflib; also names that contain it as a ``_`` part, so
    ``lr`` finds ``base_lr``), or an empty string."""
    choices = [str(c) for c in choices]
    word = str(word)
    found = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    found += [c for c in choices if c not in found and word and word in c.split("_")][: 3 - len(found)]
    if not found:
        return ""
    return f" (did you mean {' or '.join(found) if len(found) < 3 else ', '.join(found[:-1]) + ' or ' + found[-1]}?)"


# trainer key -> (lowest accepted int, what the message says is accepted); None is always accepted
_TRAINER_INTS = {
    "max_epochs": (-1, "an int >= 0, or -1 for no limit"),
    "min_epochs": (0, "an int >= 0"),
    "max_steps": (-1, "an int >= 0, or -1 for no limit"),
    "min_steps": (0, "an int >= 0"),
    "num_nodes": (1, "an int >= 1"),
    "accumulate_grad_batches": (1, "an int >= 1"),
    "check_val_every_n_epoch": (1, "an int >= 1, or null"),
    "log_every_n_steps": (0, "an int >= 0"),
    "num_sanity_val_steps": (-1, "an int >= 0, or -1 for the whole validation set"),
    "reload_dataloaders_every_n_epochs": (0, "an int >= 0"),
}


def _names(registry: Any, extra: Sequence[str]) -> List[str]:
    try:
        names = list(registry())
    except Exception:  # pragma: no cover - a broken optional backend: Lightning reports it itself
        names = []
    return list(extra) + sorted(n for n in names if n not in extra)


def strategy_names() -> List[str]:
    """The strategy names Lightning accepts as ``trainer.strategy: <name>``."""
    from lightning.pytorch.strategies import StrategyRegistry
    return _names(StrategyRegistry.available_strategies, ("auto",))


def accelerator_names() -> List[str]:
    """The accelerator names Lightning accepts as ``trainer.accelerator: <name>``."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    return _names(AcceleratorRegistry.available_accelerators, ("auto", "cpu", "gpu", "cuda"))


def check_trainer_values(trainer: Dict[str, Any]) -> None:
    """The trainer section's values in the ranges Lightning accepts, each refused in one line naming the key, the
    value and what is accepted (Lightning itself would stop later, with a traceback)."""
    for key, (low, accepted) in _TRAINER_INTS.items():
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"trainer.{key}={value} is out of range: give {accepted}")
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)  # "2" on the command line: a count, as Lightning reads it
    if isinstance(devices, int) and not isinstance(devices, bool) and (devices == 0 or devices < -1):
        raise ConfigError(f"trainer.devices={devices} is out of range: give the number of devices (>= 1), -1 for "
                          f"all of them, a list of device indices, or auto")
    for split in ("train", "val", "test", "predict"):
        key = f"limit_{split}_batches"
        value = trainer.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if (isinstance(value, int) and value < 0) or (isinstance(value, float) and not 0.0 <= value <= 1.0
                                                      and not (value > 1 and value % 1 == 0)):
            raise ConfigError(f"trainer.{key}={value} is out of range: give a fraction in [0.0, 1.0] or a number "
                              f"of batches (an int >= 0)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool):
        if interval <= 0 or (isinstance(interval, float) and interval > 1.0):
            raise ConfigError(f"trainer.val_check_interval={interval} is out of range: give a fraction of the "
                              f"epoch in (0.0, 1.0] or a number of training batches (an int >= 1)")
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip < 0:
        raise ConfigError(f"trainer.gradient_clip_val={clip} is out of range: give a value >= 0 (0 or null: no "
                          f"clipping)")
    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy.lower() not in strategy_names():
        names = strategy_names()
        hint, shown = close_matches(strategy.lower(), names), ", ".join(n for n in names if "find_unused" not in n)
        raise ConfigError(f"trainer.strategy={strategy!r} is not a strategy name{hint}: use one of {shown}, or a "
                          f"strategy class (experiments/strategy/*.yaml)")
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() not in accelerator_names():
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not an accelerator name"
                          f"{close_matches(accelerator.lower(), accelerator_names())}: use one of "
                          f"{', '.join(accelerator_names())}")


def check_machine(config: Any) -> None:
    """Whether this machine has the accelerator and device count the config asks for: ``trainer.accelerator: gpu``
    (or ``cuda``) without a CUDA device, or more CUDA devices than are visible, is refused in one line. Separate from
    :func:`check_config`, which judges a config as it would run where it is meant to (e.g. the GPU experiments, on
    a machine without one)."""
    trainer = _as_dict(config).get("trainer") or {}
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    name = accelerator.lower()
    mps = name == "gpu" and torch.backends.mps.is_available()
    if not torch.cuda.is_available() and not mps:
        kind = "GPU" if name == "gpu" else "CUDA"
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no {kind} device "
                          f"(torch.cuda.is_available() is False): use --trainer.accelerator cpu (or auto), or run on "
                          f"a machine with a GPU")
    devices, count = trainer.get("devices"), torch.cuda.device_count()
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if not mps and isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
        raise ConfigError(f"trainer.devices={devices} but this machine has {count} CUDA device(s): give at most "
                          f"{count}, or -1 for all of them")


def check_config(config: Any) -> None:
    """Refuse impossible values and combinations in a merged config before any class is instantiated."""
    cfg = _as_dict(config)
    trainer = cfg.get("trainer") or {}
    check_trainer_values(trainer)
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
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)  # "2": a count, as Lightning reads it
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
