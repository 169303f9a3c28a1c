"""ImageClassifier: any registry Swin model trained with the official recipe through Lightning."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..errors import CheckpointError, ConfigError
from ..training.preflight import close_matches
from .base import SwinTask, build_model, check_range
from .optim import param_groups

MAX_CLASS_NAME = 256  # characters: a class name read from a checkpoint


class ImageClassifier(SwinTask):
    """Swin classifier with the official ImageNet recipe as defaults.

    Args:
        model_name: registry name or alias (``python -m swinlab models``).
        num_classes: classifier width; ``null`` in a config: the data's class count (image folders: the class
            folders of ``train/``), counted by the CLI before the model is built.
        model_kwargs: overrides passed to ``create_model`` (img_size, window_size, drop_path_rate,
            grad_checkpointing, fused_attn, attn_chunk_size, position_bias, ...).
        checkpoint: weights to start from (swinlab safetensors, Lightning .ckpt, timm or official file); the head
            is re-initialised when its class count differs.
        compile: ``torch.compile`` the backbone (in place, so checkpoint keys do not change).
        base_lr, warmup_lr, min_lr: per 512 images; scaled by the global batch (batch x accumulation x devices)
            unless ``scale_lr`` is false.
        warmup_epochs: linear warmup length (per-step schedule); ``warmup_steps`` overrides it.
        weight_decay: on weights only: biases, norms, relative_position_bias_table, cpb_mlp, logit_scale get none.
        layer_decay: layer-wise LR decay for fine-tuning (e.g. 0.9), None for off.
        label_smoothing: used alone or inside Mixup/CutMix.
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode: timm Mixup (off when mixup and cutmix are 0).
        ema_decay: keep an EMA of the weights (timm ModelEmaV3) and validate it too (``val/acc1_ema``); None: off.
        sharding: FSDP2 options under ModelParallelStrategy (``param_dtype``, ``reduce_dtype``, ``cpu_offload``,
            ``reshard_after_forward``, ``hsdp``: auto/true/false); see ``swinlab.training.sharding`` and
            experiments/strategy/fsdp2*.yaml.
        empty_init: build the model on the meta device (no memory) and materialise it in ``configure_model``: under
            FSDP2 and DeepSpeed ZeRO-3 each rank then only ever holds its shards; ``checkpoint`` is loaded after.
            Not with ``ema_decay``.
    """

    def __init__(
            self,
            model_name: str = "swinv2_pico_patch2_window4_32",
            num_classes: Optional[int] = 1000,
            model_kwargs: Optional[Dict[str, Any]] = None,
            checkpoint: Optional[str] = None,
            compile: bool = False,
            base_lr: float = 5e-4,
            warmup_lr: float = 5e-7,
            min_lr: float = 5e-6,
            warmup_epochs: float = 20.0,
            layer_decay: Optional[float] = None,
            label_smoothing: float = 0.1,
            mixup: float = 0.8,
            cutmix: float = 1.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            mixup_mode: str = "batch",
            ema_decay: Optional[float] = None,
            ema_warmup: bool = False,
            sharding: Optional[Dict[str, Any]] = None,
            empty_init: bool = False,
            **recipe: Any,
    ):
        super().__init__(**recipe)
        if num_classes is None:
            raise ConfigError("num_classes is null: through `python -m swinlab` that takes the class count from the "
                              "data (an image folder); in Python give the number")
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes} must be >= 1: set model.init_args.num_classes")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"layer_decay={layer_decay} must be in (0, 1]: e.g. 0.9 for fine-tuning, null for off")
        if mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"model.init_args.mixup_mode={mixup_mode!r} is unknown"
                              f"{close_matches(mixup_mode, ('batch', 'pair', 'elem'))}: use batch, pair or elem")
        check_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True, hint="0 for off, e.g. 0.1")
        check_range("mixup", mixup, 0.0, hint="Mixup's alpha, 0 for off")
        check_range("cutmix", cutmix, 0.0, hint="CutMix's alpha, 0 for off")
        check_range("mixup_prob", mixup_prob, 0.0, 1.0)
        check_range("mixup_switch_prob", mixup_switch_prob, 0.0, 1.0)
        check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True, hint="e.g. 0.9998, null for off")
        kwargs = dict(model_kwargs or {})
        for key in ("num_classes", "checkpoint"):
            if key in kwargs:
                raise ConfigError(f"model_kwargs.{key} is not allowed: set model.init_args.{key} instead")
        self.model_name = model_name
        try:
            self.model = build_model(model_name, empty_init=empty_init, checkpoint=checkpoint,
                                     num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model_kwargs for {model_name!r} are invalid ({exc}): use SwinTransformer "
                              f"constructor arguments") from None
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=label_smoothing,
                                  num_classes=num_classes)
            from timm.loss import SoftTargetCrossEntropy
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.val_loss = nn.CrossEntropyLoss()
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup)
            self.ema.requires_grad_(False)
        top5 = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro")
        if self.ema is not None:
            self.val_acc1_ema = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.class_names: Optional[List[str]] = None  # from the data (folder names) or the checkpoint
        self.test_acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro")

    # -- model set-up ---------------------------------------------------------------------------------------------
    def check_data(self, datamodule: Any) -> None:
        """The data module's class count and image size (where it has them) must be the model's."""
        dm = datamodule
        names = getattr(dm, "class_names", None)
        if names and len(names) == self.hparams.num_classes:
            self.class_names = list(names)  # saved in the checkpoint: predictions name the classes
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ConfigError(f"the data has {n} classes but model.init_args.num_classes is "
                              f"{self.hparams.num_classes}: set model.init_args.num_classes: {n}")
        size = getattr(dm, "img_size", None)
        if size is not None:
            want = tuple(self.model.img_size)
            got = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
            if got != want:
                raise ConfigError(f"data.init_args.img_size is {got[0]}x{got[1]} but the model is built for "
                                  f"{want[0]}x{want[1]}: set model.init_args.model_kwargs.img_size: {got[0]} "
                                  f"or change the data size")

    # -- steps ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if self.mixup_fn is not None:
            if x.shape[0] % 2:
                raise ConfigError(f"Mixup/CutMix needs an even batch, got {x.shape[0]}: use an even batch_size "
                                  f"and drop_last (the swinlab data modules do)")
            x, y = self.mixup_fn(x, y)
        logits = self.model(x)
        loss = self.train_loss(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _eval_step(self, batch, prefix: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = self.val_loss(logits, y)
        acc1, acc5 = (self.val_acc1, self.val_acc5) if prefix == "val" else (self.test_acc1, self.test_acc5)
        acc1(logits, y)
        acc5(logits, y)
        bs = x.shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log(f"{prefix}/acc1", acc1, prog_bar=True, batch_size=bs)
        self.log(f"{prefix}/acc5", acc5, batch_size=bs)
        if prefix == "val" and self.ema is not None:
            self.val_acc1_ema(self.ema.module(x), y)
            self.log("val/acc1_ema", self.val_acc1_ema, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.model(x).softmax(-1)
        conf, pred = probs.max(-1)
        return {"pred": pred, "conf": conf, "probs": probs}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.class_names:
            checkpoint["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        names = checkpoint.get("class_names")
        if names:  # data: written into prediction files, so checked as the data module's folder names would be
            n = self.hparams.num_classes
            if not isinstance(names, (list, tuple)) or len(names) != n or not all(
                    isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME and c.isprintable() for c in names):
                raise CheckpointError(
                    f"the checkpoint's class_names are not {n} printable names of at most {MAX_CLASS_NAME} "
                    f"characters ({type(names).__name__} of {len(names) if hasattr(names, '__len__') else '?'}): "
                    f"the file is damaged or not made by swinlab; re-save it, or load its weights with "
                    f"model.init_args.checkpoint")
            self.class_names = list(names)

    # -- optimisation ---------------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict[str, Any]]:
        """The model's weights with ``weight_decay``, the rest without, and layer-wise LR decay if set."""
        return param_groups(self.model, weight_decay=self.hparams.weight_decay, layer_decay=self.hparams.layer_decay)
