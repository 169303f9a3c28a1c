"""Training guards: never let a non-finite loss or gradient reach the weights."""
from __future__ import annotations

from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ..errors import SwinlabError


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard


def grads_finite(params) -> torch.Tensor:
    """A 0-d bool tensor: every gradient in ``params`` is finite (one reduction, no host sync)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]).sum())


def _is_deepspeed(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy
    return isinstance(trainer.strategy, DeepSpeedStrategy)


class NonFiniteGuard(Callback):
    """Skips any optimizer step whose loss or gradients hold NaN/Inf, so the weights are never updated with them.

    Before each optimizer step (after backward, before clipping) it checks the accumulated loss and every gradient
    (this rank's shard under FSDP2) and takes the worst verdict over all ranks. How a bad step is skipped:

    - **fused AdamW** (swinlab's tasks use it wherever torch has the kernel and no GradScaler runs): on the device,
      through the optimizer's ``found_inf`` input, the same mechanism ``GradScaler`` uses; parameters, moments and
      the step count stay as they were. Nothing waits for the GPU: the counters live on the device and are read
      only every ``trainer.log_every_n_steps`` steps (when Lightning logs anyway) and at the end of training.
    - **any other optimizer** (and ``16-mixed``, whose GradScaler syncs every step itself): the verdict is read on
      the host and every ``p.grad`` is set to ``None``, so AdamW leaves those parameters untouched.
    - **DeepSpeed**: gradients live in DeepSpeed's partitioned buffers, so only the loss is checked and a step cannot
      be skipped (bf16 applies it; fp16 uses DeepSpeed's own loss scaler, which skips overflowing steps). The guard
      still counts non-finite losses and stops the run after ``max_consecutive`` of them.

    Skipped steps are counted (``skipped_steps``, ``consecutive``) and logged as ``train/skipped_steps``;
    ``max_consecutive`` skipped steps in a row stop the run with a SwinlabError (0: never stop), checked when the
    counters are read.
    """

    def __init__(self, enabled: bool = True, max_consecutive: int = 10):
        super().__init__()
        if max_consecutive < 0:
            raise SwinlabError(f"nonfinite.max_consecutive={max_consecutive} must be >= 0 (0: never stop)")
        self.enabled, self.max_consecutive = bool(enabled), int(max_consecutive)
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_ok: Optional[torch.Tensor] = None
        # device-side counters since the last read: steps skipped, and the current run of skipped steps
        self._pending_skipped: Optional[torch.Tensor] = None
        self._pending_run: Optional[torch.Tensor] = None
        self._steps_since_read = 0  # host-side: optimizer steps counted since the last read

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> Dict[str, Any]:
        self._read()
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def _bad_on_all_ranks(self, trainer: pl.Trainer, ok: torch.Tensor, device: torch.device) -> torch.Tensor:
        """1.0 where this step is bad on any rank (a device-side all-reduce: no host sync), else 0.0."""
        bad = (~ok).to(device=device, dtype=torch.float32)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.enabled:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        loss_ok, self._loss_ok = self._loss_ok, None
        if _is_deepspeed(trainer):
            ok = loss_ok if loss_ok is not None else torch.tensor(True)
            self._count(trainer, self._bad_on_all_ranks(trainer, ok, pl_module.device), pl_module)
            return
        params = [p for group in inner.param_groups for p in group["params"]]
        ok = grads_finite(params)
        if loss_ok is not None:
            ok = ok & loss_ok.to(ok.device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if inner.defaults.get("fused") and scaler is None:
            bad = self._bad_on_all_ranks(trainer, ok, pl_module.device)
            device = next((p.device for p in params if p.grad is not None), bad.device)
            inner.found_inf = bad.to(device).reshape(())  # fused AdamW leaves everything as it was when 1
            self._count(trainer, bad, pl_module)
            return
        # host decision: drop every gradient of a bad step
        bad_host = trainer.strategy.reduce_boolean_decision(not bool(ok), all=False)
        if bad_host:
            for p in params:
                p.grad = None
        self._count(trainer, torch.tensor(float(bad_host)), pl_module)

    def _count(self, trainer: pl.Trainer, bad: torch.Tensor, pl_module: pl.LightningModule) -> None:
        bad = bad.detach().float().reshape(())
        if self._pending_skipped is None or self._pending_skipped.device != bad.device:
            self._read()
            self._pending_skipped = torch.zeros((), device=bad.device)
            self._pending_run = torch.zeros((), device=bad.device)
        self._pending_skipped += bad
        # the trailing run of bad steps since the last read: (run + 1) * bad restarts it at 0 on a good step
        self._pending_run.add_(1).mul_(bad)
        self._steps_since_read += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._read(trainer)
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _read(self, trainer: Optional[pl.Trainer] = None) -> None:
        """Bring the device counters to the host (the only sync), warn about newly skipped steps, and stop the run
        after ``max_consecutive`` in a row."""
        if self._pending_skipped is None:
            return
        new, run = int(self._pending_skipped.item()), int(self._pending_run.item())
        # the run continues the one before the last read only if every step since then was bad
        self.consecutive = self.consecutive + run if run == self._steps_since_read else run
        self._pending_skipped.zero_()
        self._pending_run.zero_()
        self._steps_since_read = 0
        if new:
            self.skipped_steps += new
            step = trainer.global_step if trainer is not None else "?"
            rank_zero_warn(f"non-finite loss or gradient: {new} optimizer step(s) skipped up to step {step} "
                           f"({self.consecutive} in a row, {self.skipped_steps} in total)")
        if new and self.max_consecutive and self.consecutive >= self.max_consecutive:
            step = trainer.global_step if trainer is not None else "?"
            raise SwinlabError(
                f"training stopped: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(step {step}); the weights and the last checkpoint are unchanged: lower the "
                f"learning rate, check the data for NaN/Inf, or use bf16-mixed instead of 16-mixed; raise "
                f"--nonfinite.max_consecutive to tolerate more")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # an optimizer used after this fit must not keep the last verdict
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        self._read(trainer)
