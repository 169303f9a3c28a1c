"""Training monitors and the safetensors export of the best checkpoint."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, Checkpoint, ModelCheckpoint, ThroughputMonitor

from ..errors import CheckpointError, SwinlabError


def _tensorboard_logger(trainer: pl.Trainer):
    from lightning.pytorch.loggers import TensorBoardLogger
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _tensorboard(trainer: pl.Trainer):
    logger = _tensorboard_logger(trainer)
    return logger.experiment if logger is not None else None


def _backbone(pl_module: pl.LightningModule):
    return getattr(pl_module, "model", None)


def _is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def full_params(modules: List[torch.nn.Module]):
    """Make the parameters of ``modules`` whole for a read outside forward/backward. Collective: under FSDP2 each
    ``FSDPModule`` among them is unsharded (all-gather) and resharded after; under DeepSpeed ZeRO-3 their parameters
    are gathered (``GatheredParameters``). Every rank must enter it; elsewhere it does nothing."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in modules if isinstance(m, FSDPModule)]
    ds_params = [p for m in modules for p in m.parameters() if hasattr(p, "ds_id")]
    with contextlib.ExitStack() as stack:
        if ds_params:
            import deepspeed
            stack.enter_context(deepspeed.zero.GatheredParameters(ds_params, modifier_rank=None))
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def peak_rss_bytes() -> float:
    """This process's peak resident set size since it started (Linux reports KiB, macOS bytes)."""
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


def images_in_batch(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` over a window of ``window_size`` batches: ``train/device/samples_per_sec``
    (images/s per rank; ``train/samples_per_sec`` over all ranks), ``train/device/flops_per_sec`` from the task's
    ``flops_per_batch`` and, on devices Lightning knows the peak of (CUDA GPUs), ``train/device/mfu``; the same under
    ``validate/``. It logs once the window is full."""

    def __init__(self, window_size: int = 5):
        if window_size < 2:
            raise SwinlabError(f"throughput.window_size={window_size} must be >= 2 (batches per measurement)")
        super().__init__(batch_size_fn=images_in_batch, window_size=int(window_size))


class TrainingMonitor(Callback):
    """Logs ``train/host_peak_rss_bytes`` (this process's peak resident memory since it started, ``getrusage``), on
    CUDA ``train/cuda_peak_allocated_bytes`` (``torch.cuda.max_memory_allocated``), ``train/grad_norm`` (before
    clipping) and each V2 block's mean logit scale (``logit_scale/s<i>b<j>``), every ``log_every_n_steps``. Images/s,
    FLOPs/s and MFU come from :class:`Throughput` (Lightning's ThroughputMonitor). After each validation, ``hp_metric``
    (TensorBoard's HPARAMS tab) is the checkpoint callback's best monitored value so far, so runs compare by their
    best, not by the default -1."""

    def __init__(self, log_logit_scales: bool = True):
        super().__init__()
        self.log_logit_scales = log_logit_scales

    def _due(self, trainer: pl.Trainer) -> bool:
        n = max(1, trainer.log_every_n_steps)
        return trainer.global_step % n == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._due(trainer):
            return
        if pl_module.device.type == "cuda":
            pl_module.log("train/cuda_peak_allocated_bytes", float(torch.cuda.max_memory_allocated(pl_module.device)),
                          on_step=True, on_epoch=False)
        pl_module.log("train/host_peak_rss_bytes", peak_rss_bytes(), on_step=True, on_epoch=False)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:  # DeepSpeed keeps the gradients in its own buffers; it computed the norm to clip
            norm = engine.get_global_grad_norm()
            if norm is not None:
                pl_module.log("train/grad_norm", float(norm), on_step=True, on_epoch=False)
        model = _backbone(pl_module)
        if self.log_logit_scales and model is not None and hasattr(model, "layers"):
            from ..models.swin import LOGIT_SCALE_MAX
            scales = [(f"logit_scale/s{i}b{j}", blk.attn) for i, stage in enumerate(model.layers)
                      for j, blk in enumerate(stage.blocks) if hasattr(blk.attn, "logit_scale")]
            params = [attn.logit_scale for _, attn in scales]
            zero3 = [p for p in params if hasattr(p, "ds_id")]
            ctx = contextlib.nullcontext()
            if zero3:  # partitioned: gather these few tensors on every rank (this hook runs on all of them)
                import deepspeed
                ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
            with ctx:
                for name, attn in scales:
                    value = _whole(attn.logit_scale.detach()).float().clamp(max=LOGIT_SCALE_MAX).exp().mean()
                    pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        logger = _tensorboard_logger(trainer)
        if trainer.sanity_checking or best is None or logger is None or not trainer.is_global_zero:
            return
        logger.log_metrics({"hp_metric": float(best)}, step=trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._due(trainer) or getattr(trainer.strategy, "deepspeed_engine", None) is not None:
            return
        params = [p for p in pl_module.parameters() if p.grad is not None]
        if params:
            from .sharding import grad_total_norm
            pl_module.log("train/grad_norm", grad_total_norm(params), on_step=True, on_epoch=False)


def offset_table(attn: torch.nn.Module, bias: torch.Tensor) -> torch.Tensor:
    """(heads, N, N) position bias of a window -> (heads, 2Wh-1, 2Ww-1): the bias per relative offset (dy, dx), read
    through the attention module's ``relative_position_index`` (every token pair with the same offset shares it)."""
    wh, ww = attn.window
    index = attn.relative_position_index.reshape(-1).to(bias.device)
    table = torch.zeros(bias.shape[0], (2 * wh - 1) * (2 * ww - 1), dtype=bias.dtype, device=bias.device)
    table[:, index] = bias.reshape(bias.shape[0], -1)
    return table.reshape(bias.shape[0], 2 * wh - 1, 2 * ww - 1)


def heatmaps(maps: torch.Tensor, title: str, xlabel: str, ylabel: str, offsets: bool = False, max_heads: int = 16):
    """A matplotlib figure: one heatmap per head (at most ``max_heads``) on one shared colour scale with a colour bar;
    with ``offsets`` the axes are the relative offsets -(W-1)..W-1 (position bias), else token indices (attention)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = maps.detach().float().cpu()[:max_heads]
    heads = maps.shape[0]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.2, 2.5 * rows + 0.6), squeeze=False)
    fig.subplots_adjust(left=0.9 / (2.6 * cols + 1.2), right=1 - 1.0 / (2.6 * cols + 1.2), wspace=0.45, hspace=0.6,
                        top=1 - 0.55 / (2.5 * rows + 0.6), bottom=0.45 / (2.5 * rows + 0.6))  # fixed layout: fast
    lo, hi = float(maps.min()), float(maps.max())
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        height, width = maps.shape[1:]
        extent = None
        if offsets:
            ry, rx = (height - 1) // 2, (width - 1) // 2
            extent = (-rx - 0.5, rx + 0.5, ry + 0.5, -ry - 0.5)
        im = ax.imshow(maps[h].numpy(), cmap="viridis", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, cax=fig.add_axes((1 - 0.8 / (2.6 * cols + 1.2), 0.15, 0.12 / (2.6 * cols + 1.2), 0.7)))
    fig.suptitle(title, fontsize=10)
    return fig


class AttentionImages(Callback):
    """Once per validation epoch: each stage's position bias per head (first block; V1 table or V2 CPB output) over
    the relative offsets (dy, dx) as ``position_bias/stage<i>`` and the attention probabilities of one validation
    image's first window in the last shifted block of stage 0 (query token x key token) as ``attention/stage0``: one
    labelled heatmap per head with a colour bar (up to 16 heads). TensorBoard only. Under FSDP2 and DeepSpeed ZeRO-3
    the blocks' parameters are gathered on every rank (a collective, once per validation) and rank 0 writes."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self._sample: Optional[torch.Tensor] = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self.enabled and batch_idx == 0 and dataloader_idx == 0:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._sample = x[:1].detach()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        sample, self._sample = self._sample, None
        model = _backbone(pl_module)
        if (not self.enabled or trainer.sanity_checking or model is None or not hasattr(model, "layers")
                or _tensorboard_logger(trainer) is None):
            return
        sharded = _is_sharded(model) or _is_zero3(model)
        if not sharded and not trainer.is_global_zero:
            return
        if sharded:  # every rank runs the same collectives: all of them need a sample to forward
            have = trainer.strategy.reduce_boolean_decision(sample is not None, all=True)
            sample = sample if have else None
        images = self.images(model, sample, pl_module.device)
        writer = _tensorboard(trainer)
        if trainer.is_global_zero and writer is not None:
            for tag, maps in images:
                if tag.startswith("position_bias/"):
                    fig = heatmaps(maps, f"{tag}: bias by relative offset, step {trainer.global_step}", "dx", "dy",
                                   offsets=True)
                else:
                    fig = heatmaps(maps, f"{tag}: attention in window 0, step {trainer.global_step}", "key token",
                                   "query token")
                writer.add_figure(tag, fig, trainer.global_step, close=True)

    @staticmethod
    def images(model: torch.nn.Module, sample: Optional[torch.Tensor], device: torch.device) -> List[Any]:
        """[(tag, per-head maps)]: the position bias per stage as (heads, 2Wh-1, 2Ww-1) offset tables and, given a
        sample image, stage-0 attention probabilities of the first window as (heads, N, N)."""
        out: List[Any] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i, stage in enumerate(model.layers):
                    blk = stage.blocks[0]
                    with full_params([blk]):
                        pb = blk.attn.position_bias()
                    if pb is not None:
                        out.append((f"position_bias/stage{i}", offset_table(blk.attn, pb)))
                if sample is None:
                    return out
                blk = model.layers[0].blocks[-1]
                captured: List[Any] = []
                handle = blk.attn.register_forward_hook(lambda m, args, res: captured.append(args))
                try:
                    # the parameters' dtype (DeepSpeed bf16/fp16 casts them; FSDP2 casts its inputs itself)
                    model(sample.to(device=device, dtype=model.patch_embed.proj.weight.dtype))
                finally:
                    handle.remove()
                if captured:
                    x, mask = captured[0][0], captured[0][1] if len(captured[0]) > 1 else None
                    with full_params([blk]):  # the first window of the first image
                        probs = blk.attn.attention_probs(x[:1, :1], None if mask is None else mask[:1])
                    out.append(("attention/stage0", probs[0, 0]))
        finally:
            model.train(was_training)
        return out


class ExportBest(Callback):
    """At the end of fit, write the best checkpoint's backbone (or the final weights when there is no best) as
    ``<log_dir>/best.safetensors``, loadable with ``create_model(name, checkpoint=...)``, with the run's
    preprocessing (mean, std, input size, interpolation, crop_pct) in its metadata.

    A best checkpoint that is a file is read on rank 0. A sharded one (a folder: FSDP2's distributed checkpoint,
    DeepSpeed's ZeRO folder) is read on rank 0 in full fp32: the model's tensors of a distributed checkpoint
    (``torch.distributed.checkpoint``, nothing else), DeepSpeed's through Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict`` (fp32 master weights). Without a best checkpoint the final
    weights are gathered from every rank (a collective) and rank 0 writes them.

    With ``ema`` (default) and a task that keeps an EMA of its weights (``ImageClassifier(ema_decay=...)``), the EMA
    weights are exported (the checkpoint's ``ema.module.*``), as the official recipe evaluates them; the CLI then
    also monitors ``val/acc1_ema`` for the best checkpoint."""

    def __init__(self, filename: str = "best.safetensors", enabled: bool = True, ema: bool = True):
        super().__init__()
        self.filename, self.enabled, self.ema = filename, enabled, ema
        self.path: Optional[Path] = None
        self.exported_ema = False

    def exports_ema(self, pl_module) -> bool:
        return self.ema and getattr(pl_module, "ema", None) is not None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or not hasattr(pl_module, "model_name"):
            return
        ckpt = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        best = ckpt.best_model_path if ckpt is not None else ""
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = out_dir / self.filename
        state: Optional[Dict[str, torch.Tensor]] = None
        ema = self.exports_ema(pl_module)
        prefix = "ema.module." if ema else f"{getattr(pl_module, 'backbone_attr', 'model')}."
        if best and os.path.isdir(best):
            trainer.strategy.barrier("export_best")
            if trainer.is_global_zero:
                from .checkpoint_io import check_checkpoint_folder
                check_checkpoint_folder(best)  # its libraries unpickle it: the same check as --ckpt_path gets
                state = _read_sharded_backbone(best, prefix=prefix)
        elif best and os.path.isfile(best):
            if trainer.is_global_zero and ema:
                from .checkpoint_io import load_checkpoint_file
                state = _backbone_keys(load_checkpoint_file(best).get("state_dict", {}), prefix)
            elif trainer.is_global_zero:
                from ..models import read_checkpoint
                state = read_checkpoint(best)[0]
        else:
            state = _gather_backbone(pl_module.ema.module if ema else pl_module.model)
        self.exported_ema = ema
        if trainer.is_global_zero and state is not None:
            self._export(pl_module, state, best)

    def _export(self, pl_module, state: Dict[str, torch.Tensor], best: str) -> None:
        from ..models import SwinTransformer, save_safetensors
        with torch.device("meta"):
            model = SwinTransformer(pl_module.model.config)
        model.load_state_dict(state, assign=True)  # the gathered tensors themselves: no second copy
        preprocessing = pl_module.weights_preprocessing() if hasattr(pl_module, "weights_preprocessing") else None
        if preprocessing:  # recorded in the file's metadata: create_model(checkpoint=...) gives it back
            from ..models.hub import apply_preprocessing
            model.pretrained_cfg = apply_preprocessing(model.pretrained_cfg, preprocessing)
        try:
            save_safetensors(model, self.path, pl_module.model_name)
        except CheckpointError as exc:  # save_safetensors: one line, previous file intact
            raise CheckpointError(f"{exc}; the checkpoints are intact: export later with `python -m swinlab convert "
                                  f"{best or 'last.ckpt'} --model {pl_module.model_name} --out {self.path}`") from None


def _backbone_keys(state: Dict[str, Any], prefix: str = "model.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _read_sharded_backbone(path: str, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """The backbone's fp32 tensors (the task's ``prefix`` attribute) from a checkpoint folder this run wrote (rank 0,
    no collectives)."""
    root = Path(path)
    if (root / "latest").is_file() or (root / "checkpoint").is_dir():  # DeepSpeed
        import tempfile

        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            converted = convert_zero_checkpoint_to_fp32_state_dict(root, Path(tmp) / "fp32.ckpt")
        return _backbone_keys(converted["state_dict"], prefix)
    import torch.distributed.checkpoint as dcp
    metadata = dcp.FileSystemReader(str(root)).read_metadata()
    sizes = {key[len("state_dict."):]: meta for key, meta in metadata.state_dict_metadata.items()
             if key.startswith(f"state_dict.{prefix}") and hasattr(meta, "size")}
    need = sum(math.prod(meta.size) * meta.properties.dtype.itemsize for meta in sizes.values())
    from ..models.limits import available_bytes
    free = available_bytes()
    if free is not None and need > free:  # sizes read from the folder: checked before anything is allocated
        raise CheckpointError(f"checkpoint folder {root} lists backbone tensors of {need / 2 ** 30:.1f} GiB, more "
                              f"than the {free / 2 ** 30:.1f} GiB this machine has free: the folder is damaged; export "
                              f"later with `python -m swinlab convert`")
    wanted = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in sizes.items()}
    state = {"state_dict": wanted}
    dcp.load(state, checkpoint_id=str(root), no_dist=True)  # only these tensors are read
    return _backbone_keys(state["state_dict"], prefix)


def _gather_backbone(model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The backbone's full state on rank 0 (None elsewhere); collective when the model is sharded."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()} if rank0 else None
    if _is_zero3(model):
        state = {}
        for name, module in model.named_modules():  # one module's parameters at a time
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            with full_params([module]):
                if rank0:
                    for pname, p in own.items():
                        state[f"{name}.{pname}" if name else pname] = p.detach().float().cpu().clone()
        if rank0:
            state.update({k: v.cpu() for k, v in model.state_dict().items() if k not in state and v.numel()})
        return state if rank0 else None
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
            for k, v in model.state_dict().items()} if rank0 else None


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


def _check_rng_states(states: Any) -> None:
    """RNG states read from a checkpoint are data: each is first set on a private generator (torch's, NumPy's and
    Python's own checks, the global ones untouched); anything they refuse is one CheckpointError line."""
    import random

    import numpy as np
    try:
        if not isinstance(states, dict):
            raise TypeError(f"a {type(states).__name__}")
        torch.Generator().set_state(states["torch"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.RandomState().set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
        version, py_state, py_gauss = states["python"]
        if not isinstance(py_state, torch.Tensor) or py_state.numel() != 625:
            raise ValueError("Python's state is not 625 numbers")
        random.Random().setstate((version, tuple(int(v) for v in py_state.tolist()), py_gauss))
    except Exception as exc:
        raise CheckpointError(f"the checkpoint's saved random-number states are damaged ({type(exc).__name__}: "
                              f"{str(exc)[:100]}): resume from another checkpoint, or start from its weights with "
                              f"model.init_args.checkpoint") from None


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
      saved with it (``swinlab.data.common.ResumableLoader``, torchdata's StatefulDataLoader): ``fit --ckpt_path
      last`` continues with the next batch.
    """

    def __init__(self, every_n_train_steps: int = 0, restore_rng: bool = True):
        super().__init__()
        if every_n_train_steps < 0:
            raise SwinlabError(f"resume.every_n_train_steps={every_n_train_steps} must be >= 0 (0: last.ckpt at epoch "
                               f"ends only)")
        self.every_n_train_steps, self.restore_rng = int(every_n_train_steps), bool(restore_rng)
        self._pending: Optional[Dict[str, Any]] = None
        self._rng_override: Optional[Dict[str, Any]] = None
        self._last_saved = -1
        self.path: Optional[str] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self._rng_override if self._rng_override is not None else _rng_states()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pending = state_dict.get("rng")
        if pending is not None:
            _check_rng_states(pending)
        self._pending = pending

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
        self.save_last(trainer)

    def save_last(self, trainer, rng: Optional[Dict[str, Any]] = None) -> str:
        """Write ``last.ckpt`` now (every rank calls it: a collective under sharded strategies) and return its path.
        ``rng``: the RNG states to store instead of the current ones (:class:`~swinlab.training.preemption.Preemption`
        saving in the middle of a validation gives those from before it: the resumed run repeats that validation)."""
        step = trainer.global_step
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            # the ModelCheckpoint's own last.ckpt (its later epoch-end saves overwrite it instead of adding -v1)
            self.path = cb.format_checkpoint_name({"epoch": torch.tensor(trainer.current_epoch),
                                                   "step": torch.tensor(step)}, cb.CHECKPOINT_NAME_LAST)
            cb.last_model_path = self.path
        else:
            self.path = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", "last.ckpt")
        self._rng_override = rng
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            self._rng_override = None
        return self.path


class PredictionWriter(BasePredictionWriter):
    """``python -m swinlab predict`` writes ``<log_dir>/predictions.csv``: one row per input (its file path, or
    ``val[i]`` for the validation split), then the ``top_k`` classes by name with their probabilities. Class names
    come from the task (saved in its checkpoint) or the data module, else the class index. Under several processes
    each rank writes its part and rank 0 joins them in input order. The file is written atomically; an existing
    ``predictions.csv`` of the same run folder is not overwritten (a new name is chosen)."""

    def __init__(self, filename: str = "predictions.csv", top_k: int = 5, enabled: bool = True):
        super().__init__(write_interval="epoch")
        if top_k < 1:
            raise SwinlabError(f"predictions.top_k={top_k} must be >= 1")
        self.filename, self.top_k, self.enabled = filename, int(top_k), enabled
        self.path: Optional[Path] = None

    @staticmethod
    def _names(trainer, pl_module) -> Optional[List[str]]:
        names = getattr(pl_module, "class_names", None)
        if not names and trainer.datamodule is not None:
            names = getattr(trainer.datamodule, "class_names", None)
        return list(names) if names else None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not self.enabled:
            return
        import csv
        rows: List[Any] = []
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        start = 0
        for b, out in enumerate(batches):
            probs = out["probs"].float().cpu()
            idx = list(indices[b]) if indices and b < len(indices) and indices[b] is not None else \
                list(range(start, start + len(probs)))
            start += len(probs)
            k = min(self.top_k, probs.shape[-1])
            p, c = probs.topk(k, dim=-1)
            rows += [(int(i), c[j].tolist(), p[j].tolist()) for j, i in enumerate(idx)]
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        part = out_dir / f".{self.filename}.rank{trainer.global_rank}.pt"
        if trainer.world_size > 1:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rows, part)
            trainer.strategy.barrier("predictions")
        if not trainer.is_global_zero:
            return
        if trainer.world_size > 1:
            rows = []
            for r in range(trainer.world_size):
                piece = out_dir / f".{self.filename}.rank{r}.pt"
                rows += torch.load(piece, weights_only=True)
                piece.unlink()
        seen, ordered = set(), []
        for row in sorted(rows, key=lambda r: r[0]):  # the distributed sampler pads with repeats: keep one
            if row[0] not in seen:
                seen.add(row[0])
                ordered.append(row)
        dm = trainer.datamodule
        inputs = dm.predict_inputs() if dm is not None and hasattr(dm, "predict_inputs") else None
        names = self._names(trainer, pl_module)
        k = len(ordered[0][1]) if ordered else self.top_k
        header = ["input"] + [f"{kind}{i + 1}" for i in range(k) for kind in ("class", "prob")]
        target, tmp = out_dir / self.filename, None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path = _free_name(target)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(header)
                for i, classes, probs in ordered:
                    cells = [inputs[i] if inputs is not None and i < len(inputs) else str(i)]
                    for c, p in zip(classes, probs):
                        cells += [names[c] if names is not None and c < len(names) else str(c), f"{p:.6f}"]
                    writer.writerow(cells)
            os.replace(tmp, self.path)
        except OSError as exc:
            from ..errors import unwritable_reason
            for leftover in (tmp, self.path):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink(missing_ok=True)  # the claimed name and the partial file: nothing half-written
            where = self.path or target
            self.path = None
            raise SwinlabError(f"could not write predictions {where} ({unwritable_reason(where, exc)}): nothing else "
                               f"was changed; free disk space or log the run elsewhere (trainer.logger.init_args."
                               f"save_dir)") from None


def _free_name(path: Path) -> Path:
    """``path`` if it does not exist, else ``<stem>_1<suffix>``, ``<stem>_2<suffix>`` ...: nothing is overwritten. The
    name is claimed by creating it (``open(..., "x")``), so two writers at the same moment never get the same one."""
    n, candidate = 0, path
    while True:
        try:
            with open(candidate, "x"):
                return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
