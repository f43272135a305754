"""Synthetic multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

Each sequence first lists P key-value pairs `k_1 v_1 ... k_P v_P` (distinct keys from
`[1, V/2)`, values from `[V/2, V)`), then asks queries `k v` for keys drawn from those P until
the sequence is full. Only the targets after a query key are scored (the value it must recall),
so `accuracy` over the loss mask is the task's metric; chance is about 1/P for a model that has
learned to answer with some value from the context. Example i of a split is generated from
`(seed, split, i)` alone: deterministic and resumable.
"""

from __future__ import annotations

import hashlib

import numpy as np


class MQAR:
    """MQAR examples of `seq_len` tokens (`TokenStream.example`'s format)."""

    def __init__(self, seq_len: int, pairs: int, vocab: int, seed: int = 0, split: str = "train"):
        if seq_len < 2 * pairs + 2:
            raise ValueError(
                f"MQAR with {pairs} pairs needs seq_len >= {2 * pairs + 2}, got {seq_len}"
            )
        self.seq_len, self.pairs, self.vocab, self.seed = seq_len, pairs, vocab, seed
        self.split = split
        self.num_examples = None
        self.fingerprint = hashlib.sha1(f"mqar:{seq_len}:{pairs}:{vocab}".encode()).hexdigest()[:16]

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Example i: `tokens, targets, segment_ids: [T]` int32 and `loss_mask: [T]` float32."""
        t, p, half = self.seq_len, self.pairs, self.vocab // 2
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
        keys = rng.choice(np.arange(1, half), size=p, replace=False)
        values = rng.integers(half, self.vocab, size=p)
        seq = np.zeros(t + 1, np.int32)
        seq[0 : 2 * p : 2], seq[1 : 2 * p : 2] = keys, values
        n_q = (t + 1 - 2 * p) // 2
        q = rng.integers(0, p, size=n_q)
        seq[2 * p : 2 * p + 2 * n_q : 2] = keys[q]
        seq[2 * p + 1 : 2 * p + 2 * n_q : 2] = values[q]
        mask = np.zeros(t, np.float32)
        mask[2 * p : 2 * p + 2 * n_q : 2] = 1.0  # input is a query key, target its value
        return {
            "tokens": seq[:-1],
            "targets": seq[1:],
            "segment_ids": np.zeros(t, np.int32),
            "loss_mask": mask,
        }
