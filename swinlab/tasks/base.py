"""What every swinlab LightningModule shares: building the model (eagerly or on the meta device), the checks before a
run, setting the model up under the strategy, the optimizer recipe and the checkpoint metadata."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch

from ..errors import ConfigError
from ..training.preflight import check_run
from ..training.sharding import (
    check_sharding,
    clip_grad_norm,
    compile_blocks,
    defer_checkpointing_to_strategy,
    materialize_local,
    materialize_sharded,
    materialize_zero3,
    shard_swin,
)
from .optim import recipe_optimizer, record_param_shapes

#: the hyperparameters every task names the same way and hands to ``recipe_optimizer`` (AdamW + warmup/cosine)
RECIPE_HPARAMS = ("base_lr", "warmup_lr", "min_lr", "scale_lr", "betas", "eps", "weight_decay", "warmup_epochs",
                  "warmup_steps")

# Lightning's DeepSpeedStrategy warns whenever a module overrides configure_gradient_clipping; SwinTask does only for
# FSDP1 and leaves DeepSpeed's own clipping (from trainer.gradient_clip_val) in charge, so the warning is noise.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


@contextlib.contextmanager
def _mmap_checkpoint_reads():
    """``torch.load`` maps checkpoint files instead of reading them (tensors are paged in when used): an empty-init
    build reads only what it needs from the file until the weights are loaded into the shards."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # pragma: no cover - torch < 2.5: plain reads
        yield
        return
    saved = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = saved


def build_model(name: str, *, empty_init: bool, checkpoint: Optional[str] = None, **kwargs: Any):
    """``create_model(name, checkpoint=..., **kwargs)``; with ``empty_init`` on the meta device (no memory, no
    initialisation): the checkpoint's keys and shapes are checked and its state dict kept for
    ``configure_model`` to load after materialisation (``SwinTransformer.pending_state_dict``)."""
    from ..models import create_model
    from ..models.swin import defer_meta_loads

    if not empty_init:
        return create_model(name, checkpoint=checkpoint, **kwargs)
    with torch.device("meta"), defer_meta_loads(), _mmap_checkpoint_reads():
        return create_model(name, checkpoint=checkpoint, **kwargs)


def _is_zero3(strategy: Any) -> bool:
    return getattr(strategy, "zero_stage_3", False) is True


def _is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy
    return isinstance(strategy, FSDPStrategy)


def check_range(key: str, value: Any, low: float, high: float = float("inf"), *, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> None:
    """``model.init_args.<key>`` must lie between ``low`` and ``high`` (open or closed ends): one ConfigError line
    naming the key, the value and the accepted range otherwise. None is not checked (an unset optional value)."""
    if value is None or isinstance(value, bool):
        return
    bad = value < low or (low_open and value == low) or value > high or (high_open and value == high)
    if bad or value != value:  # NaN is in no range
        if high == float("inf"):
            accepted = f"{'>' if low_open else '>='} {low:g}"
        else:
            accepted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"model.init_args.{key}={value!r} is out of range: it must be {accepted}"
                          f"{f' ({hint})' if hint else ''}")


def check_recipe(hparams: Any) -> None:
    """The optimizer recipe's values (:data:`RECIPE_HPARAMS`) in their ranges, before anything is built: AdamW and the
    schedule would otherwise stop at the first step with a traceback (or train with a negative LR)."""
    get = hparams.get
    check_range("base_lr", get("base_lr"), 0.0, low_open=True, hint="the peak learning rate per 512 images")
    check_range("warmup_lr", get("warmup_lr"), 0.0, hint="the learning rate the warmup starts from")
    check_range("min_lr", get("min_lr"), 0.0, hint="the learning rate the cosine schedule ends at")
    check_range("weight_decay", get("weight_decay"), 0.0)
    check_range("warmup_epochs", get("warmup_epochs"), 0.0)
    check_range("warmup_steps", get("warmup_steps"), 0, hint="null: warmup_epochs decides")
    check_range("eps", get("eps"), 0.0, low_open=True)
    betas = get("betas")
    if betas is not None:
        if len(betas) != 2:
            raise ConfigError(f"model.init_args.betas={list(betas)!r} must be two numbers (AdamW's beta1, beta2), "
                              f"e.g. [0.9, 0.999]")
        for i, beta in enumerate(betas):
            check_range(f"betas[{i}]", beta, 0.0, 1.0, high_open=True, hint="e.g. [0.9, 0.999]")


class SwinTask(pl.LightningModule):
    """Base class of the LightningModules that hold a registry Swin as ``self.model`` (named ``self.model_name``) and
    have ``sharding`` / ``compile`` / ``empty_init`` hyperparameters and the recipe ones (:data:`RECIPE_HPARAMS`).

    A task declares its own arguments, among them the recipe's learning rates and warmup (``base_lr``, ``warmup_lr``,
    ``min_lr``, ``warmup_epochs``: their defaults are its paper's), and passes the rest on with
    ``super().__init__(**recipe)``: the recipe settings both papers share are declared once, here, and LightningCLI
    and ``--print_config`` show them under the task (jsonargparse follows ``**recipe`` to this signature). This
    constructor saves all of the task's arguments as hyperparameters and checks them (:meth:`check_hparams`).

    A task supplies :meth:`optimizer_param_groups` (what it trains, and with which weight decay) and may add
    :meth:`check_data`. The rest is here: ``setup``, ``configure_model``, ``configure_optimizers``,
    ``lr_scheduler_step``, clipping and checkpoint metadata."""

    def __init__(self, *, scale_lr: bool = True, warmup_steps: Optional[int] = None, weight_decay: float = 0.05,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """``scale_lr``: LRs are per 512 images, scaled by the global batch (batch x accumulation x devices);
        ``warmup_steps`` overrides the task's ``warmup_epochs``; ``weight_decay`` on weights only (biases, norms,
        relative_position_bias_table, cpb_mlp, logit_scale get none); ``betas``, ``eps``: AdamW's."""
        super().__init__()
        self.save_hyperparameters()  # this frame's arguments and the calling task's (Lightning collects both)
        self.check_hparams()

    _configured = False
    backbone_attr = "model"  # the attribute that holds the Swin model (SimMIM: "encoder")

    _batch_images = 0
    _flops_per_image: Optional[int] = None

    @property
    def flops_per_batch(self) -> Optional[float]:
        """FLOPs of the last batch over all ranks, for Lightning's ``ThroughputMonitor`` (FLOPs/s and MFU): the
        model's analytic multiply-adds per image (``swinlab.models.flops.model_macs``) x 2, x 3 in training (forward +
        backward), x images per batch x data-parallel ranks."""
        model = getattr(self, self.backbone_attr, None)
        if model is None or not hasattr(model, "config") or not self._batch_images:
            return None
        if self._flops_per_image is None:
            from ..models.flops import model_macs
            self._flops_per_image = 2 * model_macs(model)
        trainer = self.attached_trainer()
        world = trainer.world_size if trainer is not None else 1
        return float(self._flops_per_image * (3 if self.training else 1) * self._batch_images * world)

    def _count_images(self, batch: Any) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._batch_images = int(x.shape[0]) if hasattr(x, "shape") else 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._count_images(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count_images(batch)

    def attached_trainer(self) -> Optional[Any]:
        """The Trainer this module is attached to, or None (built alone, as in tests and tools): Lightning's public
        ``self.trainer`` raises RuntimeError while no trainer is attached."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # -- checks -------------------------------------------------------------------------------------------------------
    def check_hparams(self) -> None:
        """Checks on the constructor arguments that every task makes, right after ``save_hyperparameters()``: the
        recipe values (:func:`check_recipe`), the ``sharding`` options, and ``empty_init`` with an EMA copy (tasks that
        have ``ema_decay``)."""
        check_recipe(self.hparams)
        check_sharding(self.hparams.get("sharding"))
        if self.hparams.get("empty_init") and self.hparams.get("ema_decay") is not None:
            raise ConfigError("ema_decay is set with empty_init: the EMA copy is made in __init__, from a model that "
                              "is still on the meta device (and would be a full unsharded copy on every rank): set "
                              "model.init_args.ema_decay: null, or empty_init: false")

    def setup(self, stage: str) -> None:
        """Every rank, before ``configure_model``: the run's strategy/precision/chunk-size rules (``check_run``), then
        the task's own checks of the data module (:meth:`check_data`); in fit, the data module's ``preprocessing``
        becomes the weights' (:meth:`weights_preprocessing`)."""
        trainer = self.attached_trainer()
        check_run(trainer, self)
        datamodule = getattr(trainer, "datamodule", None)
        self.check_data(datamodule)
        preprocessing = getattr(datamodule, "preprocessing", None)
        if stage == "fit" and preprocessing:
            self.set_weights_preprocessing(preprocessing)
            self._preprocessing_from_data = True

    # -- what the weights expect of their input -----------------------------------------------------------------------
    _weights_preprocessing: Optional[Dict[str, Any]] = None
    _preprocessing_from_data = False

    def weights_preprocessing(self) -> Optional[Dict[str, Any]]:
        """The preprocessing (mean, std, input_size, interpolation, crop_pct) the weights were trained with, where
        known: the data module's in fit, a restored Lightning checkpoint's, or what the ``checkpoint=`` file the
        backbone was built from recorded. None otherwise."""
        if self._weights_preprocessing is not None:
            return self._weights_preprocessing
        return getattr(getattr(self, self.backbone_attr, None), "preprocessing", None)

    def set_weights_preprocessing(self, preprocessing: Dict[str, Any]) -> None:
        """Record ``preprocessing`` as the weights' (also in the backbone's ``pretrained_cfg``)."""
        from ..models.hub import apply_preprocessing, preprocessing_of
        self._weights_preprocessing = preprocessing_of(preprocessing)
        model = getattr(self, self.backbone_attr, None)
        if isinstance(getattr(model, "pretrained_cfg", None), dict):
            model.pretrained_cfg = apply_preprocessing(model.pretrained_cfg, self._weights_preprocessing)

    def check_data(self, datamodule: Any) -> None:
        """Compare the data module (None without one) with the model; nothing to compare by default."""

    def configure_model(self) -> None:
        """Set the model up under the strategy, in this order:

        1. record every parameter's true shape (weight decay is decided by shape, after sharding);
        2. an empty-init (meta-device) model is materialised: under DeepSpeed ZeRO-3 it is built again inside
           ``deepspeed.zero.Init`` and initialised module by module; under any strategy without a device mesh it is
           allocated on the device and initialised; under FSDP2 only after step 4, shard by shard;
        3. ``torch.compile`` per block, in place, if asked (activation checkpointing stays per block, outside);
        4. FSDP2 under ModelParallelStrategy: ``fully_shard`` per block then the root (HSDP on several nodes).
        FSDP1's own activation checkpointing replaces the model's. A deferred checkpoint is loaded after
        materialisation.
        """
        if self._configured:
            return
        self._configured = True
        trainer = self.attached_trainer()
        strategy = getattr(trainer, "strategy", None)
        model = getattr(self, self.backbone_attr)
        record_param_shapes(self)
        record_param_shapes(model)
        defer_checkpointing_to_strategy(model, trainer)
        mesh = self.device_mesh
        meta = model.is_meta()
        device = getattr(strategy, "root_device", None) or torch.device("cpu")
        if meta and mesh is None:
            if _is_zero3(strategy):
                model = materialize_zero3(model)
                setattr(self, self.backbone_attr, model)
            else:  # FSDP1 wraps (and moves) a CPU model unit by unit, as it does an eager build
                materialize_local(model, torch.device("cpu") if _is_fsdp1(strategy) else device)
            meta = False
        if self.hparams.get("compile"):
            compile_blocks(model)
        sharding = self.hparams.get("sharding")
        shard_swin(model, mesh, sharding, num_nodes=int(getattr(trainer, "num_nodes", 1) or 1))
        if meta:
            materialize_sharded(model, device, cpu_offload=bool((sharding or {}).get("cpu_offload")))

    # -- optimisation ---------------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict[str, Any]]:
        """The AdamW parameter groups (``swinlab.tasks.optim.param_groups``): which parameters the task trains, with
        which weight decay and LR scale."""
        raise NotImplementedError(f"{type(self).__name__} must define optimizer_param_groups()")

    def configure_optimizers(self) -> Dict[str, Any]:
        """AdamW over :meth:`optimizer_param_groups` with the official per-step warmup + cosine schedule; the LRs
        (per 512 images, scaled by the global batch unless ``scale_lr`` is false), AdamW's settings and the warmup
        length are the task's hyperparameters (:data:`RECIPE_HPARAMS`)."""
        conf = recipe_optimizer(self.trainer, self.optimizer_param_groups(),
                                **{name: self.hparams[name] for name in RECIPE_HPARAMS})
        conf.pop("lrs")  # the scaled LRs, for recipe_optimizer's callers; Lightning takes only its own keys
        return conf

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """timm's scheduler is stepped per optimizer update, by update count."""
        scheduler.step_update(num_updates=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, with two exceptions Lightning's precision plugins refuse:

        - FSDPStrategy (FSDP1): its plugin has no handle on the root module; the root
          ``FullyShardedDataParallel.clip_grad_norm_`` clips by the norm over all shards;
        - fused AdamW under ``*-mixed`` without a GradScaler (bf16-mixed): Lightning's AMP plugin refuses every
          optimizer that could unscale gradients itself, though nothing is scaled here; the gradients are the true
          ones, so they are clipped as Lightning's base plugin does (``clip_grad_norm_`` / ``clip_grad_value_`` over
          the optimizer's parameters; DTensor-aware under FSDP2).
        DeepSpeed clips inside its engine (from trainer.gradient_clip_val)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
        strategy = self.trainer.strategy
        if not gradient_clip_val or isinstance(strategy, DeepSpeedStrategy):
            return self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                       gradient_clip_algorithm=gradient_clip_algorithm)
        by_value = str(gradient_clip_algorithm or "norm") == "value"
        if isinstance(strategy, FSDPStrategy):
            if by_value:
                raise ConfigError("gradient_clip_algorithm=value is not supported under FSDPStrategy (FSDP1): use "
                                  "trainer.gradient_clip_algorithm: norm")
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return None
        inner = getattr(optimizer, "optimizer", optimizer)
        if getattr(inner, "defaults", {}).get("fused") and getattr(self.trainer.precision_plugin, "scaler",
                                                                   None) is None:
            params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
            if by_value:
                torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
            else:
                clip_grad_norm(params, float(gradient_clip_val))  # DTensor shards and plain grads may mix
            return None
        return self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                   gradient_clip_algorithm=gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Lets ``create_model(name, checkpoint=...)`` rebuild the saved geometry from a Lightning checkpoint, with
        the preprocessing the weights were trained with (``pretrained_cfg``) where it is known."""
        model = getattr(self, self.backbone_attr)
        checkpoint["swinlab"] = {"model": self.model_name, "config": model.config.to_dict()}
        preprocessing = self.weights_preprocessing()
        if preprocessing:
            checkpoint["swinlab"]["pretrained_cfg"] = dict(preprocessing)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """A checkpoint's recorded preprocessing becomes the weights' (not in fit, where the data module's counts)."""
        saved = (checkpoint.get("swinlab") or {}).get("pretrained_cfg")
        if saved and not self._preprocessing_from_data:
            from ..models.hub import check_preprocessing
            self.set_weights_preprocessing(check_preprocessing(saved, "the checkpoint"))
