"""How sure a study is: bootstrap intervals over seeds and validation images, paired differences, verdicts.

A study evaluates every variant on the same validation images with the same seeds, so a variant is compared with the
baseline image by image: ``diff[s, i] = correct_variant[s, i] - correct_baseline[s, i]`` (each -1, 0 or 1). The
interval resamples both sources of noise, hierarchically: the seeds with replacement, then, for each drawn seed, the
images with replacement; the statistic is the mean over the drawn seeds of the mean over the drawn images (points).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: bootstrap replicates and the seed of their generator (fixed: the same rows give the same intervals)
REPLICATES = 4000
BOOT_SEED = 0
LEVEL = 0.95

VERDICTS = ("reproduced", "contradicted", "not resolved at this power")


@dataclass(frozen=True)
class Interval:
    """A mean (points), its bootstrap standard error and the ``LEVEL`` percentile interval."""
    mean: float
    se: float
    low: float
    high: float

    @property
    def z(self) -> float:
        """The mean in standard errors (inf when the bootstrap has no spread and the mean is not 0)."""
        if self.se > 0:
            return self.mean / self.se
        return 0.0 if self.mean == 0 else float("inf") * (1 if self.mean > 0 else -1)

    def format(self, signed: bool = False) -> str:
        f = "+.1f" if signed else ".1f"
        return f"{self.mean:{f}} [{self.low:{f}}, {self.high:{f}}]"


def bootstrap(values: torch.Tensor, replicates: int = REPLICATES, seed: int = BOOT_SEED,
              level: float = LEVEL) -> Interval:
    """``values``: (seeds, images) per-image scores (1/0 correct, -1/0/1 paired differences, or any few distinct
    values). Returns the mean x 100 with its hierarchical bootstrap SE and percentile interval (seeds, then images
    within each drawn seed).

    Drawing n images with replacement from a seed whose scores take K distinct values is drawing how many of each
    value: a multinomial over K categories with that seed's frequencies, sampled here as K-1 chained binomials.
    That is the same distribution as indexing n random images, at a cost that does not grow with n."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() == 1:
        v = v.unsqueeze(0)
    s, n = v.shape
    if s == 0 or n == 0:
        raise ValueError("bootstrap needs at least one seed and one image")
    gen = torch.Generator().manual_seed(int(seed))
    levels = torch.unique(v)  # the K distinct scores
    freq = (v.unsqueeze(-1) == levels).double().mean(dim=1)  # (s, K): each seed's frequency of each score
    drawn = freq[torch.randint(0, s, (replicates, s), generator=gen)]  # (R, s, K): the seeds each replicate drew
    left = torch.full(drawn.shape[:2], float(n), dtype=torch.float64)  # images not yet given a score
    mass = torch.ones_like(left)  # probability not yet used up
    total = torch.zeros_like(left)
    for k in range(len(levels) - 1):
        p = torch.where(mass > 0, drawn[..., k] / mass.clamp_min(1e-300), torch.zeros_like(mass)).clamp(0, 1)
        count = torch.binomial(left, p, generator=gen)
        total += count * levels[k]
        left -= count
        mass -= drawn[..., k]
    total += left * levels[-1]
    stats = (total / n).mean(dim=1) * 100.0
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return Interval(mean=float(v.mean()) * 100.0, se=float(stats.std()), low=low, high=high)


def verdict(diff: Interval, expect: str) -> str:
    """A paper claim about ``variant - baseline`` (``expect``: "better" or "worse") against the measured interval:
    reproduced when the whole interval lies on the claimed side of 0, contradicted when it lies wholly on the other,
    otherwise not resolved at this power."""
    if expect not in ("better", "worse"):
        raise ValueError(f"expect={expect!r}: use better or worse")
    sign = 1 if expect == "better" else -1
    low, high = sorted((sign * diff.low, sign * diff.high))
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def correct_matrix(bitstrings: Sequence[str]) -> torch.Tensor:
    """Per-seed strings of '0'/'1' (one character per validation image, as results_images.csv stores them) as a
    (seeds, images) tensor."""
    lengths = {len(b) for b in bitstrings}
    if len(lengths) != 1:
        raise ValueError(f"the seeds were evaluated on different numbers of images: {sorted(lengths)}")
    return torch.tensor([[c == "1" for c in b] for b in bitstrings], dtype=torch.float64)
