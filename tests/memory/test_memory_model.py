"""The memory headline (issue 6): training a small LM whose every other block is TTT-Linear
instead of attention takes at most 1.15x the memory of the attention-only model at T=8192 with
bf16 compute (users saw 2.24x: 44.2 GB against 19.7 GB).

Judged by the compiler on abstract shapes: the planned peak of the whole training step
(forward, backward and AdamW update; parameters, optimizer state, gradients and temporaries,
parameters and optimizer state donated), with the preset's own remat settings.

On the CPU, attention is XLA's dot_product_attention, which materialises the `[B, H, T, T]`
scores and keeps them for the backward: at T=8192 they dominate both models, and the TTT model,
with half the attention layers, comes out well below the baseline. So the comparison is also
made with full block remat, where each block keeps only its input and the scores are a
transient of one block's backward in both models: there the TTT blocks' own residuals are what
differs. `benchmarks/bench_memory_model.py` measures the same on a GPU, with cuDNN flash
attention (benchmarks/RESULTS.md, H100, 125m at T=8192): 1.02x with full block remat, 1.00x
with `dots_no_batch` block remat (now the GPU presets' default), but 1.21x with scan groups only
and no block remat, which the CPU test cannot see because the scores hide it.
"""

import dataclasses

import pytest

from ttt_jax.memory import ModelWorkload, Remat
from ttt_jax.models import preset

T = 8192
LIMIT = 1.15


def train_step_peak(name: str, remat: Remat | None) -> int:
    workload = ModelWorkload(dataclasses.replace(preset(name), precision="bf16"))
    if remat is not None:
        recurrent = workload.recurrent
        workload = workload.with_remat(
            dataclasses.replace(
                remat, checkpoint_group=remat.checkpoint_group if recurrent else None
            )
        )
    return workload.programs(1, T)["train_step"].compiled().peak


@pytest.mark.parametrize(
    "remat", [None, Remat(4, block_remat="full")], ids=["preset_defaults", "block_remat_full"]
)
def test_ttt_every_other_block_costs_at_most_115_percent_of_attention(remat):
    ttt = train_step_peak("tiny", remat)
    attention = train_step_peak("tiny-attn", remat)
    ratio = ttt / attention
    print(
        f"T={T} bf16 train step peak: TTT every other block {ttt / 2**30:.3f} GiB, "
        f"attention only {attention / 2**30:.3f} GiB, ratio {ratio:.3f}"
    )
    assert ratio <= LIMIT
