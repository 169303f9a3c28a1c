"""Test-only classes that runs started through ``python -m swinlab fit`` load by class path (tests/ is put on
PYTHONPATH by the launcher tests): a DeepSpeed strategy that runs on CPU, and a probe that records what each rank did.

Product code never imports this module.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy minus its two CUDA-only checks (accelerator type, device index), over gloo.

    ``runs_on_cpu`` lets swinlab's pre-flight check through (Lightning's own class is refused on CPU). DeepSpeed's
    shared-memory all-reduce op (inference only) is marked unavailable, so ``init_distributed`` does not spend ~40 s
    compiling it on every fresh machine.
    """

    runs_on_cpu = True

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self):
        super(DeepSpeedStrategy, self).setup_environment()

    @property
    def root_device(self):  # DeepSpeed wants a device index; its CPU accelerator ignores it
        return torch.device("cpu", 0)

    def setup_distributed(self):
        from lightning.fabric.utilities.seed import reset_seed
        reset_seed()
        self.set_world_ranks()
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
        self._init_deepspeed_distributed()


class Probe(pl.Callback):
    """Writes ``<out>/probe_<tag>_rank<r>.json``: for each training batch the global step, the loss and a fingerprint
    of the images, plus the world size and the strategy class; ``<out>`` is ``$SWINLAB_PROBE_DIR``."""

    def __init__(self, tag: str = "run"):
        super().__init__()
        self.tag = tag
        self.steps: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        digest = hashlib.sha1(x.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({"step": int(trainer.global_step), "loss": float(loss.detach().float()),
                           "images": digest})

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(os.environ.get("SWINLAB_PROBE_DIR", "."))
        weight = pl_module.model.patch_embed.proj.weight
        mesh = getattr(weight, "device_mesh", None)  # FSDP2: the mesh its parameters are sharded/replicated over
        record = {"world_size": trainer.world_size, "rank": trainer.global_rank,
                  "mesh": list(mesh.shape) if mesh is not None else None,
                  "mesh_dims": list(mesh.mesh_dim_names or ()) if mesh is not None else None,
                  "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                  "global_step": int(trainer.global_step), "steps": self.steps}
        (out / f"probe_{self.tag}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalSelf(pl.Callback):
    """Test-only: this process sends itself ``signum`` at one point of the run, as a scheduler would from outside:
    ``phase`` "train" at the start of the batch after ``step`` optimizer steps, "val" at the start of validation
    batch ``batch`` of the first validation after ``step`` steps, "save" while the checkpoint of step ``step`` is
    being written."""

    def __init__(self, step: int, phase: str = "train", batch: int = 1, signum: str = "SIGTERM"):
        import signal
        self.step, self.phase, self.batch = step, phase, batch
        self.signum = signal.Signals[signum]
        self.sent = False

    def _send(self):
        import signal
        if not self.sent:
            self.sent = True
            signal.raise_signal(self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "train" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if (self.phase == "val" and not trainer.sanity_checking and trainer.global_step >= self.step
                and batch_idx == self.batch):
            self._send()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.phase == "save" and trainer.global_step == self.step:
            self._send()


class WaitForSignal(pl.Callback):
    """Test-only: at the start of the batch after ``step`` optimizer steps, write ``<flag>.<global rank>`` and wait
    (at most ``timeout`` s) until a swinlab Preemption handler has noted a signal sent from outside."""

    def __init__(self, step: int, flag: str, timeout: float = 120.0):
        self.step, self.flag, self.timeout = step, flag, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        from swinlab.training.preemption import stopped_by
        if trainer.global_step != self.step:
            return
        Path(f"{self.flag}.{trainer.global_rank}").write_text(str(os.getpid()))
        end = time.monotonic() + self.timeout
        while stopped_by() is None and time.monotonic() < end:
            time.sleep(0.05)


class FailOnRank(pl.Callback):
    """Test-only: global rank ``rank`` raises at the start of the batch after ``step`` optimizer steps; the other
    ranks go on into the step's collectives, where they would wait for it."""

    def __init__(self, rank: int = 1, step: int = 1):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"FailOnRank: rank {self.rank} fails at step {self.step}")
