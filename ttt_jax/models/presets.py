"""Named model presets and their attention-only baselines.

| preset | d_model | layers | heads | d_ff | vocab | pattern (one period, repeated) |
|---|---|---|---|---|---|---|
| `tiny` | 128 | 4 | 4 | 384 | 256 (bytes) | attention/swiglu, ttt_linear/swiglu |
| `125m` | 768 | 12 | 12 | 2048 | 32000 | attention/swiglu, ttt_linear/swiglu |
| `350m` | 1024 | 24 | 16 | 2736 | 32000 | attention/swiglu, ttt_linear/swiglu |
| `760m` | 1536 | 24 | 16 | 4096 | 32000 | attention/swiglu, ttt_linear/swiglu |
| `lact-760m` | 1536 | 24 | 24 | 4096 | 32000 | lact/swiglu (4 fw heads x 384, rank 32, Muon) |

`lact-760m` is the LaCT paper's 760M shape (every block a LaCT layer: sliding-window attention
over 2048 tokens plus SwiGLU fast weights updated every 2048 tokens, with momentum and Muon).
Unlike the layer preset `LaCTConfig.preset("760m")` it has no learnable output scale; it is one
option away (`lact=LaCTOptions(..., learnable_scale=True)`, `--model.lact.learnable-scale`).

`tiny` computes in fp32 with the TTT scan not unrolled and not rematerialised (what is fastest on a
CPU); the others use the bf16 policy (fp32 params and fast-weight state, bf16 compute), TTT
checkpoint groups of 4 chunks and unroll 4 (the fastest measured on an H100, `TTTConfig`'s
defaults), and block remat `dots_no_batch` (each block keeps its weight-stationary matmul outputs
and recomputes the rest): on an H100 the 125m TTT model's training step then peaks at 1.00x the
attention-only model's (6.54 vs 6.52 GB at T=8192) where without block remat it needed 1.21x (12.43
vs 10.27 GB; benchmarks/RESULTS.md). `lact-760m` instead defaults to `full` block remat: on two
H200s (FSDP, one 32768-token sequence per GPU) `dots_no_batch` peaked at 60.9 GiB per GPU against
18.9 GiB for `full`, for a step only 1.5% faster (1.615 vs 1.640 s).

So in every preset TTT-Linear replaces attention in every other block (blocks 1, 3, 5, ...),
with attention in the others. `NAME-attn` is the same model with attention in all blocks, the
baseline of the memory headline ("TTT layers replace attention in every other block" vs
"attention in all blocks"). The shapes follow the TTT paper's 125M / 350M / 760M models (vocab
32000 is its Llama tokenizer's); `tiny` is sized to train on 2 CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses

from ttt_jax.models.config import ModelConfig
from ttt_jax.models.options import LaCTOptions, TTTOptions

TTT_EVERY_OTHER = ("attention/swiglu", "ttt_linear/swiglu")
ATTENTION_ONLY = ("attention/swiglu",)


def _gpu(**shape) -> ModelConfig:
    """A TTT-paper shape (vocab 32000, TTT in every other block) with the GPU defaults of the
    module docstring (the bf16 policy, TTT groups of 4, block remat `dots_no_batch`); `shape`
    gives the widths and overrides any default."""
    defaults = dict(
        vocab_size=32000,
        pattern=TTT_EVERY_OTHER,
        ttt=TTTOptions(checkpoint_group=4),
        block_remat="dots_no_batch",
    )
    return ModelConfig(**{**defaults, **shape})


_BASE = {
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=128,
        num_layers=4,
        num_heads=4,
        d_ff=384,
        pattern=TTT_EVERY_OTHER,
        ttt=TTTOptions(checkpoint_group=None, unroll=1),
        precision="fp32",
    ),
    "125m": _gpu(d_model=768, num_layers=12, num_heads=12, d_ff=2048),
    "350m": _gpu(d_model=1024, num_layers=24, num_heads=16, d_ff=2736),
    "760m": _gpu(d_model=1536, num_layers=24, num_heads=16, d_ff=4096),
    "lact-760m": _gpu(
        d_model=1536,
        num_layers=24,
        num_heads=24,
        d_ff=4096,
        pattern=("lact/swiglu",),
        lact=LaCTOptions(num_fw_heads=4, rank=32, use_muon=True),
        block_remat="full",
    ),
}

PRESETS: dict[str, ModelConfig] = {
    **_BASE,
    **{f"{name}-attn": dataclasses.replace(c, pattern=ATTENTION_ONLY) for name, c in _BASE.items()},
}


def preset(name: str) -> ModelConfig:
    """The `ModelConfig` of a named preset (module docstring); ValueError lists valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
