"""Shared DataModule plumbing: loader options and a training order that resumes mid-epoch.

Training batches come from :class:`ResumableLoader` (torchdata's ``StatefulDataLoader``) over a
:class:`ResumableSampler` (torchdata's ``StatefulDistributedSampler``):

- the order is a permutation seeded by ``seed + epoch`` (Lightning calls ``set_epoch``), sharded over data-parallel
  ranks like ``DistributedSampler``;
- the loader's ``state_dict()`` / ``load_state_dict()`` hold its position in the epoch; Lightning stores it in every
  checkpoint (``loops.fit_loop.state_dict.combined_loader``, and the DataModule's own copy), so a run resumed from a
  mid-epoch checkpoint continues with the next unseen batch instead of starting the epoch again;
- each index the sampler yields is a :class:`SampleIndex` (an ``int``) that carries ``aug_seed``, a seed derived from
  (seed, epoch, index): datasets seed their random augmentation with it, so a sample's augmentation does not
  depend on the global RNG, on which batch came before it or on the number of workers.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ..errors import ConfigError

ImgSize = Union[int, Sequence[int]]


def img_pair(size: ImgSize) -> Tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"img_size={size!r} is invalid: use a positive int or [height, width]")
    return pair  # type: ignore[return-value]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` (splitmix64 of the three; stable across processes)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class SampleIndex(int):
    """A dataset index that also carries ``aug_seed`` for the sample's random augmentation (plain ``int`` otherwise:
    datasets that do not augment index with it as usual)."""

    aug_seed: int

    def __new__(cls, index: int, aug_seed: int) -> SampleIndex:
        obj = super().__new__(cls, index)
        obj.aug_seed = aug_seed
        return obj

    def __reduce__(self):  # keep aug_seed when indices travel to DataLoader workers
        return SampleIndex, (int(self), self.aug_seed)


def aug_generator(index: Any, seed: int = 0) -> torch.Generator:
    """A generator for the augmentation of ``index``: seeded by its ``aug_seed`` (training) or, for a plain int,
    by (seed, epoch 0, index)."""
    s = getattr(index, "aug_seed", None)
    return torch.Generator().manual_seed(sample_seed(seed, 0, int(index)) if s is None else int(s))


@contextlib.contextmanager
def seeded_rng(index: Any) -> Iterator[None]:
    """Inside: Python's ``random``, NumPy's global RNG and torch's CPU RNG seeded by the index's ``aug_seed`` (no-op
    for a plain int); the global states are restored on exit, so augmentation neither consumes nor depends on them."""
    s = getattr(index, "aug_seed", None)
    if s is None:
        yield
        return
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(int(s))
    np.random.seed(int(s) % 2**32)  # timm's RandAugment and AugMix draw their ops from NumPy's global RNG
    torch.default_generator.manual_seed(int(s))  # the CPU generator only: torch.manual_seed would also reseed
    # every GPU generator (never restored here) and costs ~0.13 ms a sample
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ResumableSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (``DistributedSampler``'s ``seed + epoch`` permutation, one shard
    per data-parallel rank; its state: the indices yielded so far), with two additions:

    - the indices are :class:`SampleIndex` values carrying the sample's ``aug_seed``;
    - its state also holds the epoch, and a saved position applies only to that epoch: a checkpoint written after an
      epoch's last batch resumes at the start of the next epoch (Lightning sets it before the first batch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume: Optional[Tuple[int, int]] = None
        self.started_at = 0  # where in its shard the current iteration started

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "epoch": int(self.epoch)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if int(state_dict.get("yielded", -1)) < 0:
            raise ValueError(f"not a sampler position: {state_dict!r}")
        self._resume = (int(state_dict.get("epoch", self.epoch)), int(state_dict["yielded"]))

    def __iter__(self) -> Iterator[int]:
        # a generator: the epoch and the saved position are read when the first index is drawn
        epoch, resume = self.epoch, self._resume
        self._resume = None
        self.started_at = resume[1] if resume is not None and resume[0] == epoch else 0
        super().load_state_dict({"yielded": self.started_at})
        for i in super().__iter__():
            yield SampleIndex(i, sample_seed(self.seed, epoch, i))


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``: its ``state_dict()`` (the sampler's position for the batches handed out,
    prefetching workers included) is saved by Lightning in every checkpoint and restored on resume. Two additions:

    - iteration begins at the first ``next``, not at ``iter()``: Lightning creates the training iterator before it
      sets the sampler's epoch, and, when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``,
      before it restores the checkpoint (Lightning issue #20550);
    - the state also records the position as data (``resume``: epoch, batches served, batch size, samples per rank,
      seed, workers). A checkpoint from other data (batch size, samples per rank or seed changed) starts its epoch
      over, with a warning; one saved with another worker count resumes at the same sample through the sampler
      (torchdata's own state is per worker layout), and so does one written by swinlab's earlier loader.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        import warnings
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.14 deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self._served = 0
        self._served_epoch: Optional[int] = None

    def _resumable(self) -> Optional[ResumableSampler]:
        s = self.sampler
        return s if isinstance(s, ResumableSampler) and self.batch_size and self.drop_last else None

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        it = super().__iter__()
        sampler = self._resumable()
        for n, batch in enumerate(it):
            if n == 0 and sampler is not None:  # the sampler has now applied any saved position
                self._served, self._served_epoch = sampler.started_at // self.batch_size, sampler.epoch
            self._served += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        sampler = self._resumable()
        if sampler is not None:
            epoch = sampler.epoch if self._served_epoch is None else self._served_epoch
            state["resume"] = {"epoch": int(epoch), "batches_served": int(self._served),
                               "batch_size": int(self.batch_size), "seed": int(sampler.seed),
                               "num_samples": int(sampler.num_samples), "num_workers": int(self.num_workers)}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        mine = state.pop("resume", None)
        sampler = self._resumable()
        if mine is None and "batches_served" in state:  # written by swinlab's earlier loader: the position alone
            mine, state = state, {}
        if sampler is None or not mine:
            super().load_state_dict(state)
            return
        saved = (mine.get("batch_size"), mine.get("num_samples"), mine.get("seed"))
        if saved != (self.batch_size, sampler.num_samples, sampler.seed):
            import warnings
            warnings.warn(f"the training data changed since the checkpoint (batch size, sample count or seed "
                          f"{saved} -> {(self.batch_size, sampler.num_samples, sampler.seed)}): the resumed epoch "
                          f"starts from its first batch", stacklevel=2)
            super().load_state_dict({})
            return
        if state and mine.get("num_workers") == self.num_workers:
            super().load_state_dict(state)
        else:  # another worker layout: continue at the same sample of the same epoch
            super().load_state_dict({})
            sampler.load_state_dict({"epoch": int(mine["epoch"]),
                                     "yielded": int(mine["batches_served"]) * int(self.batch_size)})
        self._served, self._served_epoch = int(mine["batches_served"]), int(mine["epoch"])


class BaseDataModule(pl.LightningDataModule):
    """Batch size, workers, pin_memory, persistent workers and the training order.

    Training order: :class:`ResumableSampler` (a permutation seeded by ``seed + epoch``, one shard per data-parallel
    rank) inside a :class:`ResumableLoader`, so a run resumed from any checkpoint, mid-epoch included, sees the same
    batches as an uninterrupted one. Training drops the last partial batch (Mixup needs even batches). Loaders draw
    their worker seeds from their own generator, never from the global RNG.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, seed: int = 0, eval_batch_size: Optional[int] = None):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={eval_batch_size} must be >= 1 (or null: same as batch_size)")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and num_workers > 0
        self.seed = int(seed)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self._train_loader: Optional[ResumableLoader] = None
        self._pending_loader_state: Optional[Dict[str, Any]] = None

    # Lightning saves a DataModule's state_dict in every checkpoint and restores it before training resumes. The
    # loop's own copy of the loader state (``combined_loader``) is only applied when the loader is built after the
    # restore, and configure_optimizers builds it before (estimated_stepping_batches): this copy covers that case.
    def state_dict(self) -> Dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = state_dict.get("train_loader") or None
        if state and self._train_loader is not None:  # already built (strategies that restore after setup)
            self._train_loader.load_state_dict(state)
        else:
            self._pending_loader_state = state

    def _loader_kwargs(self) -> Dict[str, Any]:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                    persistent_workers=self.persistent_workers)

    def _shard(self) -> Tuple[int, int]:
        """(num_replicas, rank) of this process's data-parallel shard."""
        trainer = getattr(self, "trainer", None)  # LightningDataModule.trainer, set by the Trainer
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs or {}
        return int(kwargs.get("num_replicas", trainer.world_size)), int(kwargs.get("rank", trainer.global_rank))

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        replicas, rank = self._shard()
        if len(self.train_set) < self.batch_size * replicas:
            raise ConfigError(f"the training set has {len(self.train_set)} samples, fewer than one batch "
                              f"({self.batch_size} x {replicas} process(es)): lower data.init_args.batch_size")
        sampler = ResumableSampler(self.train_set, num_replicas=replicas, rank=rank, shuffle=True, seed=self.seed)
        loader = ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                 generator=torch.Generator().manual_seed(self.seed), **self._loader_kwargs())
        if self._pending_loader_state:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False,
                          generator=torch.Generator().manual_seed(self.seed), **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation split (data modules with their own prediction inputs override it)."""
        return self.val_dataloader()

    def predict_inputs(self) -> List[str]:
        """One name per prediction sample, in the predict loader's order (written into ``predictions.csv``)."""
        if self.val_set is None:
            self.setup("predict")
        return [f"val[{i}]" for i in range(len(self.val_set))]

    @property
    def class_names(self) -> Optional[List[str]]:
        """Names of the classes by index, where the data has them (image folders: the folder names)."""
        return None
