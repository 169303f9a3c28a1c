"""Training monitors and the safetensors export of the best checkpoint."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .errors import CheckpointError, SwinlabError


def _tensorboard(trainer: pl.Trainer):
    from lightning.pytorch.loggers import TensorBoardLogger
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _backbone(pl_module: pl.LightningModule):
    return getattr(pl_module, "model", None)


def _is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


class TrainingMonitor(Callback):
    """Logs ``train/images_per_sec``, ``train/peak_mem_bytes`` (CUDA max allocated, else process RSS),
    ``train/grad_norm`` (before clipping) and each V2 block's mean logit scale (``logit_scale/s<i>b<j>``), every
    ``log_every_n_steps``."""

    def __init__(self, log_logit_scales: bool = True):
        super().__init__()
        self.log_logit_scales = log_logit_scales
        self._t0: Optional[float] = None
        self._images = 0

    def _due(self, trainer: pl.Trainer) -> bool:
        n = max(1, trainer.log_every_n_steps)
        return trainer.global_step % n == 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._images = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._t0 is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self._t0, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(x.shape[0]) * trainer.world_size
        if not self._due(trainer) or self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        if dt > 0 and self._images:
            pl_module.log("train/images_per_sec", self._images / dt, on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(pl_module.device))
        else:
            import psutil
            peak = float(psutil.Process(os.getpid()).memory_info().rss)
        pl_module.log("train/peak_mem_bytes", peak, on_step=True, on_epoch=False)
        self._t0, self._images = time.perf_counter(), 0
        model = _backbone(pl_module)
        if self.log_logit_scales and model is not None and hasattr(model, "layers"):
            from .models.swin import LOGIT_SCALE_MAX
            for i, stage in enumerate(model.layers):
                for j, blk in enumerate(stage.blocks):
                    ls = getattr(blk.attn, "logit_scale", None)
                    if ls is None:
                        continue
                    value = ls.detach().float()
                    if hasattr(value, "full_tensor"):
                        value = value.full_tensor()
                    value = value.clamp(max=LOGIT_SCALE_MAX).exp().mean()
                    pl_module.log(f"logit_scale/s{i}b{j}", value, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._due(trainer):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)


def _normalise(t: torch.Tensor) -> torch.Tensor:
    lo = t.amin(dim=(-2, -1), keepdim=True)
    hi = t.amax(dim=(-2, -1), keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def head_grid(maps: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """(heads, N, N) -> one (1, H, W) image: the heads side by side, each scaled to [0, 1]."""
    from torchvision.utils import make_grid
    imgs = _normalise(maps.detach().float().cpu())[:, None]
    return make_grid(imgs, nrow=imgs.shape[0], padding=pad, pad_value=1.0)[:1]


def attention_probs(attn: torch.nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention (heads, N, N) of the first window of the first image, recomputed from a WindowAttention
    module's input ``x`` (B, nW, N, C) and shift ``mask``."""
    import torch.nn.functional as F

    from .models.swin import LOGIT_SCALE_MAX
    x = x[:1, :1].float()
    _, _, N, C = x.shape
    nH, hd = attn.num_heads, attn.head_dim
    bias = attn.qkv_bias()
    qkv = F.linear(x, attn.qkv.weight.float(), None if bias is None else bias.float())
    q, k, _ = qkv.view(N, 3, nH, hd).permute(1, 2, 0, 3).unbind(0)  # heads, N, hd
    if attn.attention == "cosine":
        scale = torch.clamp(attn.logit_scale.float(), max=LOGIT_SCALE_MAX).exp()
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    else:
        logits = (q * hd ** -0.5) @ k.transpose(-2, -1)
    pb = attn.position_bias()
    if pb is not None:
        logits = logits + pb.float()
    if mask is not None:
        logits = logits + mask[0].float()
    return logits.softmax(-1)


class AttentionImages(Callback):
    """Once per validation epoch: each stage's position bias per head (first block; V1 table or V2 CPB output) as
    ``position_bias/stage<i>`` and the attention of one validation image's first window in the last shifted block
    of stage 0 as ``attention/stage0``. Skipped for sharded (FSDP) models and loggers other than TensorBoard."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self._sample: Optional[torch.Tensor] = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self.enabled and batch_idx == 0 and dataloader_idx == 0:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._sample = x[:1].detach()

    @rank_zero_only
    def _write(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        model = _backbone(pl_module)
        if writer is None or model is None or not hasattr(model, "layers") or _is_sharded(model):
            return
        step = trainer.global_step
        with torch.no_grad():
            for i, stage in enumerate(model.layers):
                pb = stage.blocks[0].attn.position_bias()
                if pb is not None:
                    writer.add_image(f"position_bias/stage{i}", head_grid(pb), step)
            if self._sample is None:
                return
            blk = model.layers[0].blocks[-1]
            captured: List[Any] = []
            handle = blk.attn.register_forward_hook(lambda m, args, out: captured.append(args))
            try:
                was_training = model.training
                model.eval()
                model(self._sample.to(pl_module.device))
                model.train(was_training)
            finally:
                handle.remove()
            if captured:
                args = captured[0]
                x, mask = args[0], args[1] if len(args) > 1 else None
                writer.add_image("attention/stage0", head_grid(attention_probs(blk.attn, x, mask)), step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if trainer.world_size > 1 and _is_sharded(_backbone(pl_module) or torch.nn.Module()):
            return
        self._write(trainer, pl_module)
        self._sample = None


class ExportBest(Callback):
    """At the end of fit, write the best checkpoint's backbone (or the last weights when there is no best) as
    ``<log_dir>/best.safetensors``, loadable with ``create_model(name, checkpoint=...)``."""

    def __init__(self, filename: str = "best.safetensors", enabled: bool = True):
        super().__init__()
        self.filename, self.enabled = filename, enabled
        self.path: Optional[Path] = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or not hasattr(pl_module, "model_name"):
            return
        ckpt = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        best = ckpt.best_model_path if ckpt is not None else ""
        if best and os.path.isdir(best):  # sharded checkpoint directory: export with `swinlab convert` instead
            rank_zero_warn(f"best checkpoint {best} is sharded: not exported to safetensors")
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = out_dir / self.filename
        self._export(pl_module, best)

    @rank_zero_only
    def _export(self, pl_module, best: str) -> None:
        from .models import create_model, save_safetensors
        if best and os.path.isfile(best):
            model = create_model(pl_module.model_name, checkpoint=best)
        else:
            model = pl_module.model
        try:
            save_safetensors(model, self.path, pl_module.model_name)
        except CheckpointError as exc:  # save_safetensors: one line, previous file intact
            raise CheckpointError(f"{exc}; the checkpoints are intact: export later with `python -m swinlab convert "
                                  f"{best or 'last.ckpt'} --model {pl_module.model_name} --out {self.path}`") from None


def _rng_states() -> Dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` reads back (tensors, ints, tuples)."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)),
        "python": (int(version), torch.tensor(py_state, dtype=torch.int64), py_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Dict[str, Any]) -> None:
    import random

    import numpy as np
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, py_state, py_gauss = states["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), py_gauss))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeState(Checkpoint):
    """What an exact resume needs beyond weights, optimizer and loop state.

    - Saves the global RNG states (torch, CUDA, NumPy, Python: Mixup, CutMix, stochastic depth and dropout draw from
      them) in every checkpoint and restores them when training resumes.
    - ``every_n_train_steps`` > 0: also writes ``last.ckpt`` (in the ModelCheckpoint's folder) every that many
      optimizer steps, so a run killed mid-epoch loses at most that many steps. The training loader's position is
      saved with it (``swinlab.data.ResumableLoader``): ``fit --ckpt_path last`` continues with the next batch.
    """

    def __init__(self, every_n_train_steps: int = 0, restore_rng: bool = True):
        super().__init__()
        if every_n_train_steps < 0:
            raise SwinlabError(f"resume.every_n_train_steps={every_n_train_steps} must be >= 0 (0: last.ckpt at epoch "
                               f"ends only)")
        self.every_n_train_steps, self.restore_rng = int(every_n_train_steps), bool(restore_rng)
        self._pending: Optional[Dict[str, Any]] = None
        self._last_saved = -1
        self.path: Optional[str] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        # applied as late as possible: nothing between here and the first batch draws from the global RNG (the
        # training loader's position is restored by the swinlab DataModule's own state_dict)
        pending, self._pending = self._pending, None
        self._last_saved = trainer.global_step
        if pending is not None and self.restore_rng:
            _set_rng_states(pending)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if n <= 0 or step == 0 or step % n or step == self._last_saved or trainer.sanity_checking:
            return
        self._last_saved = step
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            # the ModelCheckpoint's own last.ckpt (its later epoch-end saves overwrite it instead of adding -v1)
            self.path = cb.format_checkpoint_name({"epoch": torch.tensor(trainer.current_epoch),
                                                   "step": torch.tensor(step)}, cb.CHECKPOINT_NAME_LAST)
            cb.last_model_path = self.path
        else:
            self.path = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", "last.ckpt")
        trainer.save_checkpoint(self.path, weights_only=False)
