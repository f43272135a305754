"""Deterministic, resumable batches: row r of global batch n is a pure function of (seed, n, r).

Sample `s = n * batch_size + r`. A finite source is read in epochs: `s // N` is the epoch, and
within an epoch the examples come in the order of a permutation drawn from `(seed, epoch)`
(training) or in file order (evaluation). The only state is the number of global batches
consumed, so the iterator's position in a checkpoint is one integer (plus the data's
fingerprint), and any process can build any subset of rows: each host builds only the rows its
devices hold (`rows`), whatever the number of hosts.
"""

from __future__ import annotations

import numpy as np

KEYS = ("tokens", "targets", "segment_ids", "loss_mask")


class Batches:
    """Global batches of `batch_size` examples from `source` (`.example(i)`, `.num_examples`)."""

    def __init__(self, source, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if source.num_examples is not None and source.num_examples < 1:
            raise ValueError(
                "the data has no complete example of this sequence length: shorten --seq or "
                "add data"
            )
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _example_index(self, s: int) -> int:
        n = self.source.num_examples
        if n is None:
            return s
        epoch, pos = divmod(s, n)
        if not self.shuffle:
            return pos
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][pos])

    def rows(self, batch: int, row_ids) -> dict[str, np.ndarray]:
        """Rows `row_ids` of global batch `batch`, each `[len(row_ids), T]`."""
        examples = [
            self.source.example(self._example_index(batch * self.batch_size + int(r)))
            for r in row_ids
        ]
        return {k: np.stack([e[k] for e in examples]) for k in KEYS}

    def batch(self, batch: int) -> dict[str, np.ndarray]:
        """The whole global batch `batch` (single-process use and tests)."""
        return self.rows(batch, range(self.batch_size))
