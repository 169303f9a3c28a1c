"""Stopping on a signal without losing a step, and SLURM's requeue.

Schedulers stop a job with a signal: SIGTERM (``scancel``, ``scontrol requeue``, preemption, the time limit; SIGKILL
follows after the cluster's KillWait) or the signal a job asked for ahead of its time limit (``sbatch
--signal=USR1@120``). :class:`Preemption` (CLI section ``preemption``) handles them the same way on every rank:

- the handler only notes the signal (no collective, no I/O inside a signal handler);
- at the next optimizer-step boundary (or validation batch) every rank agrees that one of them was signalled
  (``reduce_boolean_decision``), ``last.ckpt`` is written as :class:`~swinlab.training.callbacks.ResumeState` writes
  it (weights, optimizer, loop and loader position, RNG), so ``--ckpt_path`` resumes exactly there;
- inside a SLURM batch job that the scheduler is not already ending (its state is still RUNNING: a ``--signal``
  notice, ``scancel --signal``), rank 0 requeues it (``scontrol requeue``); a job cancelled with ``scancel``, or
  requeued by ``scontrol requeue``, is left to the scheduler. The requeued job logs into the same run folder
  (``job<id>``, see :func:`slurm_run_name`) and resumes from its ``last.ckpt``;
- the run then ends with :class:`Stopped`, exit status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1):
  a run stopped early never reports success. A signal that arrives outside training (setup, the export after the
  last step) gives the same status once the command is done (:func:`stopped_by`).

Lightning's own SIGTERM handler (which starts a collective inside the handler and exits 0) and its SLURM auto-requeue
handler (which saves from inside the handler, mid-step) are replaced while training runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from ..errors import SwinlabError

# the signals received by this process while a Preemption handler was installed (first one first)
_RECEIVED: List[int] = []


class Stopped(SystemExit):
    """The run stopped on a signal: exit status 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


def stopped_by() -> Optional[int]:
    """The first signal a :class:`Preemption` handler received in this process, or None."""
    return _RECEIVED[0] if _RECEIVED else None


def forget_signals() -> None:
    """Start a new command with no signal noted (``python -m swinlab`` runs one command per process; tests more)."""
    _RECEIVED.clear()


def _signum(name: Any) -> int:
    try:
        return int(signal.Signals[str(name).upper()] if not str(name).isdigit() else int(name))
    except (KeyError, ValueError):
        raise SwinlabError(f"preemption.signals: {name!r} is not a signal name: give names such as SIGTERM, "
                           f"SIGUSR1") from None


# -- SLURM ---------------------------------------------------------------------------------------------------------
def in_slurm_job(env=os.environ) -> bool:
    """A SLURM batch or srun task that Lightning treats as SLURM (salloc's job names 'bash'/'interactive' are not)."""
    return bool(env.get("SLURM_JOB_ID")) and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id(env=os.environ) -> Optional[str]:
    """The id ``scontrol`` knows the job by: ``<array job>_<task>`` for an array task, else SLURM_JOB_ID."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def slurm_run_name(env=os.environ) -> Optional[str]:
    """The run folder name of a SLURM job (``job<id>``, ``job<array id>_<task>``): the same on every rank and in every
    restart of the job, so a requeued job logs and resumes in its own folder."""
    if not in_slurm_job(env):
        return None
    job = slurm_job_id(env)
    return f"job{job}" if job else None


def slurm_restarted(env=os.environ) -> bool:
    """Whether this is a requeued start of the job (SLURM_RESTART_COUNT >= 1)."""
    return in_slurm_job(env) and (env.get("SLURM_RESTART_COUNT") or "0").strip() not in ("", "0")


def _job_state(job: str) -> Optional[str]:
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for part in out.stdout.split():
        if part.startswith("JobState="):
            return part.split("=", 1)[1]
    return None


def requeue_slurm_job(env=os.environ) -> str:
    """Requeue this SLURM job if the scheduler is not already ending it; a few words saying what happened."""
    job = slurm_job_id(env)
    if not job:
        return "not a SLURM job: not requeued"
    state = _job_state(job)
    if state != "RUNNING":
        return f"SLURM job {job} is {state or 'in an unknown state'} (cancelled, or requeued by the scheduler): " \
               f"not requeued by swinlab"
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol requeue {job} failed ({exc}): resubmit the job to resume"
    if out.returncode:
        return f"scontrol requeue {job} failed ({out.stderr.strip() or out.returncode}): resubmit the job to resume"
    return f"SLURM job {job} requeued: it resumes from there"


# -- the callback --------------------------------------------------------------------------------------------------
class Preemption(Callback):
    """On any of ``signals``: save ``last.ckpt`` at the next step boundary on every rank, requeue the SLURM job
    (``requeue``, only where the scheduler is not already ending it), stop with exit status 128 + signal.

    Args:
        signals: the signals that stop the run this way (default SIGTERM and SIGUSR1, the signal ``sbatch
            --signal=USR1@<seconds>`` sends before the time limit).
        requeue: requeue the SLURM job after saving (a batch job whose state is still RUNNING).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = True, enabled: bool = True):
        super().__init__()
        self.signums = [_signum(s) for s in signals]
        self.requeue, self.enabled = bool(requeue), bool(enabled)
        self.received: Optional[int] = None
        self._trainer: Any = None
        self._rng_at_val_start: Optional[Dict[str, Any]] = None
        self._checked_step = -1
        self.path: Optional[str] = None

    # signal handling (main thread only; Lightning installs its own handlers the same way)
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            _RECEIVED.append(signum)
            launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
            kill = getattr(launcher, "kill", None)  # ranks Lightning started itself get the signal too
            if kill is not None:
                try:
                    kill(signum)
                except Exception:  # pragma: no cover - a child already gone
                    pass

    def _install(self, trainer) -> None:
        import threading
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in self.signums:
            signal.signal(signum, self._handler)  # Lightning's teardown puts the handlers before fit back

    # Lightning registers its handlers after on_fit_start and before the sanity check and training
    def on_fit_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)
        self._checked_step = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            from .callbacks import _rng_states
            self._rng_at_val_start = _rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._rng_at_val_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:  # accumulating: not a step boundary
            return
        self._checked_step = trainer.global_step
        self._maybe_stop(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_stop(trainer, rng=self._rng_at_val_start)

    def _maybe_stop(self, trainer, rng: Optional[Dict[str, Any]] = None) -> None:
        if not self.enabled:
            return
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        signum = trainer.strategy.reduce(torch.tensor(float(self.received or 0)), reduce_op="max")
        signum = int(signum.item()) if isinstance(signum, torch.Tensor) else int(signum)
        self.path = self._save(trainer, rng)
        what = ""
        if trainer.is_global_zero:
            if self.requeue and in_slurm_job():
                what = "; " + requeue_slurm_job()
            elif not in_slurm_job():
                what = "; resume with the same command and --ckpt_path last (or --ckpt_path <that file>)"
            name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
            print(f"swinlab: stopped by {name} at step {trainer.global_step} (epoch {trainer.current_epoch}): saved "
                  f"{self.path}{what}", file=sys.stderr, flush=True)
        trainer.strategy.barrier("preemption")
        raise Stopped(signum)

    @staticmethod
    def _resume_state(trainer):
        from .callbacks import ResumeState
        return next((cb for cb in trainer.callbacks if isinstance(cb, ResumeState)), None)

    def _save(self, trainer, rng: Optional[Dict[str, Any]]) -> str:
        from .callbacks import ResumeState
        resume = self._resume_state(trainer)
        if resume is None:  # the CLI always has one; a Trainer built by hand may not
            resume = ResumeState()
        return resume.save_last(trainer, rng=rng)
