"""The signal-propagation instrument (SwinV2 sec. 3.2, Figure 2): how large the residual stream is after each block.

In a pre-norm block (V1) every residual branch adds its un-normalised output to the stream, so the stream grows with
depth; res-post-norm (V2) normalises each branch before adding it. :class:`SignalProbe` reads the output of every
Swin block on the forwards it is armed for (forward hooks registered from outside the model: the model code is
untouched) and :class:`SignalMonitor`, a default callback of every ``python -m swinlab`` run, logs what it reads:

- every ``log_every_n_steps`` training step, per block, ``signal/rms/s<i>b<j>`` (root mean square of the block's
  output over the whole batch: every image, token and channel) and ``signal/max_abs/s<i>b<j>`` (its largest
  magnitude), plus ``signal/rms_spread``, the largest block RMS over the smallest (the paper's "discrepancy of
  activation amplitudes", about 10^4 for its largest pre-norm models). Under several ranks the sums of squares and
  element counts are summed over the ranks and the maxima taken over them (two all-reduces per logging step), so
  the values are those of the global batch under DDP, FSDP2 and DeepSpeed ZeRO;
- after each validation, the image ``signal/amplitude``: RMS and max-abs against the block index on a log scale,
  stages marked, read from the validation loop's forward of its first batch (this run's Figure 2), and per stage the
  range of the attention logits of the stage's first (unshifted) block over the first image's windows of that
  batch, ``signal/attn_logit_range/stage<i>``
  (max minus min of q k^T times the scale plus the position bias: the dot product grows with the stream, the
  scaled cosine is bounded by twice the logit scale plus the bias). The logits are computed once per validation
  from the block's inputs through ``WindowAttention.attention_logits``, because the fused attention kernel never
  materialises them in training.

Cost: nothing on the steps between logging steps beyond the hook calls; on a logging step one reduction per block
output (docs/benchmarks.md has the measured cost and its command).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .callbacks import _tensorboard, full_params


def backbone_of(pl_module: pl.LightningModule) -> Optional[torch.nn.Module]:
    """The task's Swin model (``backbone_attr``: ``model``, SimMIM's ``encoder``), or None without one."""
    model = getattr(pl_module, getattr(pl_module, "backbone_attr", "model"), None)
    return model if model is not None and hasattr(model, "layers") else None


def block_names(model: torch.nn.Module) -> List[str]:
    """``s<stage>b<block>`` for every Swin block, in forward order (the names the logit-scale tags use too)."""
    return [f"s{i}b{j}" for i, stage in enumerate(model.layers) for j in range(len(stage.blocks))]


def stage_depths(model: torch.nn.Module) -> List[int]:
    return [len(stage.blocks) for stage in model.layers]


class SignalProbe:
    """Forward hooks on every block of a Swin model that, while :attr:`armed`, keep the block output's sum of squares,
    element count and largest magnitude (first forward per block after :meth:`collect`: an activation-checkpointing
    recompute in backward is not counted twice), and with :attr:`capture_attention` the input of each stage's first
    attention module (first image only) for :meth:`attention_logit_ranges`.

    The hooks are excluded from ``torch.compile`` (``torch.compiler.disable``): they run eagerly after a compiled
    block, and a disarmed hook returns at once. Use as a context manager or :meth:`attach` / :meth:`detach`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = block_names(model)
        self.depths = stage_depths(model)
        self.armed = False
        self.capture_attention = False
        self._stats: Dict[int, Tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._attn_inputs: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._handles: List[Any] = []

    # -- hooks ------------------------------------------------------------------------------------------------------
    def attach(self) -> SignalProbe:
        if self._handles:
            return self
        index = 0
        for i, stage in enumerate(self.model.layers):
            for blk in stage.blocks:
                self._handles.append(blk.register_forward_hook(self._block_hook(index)))
                index += 1
            self._handles.append(stage.blocks[0].attn.register_forward_pre_hook(self._attn_hook(i)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = self.capture_attention = False

    def __enter__(self) -> SignalProbe:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _block_hook(self, index: int):
        @torch.compiler.disable
        def hook(module, args, output):
            if not self.armed or index in self._stats or not isinstance(output, torch.Tensor):
                return
            with torch.no_grad():
                out = output.detach()
                sumsq = torch.linalg.vector_norm(out, dtype=torch.float32).double().square()
                self._stats[index] = (sumsq, out.numel(), out.abs().amax().float())
        return hook

    def _attn_hook(self, stage: int):
        @torch.compiler.disable
        def hook(module, args):
            if self.capture_attention and stage not in self._attn_inputs and args:
                mask = args[1] if len(args) > 1 else None
                self._attn_inputs[stage] = (args[0][:1].detach(), None if mask is None else mask.detach())
        return hook

    # -- results ----------------------------------------------------------------------------------------------------
    def collect(self, device: Optional[torch.device] = None, reduce: bool = True) -> Optional[Dict[str, torch.Tensor]]:
        """Per-block ``rms`` and ``max_abs`` (fp64 tensors, one value per block, forward order) of the armed forwards
        since the last call, then forget them. With ``reduce`` and an initialised process group of several ranks:
        sums of squares and counts summed over the ranks, maxima taken over them (collective: every rank calls it).
        None when nothing was read (and there is no process group to take part in)."""
        stats, self._stats = self._stats, {}
        dist = torch.distributed
        distributed = reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not stats and not distributed:
            return None
        if device is None:
            device = next(iter(stats.values()))[0].device if stats else torch.device("cpu")
        n = len(self.names)
        sums = torch.zeros(2, n, dtype=torch.float64, device=device)
        maxima = torch.zeros(n, dtype=torch.float64, device=device)
        for i, (sumsq, count, maxabs) in stats.items():
            sums[0, i] = sumsq.to(device)
            sums[1, i] = count
            maxima[i] = maxabs.to(device=device, dtype=torch.float64)
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        counts = sums[1]
        if not bool((counts > 0).any()):
            return None
        rms = torch.where(counts > 0, (sums[0] / counts.clamp_min(1)).sqrt(), torch.full_like(counts, math.nan))
        return {"rms": rms.cpu(), "max_abs": torch.where(counts > 0, maxima, torch.full_like(counts, math.nan)).cpu()}

    def attention_logit_ranges(self) -> List[float]:
        """Per stage, max minus min of the attention logits of its first block on the captured input (NaN where
        nothing was captured), then forget the inputs. Collective under FSDP2 / ZeRO-3 (the block's parameters are
        gathered): every rank calls it."""
        inputs, self._attn_inputs = self._attn_inputs, {}
        out = []
        for i, stage in enumerate(self.model.layers):
            blk = stage.blocks[0]
            with torch.no_grad(), full_params([blk]):
                if i not in inputs:
                    out.append(math.nan)
                    continue
                x, mask = inputs[i]
                logits = blk.attn.attention_logits(x.to(blk.attn.proj.weight.dtype), mask)
                out.append(float((logits.amax() - logits.amin()).float()))
        return out

    def measure(self, x: torch.Tensor, attention: bool = True) -> Dict[str, Any]:
        """One forward of ``x`` in eval mode without gradients, hooks attached for it: per-block ``rms`` and
        ``max_abs`` (lists) and, with ``attention``, ``attn_logit_range`` per stage. The model's mode is given back.
        Local (no reduction over ranks)."""
        attached = bool(self._handles)
        self.attach()
        was_training = self.model.training
        self.model.eval()
        self._stats, self._attn_inputs = {}, {}
        self.armed, self.capture_attention = True, attention
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            self.armed = self.capture_attention = False
            self.model.train(was_training)
            if not attached:
                for handle in self._handles:
                    handle.remove()
                self._handles = []
        values = self.collect(reduce=False) or {"rms": torch.full((len(self.names),), math.nan),
                                                "max_abs": torch.full((len(self.names),), math.nan)}
        result: Dict[str, Any] = {k: v.tolist() for k, v in values.items()}
        if attention:
            result["attn_logit_range"] = self.attention_logit_ranges()
        return result


def spread(rms: Sequence[float]) -> float:
    """Largest over smallest finite per-block amplitude (inf when one is not finite: the stream overflowed)."""
    vals = [float(v) for v in rms]
    if not vals or any(not math.isfinite(v) for v in vals):
        return math.inf
    low = min(vals)
    return max(vals) / low if low > 0 else math.inf


def mark_stages(ax, depths: Sequence[int]) -> None:
    """Shade every other stage of an amplitude-vs-block plot and label the stages s1, s2, ... at the top."""
    start = 0
    for i, depth in enumerate(depths):
        if i % 2:
            ax.axvspan(start - 0.5, start + depth - 0.5, color="0.92", zorder=0)
        ax.text(start + (depth - 1) / 2, 1.0, f"s{i + 1}", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8)
        start += depth


def amplitude_figure(curves: Dict[str, Dict[str, Sequence[float]]], depths: Sequence[int], title: str):
    """A matplotlib figure in the style of SwinV2's Figure 2: per-block amplitude (log scale) against the block index,
    stages shaded. ``curves``: label -> {"rms": [...], optionally "max_abs": [...] (dashed, same colour)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    fig.subplots_adjust(left=0.11, right=0.97, top=0.82, bottom=0.14)  # fixed layout: fast
    mark_stages(ax, depths)
    for k, (label, curve) in enumerate(curves.items()):
        colour = f"C{k}"
        blocks = list(range(len(curve["rms"])))
        prefix = f"{label}: " if label else ""
        ax.plot(blocks, curve["rms"], marker="o", markersize=3, color=colour, label=f"{prefix}RMS")
        if curve.get("max_abs") is not None:
            ax.plot(blocks, curve["max_abs"], linestyle="--", color=colour, alpha=0.7, label=f"{prefix}max |x|")
    ax.set_yscale("log")
    ax.set_xlabel("block index")
    ax.set_ylabel("amplitude of the residual stream")
    ax.set_xlim(-0.5, sum(depths) - 0.5)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return fig


class SignalMonitor(Callback):
    """Per-block amplitude of the residual stream (SwinV2's signal propagation plot) for every run: the scalars
    ``signal/rms/s<i>b<j>``, ``signal/max_abs/s<i>b<j>`` and ``signal/rms_spread`` every ``log_every_n_steps``
    training steps, and after each validation the image ``signal/amplitude`` and the scalars
    ``signal/attn_logit_range/stage<i>``, read from the validation loop's own forward of its first batch (no extra
    forward); amplitudes are reduced over ranks. ``enabled: false`` turns it off (no hooks are registered);
    ``image: false`` keeps the scalars only. See
    :mod:`swinlab.training.signal_monitor`."""

    def __init__(self, enabled: bool = True, image: bool = True):
        super().__init__()
        self.enabled, self.image = bool(enabled), bool(image)
        self.probe: Optional[SignalProbe] = None

    def _attach(self, pl_module) -> None:
        """Hooks on the backbone as the strategy left it (ZeRO-3's empty init builds it anew in configure_model),
        before its first forward (a compiled block traces its hooks then: hooks added later would not run)."""
        model = backbone_of(pl_module)
        if not self.enabled or model is None or (self.probe is not None and self.probe.model is model):
            return
        if self.probe is not None:
            self.probe.detach()
        self.probe = SignalProbe(model).attach()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._attach(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:  # `validate` runs no fit hooks
        self._attach(pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.probe is not None:
            self.probe.detach()
            self.probe = None

    @staticmethod
    def _logging_step(trainer) -> bool:
        """Whether Lightning writes this batch's on-step logs: the batch that makes global_step a multiple of
        log_every_n_steps."""
        n = trainer.log_every_n_steps
        return n > 0 and (trainer.global_step + 1) % n == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.probe is not None:
            self.probe.armed = self._logging_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        probe = self.probe
        if probe is None or not probe.armed:
            return
        probe.armed = False
        values = probe.collect(trainer.strategy.root_device)  # every rank: the same steps are armed everywhere
        if values is None:
            return
        metrics = {}
        for name, rms, peak in zip(probe.names, values["rms"].tolist(), values["max_abs"].tolist()):
            metrics[f"signal/rms/{name}"] = rms
            metrics[f"signal/max_abs/{name}"] = peak
        metrics["signal/rms_spread"] = spread(values["rms"].tolist())
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        probe = self.probe
        if probe is not None and batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            probe.collect(reduce=False)  # forget anything a training forward left
            probe.armed = probe.capture_attention = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self.probe is not None:
            self.probe.armed = self.probe.capture_attention = False

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        probe = self.probe
        if probe is None or trainer.sanity_checking:
            return
        # every rank: the amplitudes are reduced over the ranks, and under FSDP2 / ZeRO-3 the logits need the first
        # blocks' parameters gathered
        values = probe.collect(trainer.strategy.root_device)
        ranges = probe.attention_logit_ranges()
        if values is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        scalars = {f"signal/attn_logit_range/stage{i}": v for i, v in enumerate(ranges) if math.isfinite(v)}
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        writer = _tensorboard(trainer)
        if self.image and writer is not None:
            rms, peak = values["rms"].tolist(), values["max_abs"].tolist()
            title = (f"signal propagation at step {step} (first validation batch): RMS spread {spread(rms):.3g}x "
                     f"over {len(rms)} blocks")
            fig = amplitude_figure({"": {"rms": rms, "max_abs": peak}}, probe.depths, title)
            writer.add_figure("signal/amplitude", fig, step, close=True)
