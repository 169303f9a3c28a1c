"""Training guards: never let a non-finite loss or gradient reach the weights."""
from __future__ import annotations

from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from .errors import SwinlabError


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard


def grads_finite(params) -> torch.Tensor:
    """A 0-d bool tensor: every gradient in ``params`` is finite (one reduction, no host sync)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]).sum())


class NonFiniteGuard(Callback):
    """Skips any optimizer step whose loss or gradients hold NaN/Inf, so the weights are never updated with them.

    Before each optimizer step (after backward, before clipping) it checks the accumulated loss and every gradient.
    If anything is non-finite, every ``p.grad`` is set to ``None``: AdamW then leaves those parameters, their
    momentum and their weight decay untouched. Skipped steps are counted (``skipped_steps``, ``consecutive``) and
    logged as ``train/skipped_steps``; ``max_consecutive`` skipped steps in a row stop the run with a
    SwinlabError (0: never stop). Under data parallelism the decision is shared by all ranks. Under fp16 AMP the
    GradScaler also skips overflowing steps while it calibrates its scale; those are counted here too.
    """

    def __init__(self, enabled: bool = True, max_consecutive: int = 10):
        super().__init__()
        if max_consecutive < 0:
            raise SwinlabError(f"nonfinite.max_consecutive={max_consecutive} must be >= 0 (0: never stop)")
        self.enabled, self.max_consecutive = bool(enabled), int(max_consecutive)
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_ok: Optional[torch.Tensor] = None

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.enabled:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ok = grads_finite(params)
        if self._loss_ok is not None:
            ok = ok & self._loss_ok.to(ok.device)
        self._loss_ok = None
        bad = trainer.strategy.reduce_boolean_decision(not bool(ok), all=False)
        if bad:
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self.consecutive += 1
            rank_zero_warn(f"non-finite loss or gradient at step {trainer.global_step}: optimizer step skipped "
                           f"({self.consecutive} in a row, {self.skipped_steps} in total)")
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if bad and self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise SwinlabError(
                f"training stopped: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(step {trainer.global_step}); the weights and the last checkpoint are unchanged: lower the "
                f"learning rate, check the data for NaN/Inf, or use bf16-mixed instead of 16-mixed; raise "
                f"--nonfinite.max_consecutive to tolerate more")
