"""Global batches as sharded `jax.Array`s, each process building only the rows it holds."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from ttt_jax.data import Batches


def sharded_batch(
    batches: Batches, n: int, grad_accum: int, sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Global batch `n` as `[A, B/A, T]` arrays laid out by `sharding`.

    Micro-batch a holds global rows `a * B/A ... (a+1) * B/A - 1`. `make_array_from_callback`
    asks each local device for its slice; rows are built once per distinct slice (devices that
    differ only along the tensor axis share one), so a host never builds rows it does not hold.
    """
    a_total, micro = grad_accum, batches.batch_size // grad_accum
    t = batches.source.seq_len
    built: dict[tuple, dict[str, np.ndarray]] = {}

    def rows(index: tuple) -> dict[str, np.ndarray]:
        key = tuple((s.start, s.stop) for s in index[:2])
        if key not in built:
            acc = range(a_total)[index[0]]
            rws = range(micro)[index[1]]
            flat = batches.rows(n, [a * micro + r for a in acc for r in rws])
            built[key] = {k: v.reshape(len(acc), len(rws), t) for k, v in flat.items()}
        return built[key]

    shape = (a_total, micro, t)
    return {
        k: jax.make_array_from_callback(
            shape, sharding, lambda idx, k=k: rows(idx)[k][:, :, idx[2]]
        )
        for k in ("tokens", "targets", "segment_ids", "loss_mask")
    }
