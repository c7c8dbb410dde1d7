"""Deterministic global sample order with an explicit position, for exact resume.

Ray Data iterators cannot resume mid-epoch (ray-project/ray#37633), and a process RNG does not
survive a restart, so the order is a pure function of (seed, epoch) and the position is one
integer: the number of samples consumed. Like mosaicml/streaming, the position counts global
samples, so the same global batch gives the same samples whatever the data-parallel size:

    global position p of rank r, micro step m, row j in step s
        = start + m * (dp * micro) + r * micro + j        (start = samples consumed before s)

One worker with 2 accumulation steps and two workers with 1 therefore see the same micro
batches, which is what makes their losses comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlobalSampler:
    num_samples: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("GlobalSampler needs at least one sample")

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Map global positions (any number of epochs in) to sample indices."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._order(int(epoch))[positions[sel] % self.num_samples]
        return out

    def micro_batch_positions(self, start: int, micro_step: int, dp_rank: int, dp_size: int, micro: int) -> np.ndarray:
        first = start + micro_step * dp_size * micro + dp_rank * micro
        return np.arange(first, first + micro, dtype=np.int64)
