"""SimMIM masked image modelling with any swinlab encoder (V1 or V2): how SwinV2-G was pretrained.

Random masking of ``mask_patch_size`` squares (exactly ceil(ratio * count) per image), a learnable mask token
substituted after the patch embedding, the Swin encoder, and a one-layer decoder (1x1 conv to stride^2 * 3 channels
+ PixelShuffle). The loss is L1 on masked pixels only, divided by the masked pixel count and the channel count.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..errors import ConfigError
from .base import SwinTask, build_model, check_range
from .optim import param_groups


class MaskGenerator:
    """Per-image random masks over ``mask_patch_size`` squares, returned at the model's token resolution."""

    def __init__(self, img_size: Tuple[int, int], mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        h, w = img_size
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={mask_ratio} must be between 0 and 1 (SimMIM uses 0.6)")
        if mask_patch_size % model_patch_size:
            raise ConfigError(f"mask_patch_size={mask_patch_size} is not a multiple of the model's patch size "
                              f"{model_patch_size}: use a multiple such as {model_patch_size * 8}")
        if h % mask_patch_size or w % mask_patch_size:
            raise ConfigError(f"image size {h}x{w} is not divisible by mask_patch_size={mask_patch_size}: pick a "
                              f"mask patch size dividing the image size")
        self.grid = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.count = self.grid[0] * self.grid[1]
        self.num_masked = int(math.ceil(self.count * mask_ratio))

    def __call__(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, H/patch, W/patch) bool token mask, True where masked."""
        noise = torch.rand(batch_size, self.count, generator=generator, device=generator.device if generator else None)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        mask = (ranks < self.num_masked).view(batch_size, *self.grid)
        mask = mask.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
        return mask.to(device) if device is not None else mask


class MaskedImageModeling(SwinTask):
    """SimMIM pretraining of a registry Swin model.

    Args:
        model_name: registry name of the encoder (V1 or V2); ``model_kwargs`` as for ImageClassifier.
        mask_patch_size, mask_ratio: SimMIM defaults 32 and 0.6; checked against the image and patch sizes.
        base_lr, warmup_lr, min_lr: per 512 images (scaled by the global batch): SimMIM's cosine-schedule settings
            (2e-4, 1e-6, 1e-5), AdamW (0.9, 0.999), weight decay 0.05, 10 warmup epochs; no layer decay.
        log_images: how many validation images to log (input, masked input, reconstruction) each validation.
        sharding: FSDP2 options under ModelParallelStrategy, as for ImageClassifier.
        empty_init: build the encoder on the meta device and materialise it in ``configure_model``, as for
            ImageClassifier (the mask token and decoder are small and built as usual).
    """

    backbone_attr = "encoder"

    def __init__(
            self,
            model_name: str = "swinv2_pico_patch2_window4_32",
            model_kwargs: Optional[Dict[str, Any]] = None,
            checkpoint: Optional[str] = None,
            mask_patch_size: int = 32,
            mask_ratio: float = 0.6,
            base_lr: float = 2e-4,
            warmup_lr: float = 1e-6,
            min_lr: float = 1e-5,
            warmup_epochs: float = 10.0,
            log_images: int = 8,
            compile: bool = False,
            sharding: Optional[Dict[str, Any]] = None,
            empty_init: bool = False,
            **recipe: Any,
    ):
        super().__init__(**recipe)
        check_range("mask_patch_size", mask_patch_size, 1, hint="a multiple of the model's patch size, e.g. 32")
        check_range("log_images", log_images, 0, hint="0 for none")
        kwargs = dict(model_kwargs or {})
        if "num_classes" in kwargs:
            raise ConfigError("model_kwargs.num_classes is not used in SimMIM pretraining (the encoder has no head): "
                              "remove it")
        self.model_name = model_name
        self.encoder = build_model(model_name, empty_init=empty_init, checkpoint=checkpoint, num_classes=0, **kwargs)
        enc = self.encoder
        self.mask_generator = MaskGenerator(enc.img_size, mask_patch_size, enc.patch_size, mask_ratio)
        self.in_chans = enc.config.in_chans
        self.encoder_stride = enc.patch_size * 2 ** (enc.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, enc.config.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(enc.num_features, self.encoder_stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride))

    # -- model ----------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The encoder (the monitoring/export callbacks look for ``model``); not registered twice."""
        return self.encoder

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images and token mask -> (B, C_last, H/stride, W/stride) features."""
        return self.encoder(x, token_mask=mask, mask_token=self.mask_token).permute(0, 3, 1, 2)

    def on_after_backward(self) -> None:
        """Under FSDP2 only the encoder is sharded (and its gradients reduced); the mask token and the decoder are
        replicated on every rank, so their gradients are averaged here (DDP does it for the whole module)."""
        if self.device_mesh is None or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for p in [self.mask_token, *self.decoder.parameters()]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(world)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, reconstruction)."""
        rec = self.decoder(self.encode(x, mask))
        p = self.encoder.patch_size
        pixel_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(x.dtype)
        loss = self.masked_l1(x, rec, pixel_mask, self.in_chans)
        return loss, rec

    @staticmethod
    def masked_l1(x: torch.Tensor, rec: torch.Tensor, pixel_mask: torch.Tensor, in_chans: int) -> torch.Tensor:
        """L1 over masked pixels only, normalised by the masked pixel count and the channels (SimMIM)."""
        err = F.l1_loss(rec.float(), x.float(), reduction="none")
        return (err * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / in_chans

    # -- steps ----------------------------------------------------------------------------------------------------
    def _images(self, batch) -> torch.Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        mask = self.mask_generator(x.shape[0], device=x.device)
        loss, _ = self(x, mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        g = torch.Generator().manual_seed(batch_idx)  # the same masks every validation
        mask = self.mask_generator(x.shape[0], device=x.device, generator=g)
        loss, rec = self(x, mask)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.hparams.log_images > 0:
            self._log_reconstruction(x, mask, rec)
        return loss

    def _log_reconstruction(self, x: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor) -> None:
        logger = self.logger
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_images") or self.global_rank != 0:
            return
        n = min(self.hparams.log_images, x.shape[0])
        p = self.encoder.patch_size
        pm = mask[:n].repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(x.dtype)
        x, rec = x[:n].float(), rec[:n].float()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)

        def show(t: torch.Tensor) -> torch.Tensor:
            return ((t - lo) / (hi - lo + 1e-6)).clamp(0, 1)[:, :3].cpu()

        step = self.global_step
        experiment.add_images("simmim/input", show(x), step)
        experiment.add_images("simmim/masked_input", show(x * (1 - pm) + lo * pm), step)
        experiment.add_images("simmim/reconstruction", show(rec * pm + x * (1 - pm)), step)

    # -- optimisation ---------------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict[str, Any]]:
        """Encoder, mask token and decoder: the encoder's no-decay keywords and the mask token go without weight
        decay; no layer decay."""
        return param_groups(self, weight_decay=self.hparams.weight_decay,
                            keywords=tuple(self.encoder.no_weight_decay_keywords()) + ("mask_token",))
