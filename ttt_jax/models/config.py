"""The decoder LM's configuration: shape, per-layer block pattern, precision and memory knobs."""

from __future__ import annotations

import dataclasses
import math

from ttt_jax.layers.attention import IMPLEMENTATIONS
from ttt_jax.layers.common import MixedPrecision
from ttt_jax.models.registry import MIXERS, MLPS
from ttt_jax.ops.core import (
    check_choice,
    check_optional_positive_int,
    check_positive_int,
    check_scan_knobs,
    resolve_policy,
)

PRECISIONS = ("fp32", "bf16")


def parse_block(spec: str) -> tuple[str, str]:
    """Splits a block spec `"mixer/mlp"` (e.g. `"ttt_linear/swiglu"`) into its two names."""
    parts = spec.split("/") if isinstance(spec, str) else []
    if len(parts) != 2:
        raise ValueError(
            f"block {spec!r} must be 'mixer/mlp', e.g. 'attention/swiglu'; mixers: "
            f"{', '.join(MIXERS)}; mlps: {', '.join(MLPS)}"
        )
    mixer, mlp = parts
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r} in block {spec!r}; valid: {', '.join(MIXERS)}")
    if mlp not in MLPS:
        raise ValueError(f"unknown mlp {mlp!r} in block {spec!r}; valid: {', '.join(MLPS)}")
    return mixer, mlp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM: embedding, `num_layers` pre-norm blocks, final RMSNorm, LM head.

    Attributes:
      vocab_size: V.
      d_model: d, residual width.
      num_layers: L; a multiple of `len(pattern)`.
      num_heads: heads of attention and TTT mixers (head_dim = d_model / num_heads).
      d_ff: hidden width F of every MLP (SwiGLU and its TTT variants).
      pattern: the block specs `"mixer/mlp"` of one period, repeated `L / len(pattern)` times.
        Mixers: attention, ttt_linear, ttt_mlp, lact. MLPs:
        swiglu, inplace_ttt, npt. One period is the unit the layer scan repeats.
      tie_embeddings: the head is the transposed embedding (True) or its own `[d, V]` matrix.
      window: sliding window of attention mixers (None: full causal attention).
      rope_theta: RoPE base of attention mixers.
      attention_impl: "auto", "xla" or "cudnn" (`ttt_jax.layers.attention`).
      ttt_mini_batch: C of TTT-Linear / TTT-MLP mixers.
      ttt_base_lr: inner learning-rate scale of TTT mixers (None: the paper's default).
      ttt_backbone: "mamba" (conv + gate) or "transformer" for TTT mixers.
      ttt_unroll: unroll of TTT mixers' inner scan (speed and compile time only: 4 is the
        fastest measured on an H100, 1 compiles and runs faster on a CPU).
      lact_chunk: chunk size of LaCT mixers.
      lact_window: sliding window (tokens) of LaCT mixers' attention branch.
      lact_heads: fast-weight heads of LaCT mixers (None: num_heads); `d_model / lact_heads`
        must be even.
      lact_rank: rank of LaCT's low-rank fast-weight starts, capped at the head width.
      lact_muon: LaCT mixers orthogonalise their updates with Muon (momentum is always on).
      lact_muon_dtype: "float32" or "bfloat16" Newton-Schulz matmuls (None: the compute dtype;
        `LaCTConfig.muon_dtype`).
      inplace_chunk: chunk size of In-Place TTT MLPs.
      inplace_target: "embeddings" or "input" (`InPlaceMLPConfig.target_source`).
      npt_rank: rank of NPT MLPs' modulation.
      precision: "bf16" (fp32 params and fast-weight state, bf16 compute) or "fp32".
      block_remat: remat policy name wrapped around each whole block (`ttt_jax.ops.core.remat`):
        none, full, dots, dots_no_batch, save_names:..., offload_names:... (block names are
        `ttt_jax.models.block.NAMES`).
      checkpoint_group: inner-scan checkpoint group of every recurrent mixer / MLP (None: none).
      inner_remat_policy: policy inside those groups (needs checkpoint_group).
      norm_eps: RMSNorm epsilon.
      embed_std: std of the embedding (and untied head) init.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 384
    pattern: tuple[str, ...] = ("attention/swiglu", "ttt_linear/swiglu")
    tie_embeddings: bool = True
    window: int | None = None
    rope_theta: float = 10000.0
    attention_impl: str = "auto"
    ttt_mini_batch: int = 16
    ttt_base_lr: float | None = None
    ttt_backbone: str = "mamba"
    ttt_unroll: int = 4
    lact_chunk: int = 2048
    lact_window: int = 2048
    lact_heads: int | None = None
    lact_rank: int = 32
    lact_muon: bool = False
    lact_muon_dtype: str | None = None
    inplace_chunk: int = 256
    inplace_target: str = "embeddings"
    npt_rank: int = 16
    precision: str = "bf16"
    block_remat: str = "none"
    checkpoint_group: int | None = None
    inner_remat_policy: str | None = None
    norm_eps: float = 1e-6
    embed_std: float = 0.02

    def __post_init__(self):
        for field in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "d_ff",
            "ttt_mini_batch",
            "ttt_unroll",
            "lact_chunk",
            "lact_window",
            "lact_rank",
            "inplace_chunk",
            "npt_rank",
        ):
            check_positive_int(f"ModelConfig.{field}", getattr(self, field))
        check_optional_positive_int("ModelConfig.window", self.window)
        check_optional_positive_int("ModelConfig.lact_heads", self.lact_heads)
        lact_heads = self.lact_heads or self.num_heads
        if self.d_model % lact_heads or (self.d_model // lact_heads) % 2:
            raise ValueError(
                f"ModelConfig.lact_heads={self.lact_heads} must divide d_model={self.d_model} "
                "into even head widths (RoPE rotates pairs)"
            )
        check_choice("ModelConfig.precision", self.precision, PRECISIONS)
        check_choice("ModelConfig.attention_impl", self.attention_impl, IMPLEMENTATIONS)
        check_choice("ModelConfig.ttt_backbone", self.ttt_backbone, ("mamba", "transformer"))
        check_choice("ModelConfig.inplace_target", self.inplace_target, ("embeddings", "input"))
        if not isinstance(self.pattern, tuple) or not self.pattern:
            raise ValueError(f"ModelConfig.pattern must be a non-empty tuple, got {self.pattern!r}")
        for spec in self.pattern:
            parse_block(spec)
        if self.num_layers % len(self.pattern):
            raise ValueError(
                f"ModelConfig.num_layers={self.num_layers} is not a multiple of the pattern "
                f"length {len(self.pattern)} ({', '.join(self.pattern)})"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head_dim={self.head_dim} must be even (RoPE)")
        try:
            resolve_policy(self.block_remat)
        except ValueError as err:
            raise ValueError(f"ModelConfig.block_remat: {err}") from None
        try:
            check_scan_knobs(self.checkpoint_group, self.inner_remat_policy)
        except ValueError as err:
            raise ValueError(
                f"ModelConfig (checkpoint_group / inner_remat_policy): {err}"
            ) from None
        for field in ("rope_theta", "norm_eps", "embed_std"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a finite number > 0, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision.named(self.precision)

    @property
    def blocks(self) -> tuple[tuple[str, str], ...]:
        """`(mixer, mlp)` of every layer, in order."""
        period = tuple(parse_block(s) for s in self.pattern)
        return period * (self.num_layers // len(period))

    @property
    def repeats(self) -> int:
        """How many times the scan repeats the pattern."""
        return self.num_layers // len(self.pattern)
