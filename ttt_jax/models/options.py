"""What a `ModelConfig` says about its layers: what every layer shares, and each family's options.

`Shared` is what the model decides for all of its layers (widths, precision policy, the RoPE
base and kernel of its attention). Each options class (`ModelConfig.ttt`, `.lact`, `.inplace`,
`.npt`; on the command line `--model.ttt.checkpoint-group 4`) holds the fields of one family's
layer config that the model leaves to the user, under the same names and with the same
defaults as the layer config (tests/models/test_registry.py pins both), so a block's layer config is
the family's config class called with `Shared`'s fields and these (`ttt_jax.models.registry`).
`RetrofitOptions` (`ModelConfig.retrofit`, `--model.retrofit.*`) says which layers of a
pretrained model get TTT (`ttt_jax.models.retrofit`).
"""

from __future__ import annotations

import dataclasses

from ttt_jax.layers.common import FP32, MixedPrecision


@dataclasses.dataclass(frozen=True)
class Shared:
    """What a model gives each of its layers.

    Attributes:
      d_model: d, the residual width.
      num_heads: heads of attention and TTT mixers (and LaCT's, unless its options say).
      d_ff: F, hidden width of every MLP.
      precision: the mixed-precision policy.
      window: sliding window of attention mixers (None: full causal attention).
      rope_theta: RoPE base of attention mixers and of LaCT's two branches.
      attention_impl: "auto", "xla" or "cudnn", for attention mixers and LaCT's window branch.
      norm_eps: the model's RMSNorm epsilon (attention's q/k norm uses it too).
    """

    d_model: int
    num_heads: int
    d_ff: int
    precision: MixedPrecision = FP32
    window: int | None = None
    rope_theta: float = 10000.0
    attention_impl: str = "auto"
    norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Attention mixers: the `AttentionConfig` fields of the same names (documented there), all
    off by default; a pretrained checkpoint sets them (`ttt_jax.convert`).

    `head_dim=None` takes `d_model / num_heads` (a set value need not be that: Qwen3's is not).
    """

    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192


@dataclasses.dataclass(frozen=True)
class TTTOptions:
    """TTT-Linear / TTT-MLP mixers: the `TTTConfig` fields of the same names (documented there).

    `checkpoint_group` is the layer's default, 4 (with `unroll` 4 the fastest setting measured on
    an H100, and less memory than no remat); `rope_theta` is TTT's own: it rotates positions
    modulo the mini-batch, not the model's positions.
    """

    mini_batch_size: int = 16
    base_lr: float | None = None
    backbone: str = "mamba"
    rope_theta: float = 10000.0
    conv_width: int = 4
    mlp_ratio: int = 4
    checkpoint_group: int | None = 4
    remat_policy: str | None = None
    unroll: int = 4
    impl: str = "auto"
    kernel_checkpoint_group: int = 16


@dataclasses.dataclass(frozen=True)
class LaCTOptions:
    """LaCT mixers: the `LaCTConfig` fields of the same names (documented there).

    Two differ in meaning: `num_fw_heads=None` takes the model's `num_heads`, and `rank` is capped
    at the fast weight's widths (`min(fw_hidden, d_model / num_fw_heads)`), so one preset rank
    serves narrow test models too. `rope_theta` and `attention_impl` are the model's (`Shared`).
    """

    num_fw_heads: int | None = None
    fw_hidden: int | None = None
    window: int = 2048
    chunk_size: int = 2048
    rank: int | None = 32
    base_lr: float = 1e-3
    use_momentum: bool = True
    use_muon: bool = False
    muon_dtype: str | None = None
    weight_norm: bool = True
    learnable_scale: bool = False
    norm_eps: float = 1e-6
    checkpoint_group: int | None = None
    remat_policy: str | None = None
    backward: str = "custom"
    backward_dtype: str | None = None
    debug: bool = False


@dataclasses.dataclass(frozen=True)
class InPlaceOptions:
    """In-Place TTT MLPs: the `InPlaceMLPConfig` fields of the same names (documented there)."""

    chunk_size: int = 1024
    conv_mode: str = "centered"
    target_source: str = "embeddings"
    activation: str = "silu"
    eta: float = 1.0
    clip_tau: float | None = None
    ttt: bool = True
    prefix: str = "sequential"
    backward: str = "custom"
    checkpoint_group: int | None = None
    remat_policy: str | None = None


@dataclasses.dataclass(frozen=True)
class NPTOptions:
    """NPT MLPs: the `NPTMLPConfig` fields of the same names (documented there). The modulating
    signal is the block's mixer output, so its width (`d_mod`) is the model's."""

    modulation: str = "low_rank"
    rank: int = 16
    k: int = 1
    rank_k_form: str = "factored"
    mod_scale: float = 0.1
    reg_lambda: float = 0.0


@dataclasses.dataclass(frozen=True)
class RetrofitOptions:
    """TTT retrofitted into chosen layers of a pretrained model (`ttt_jax.models.retrofit`),
    each recipe equal to the pretrained function at initialisation. Layer indices count from 0
    over all `num_layers` blocks, whatever the pattern; every recipe takes its layer's options
    from its family's section (`ModelConfig.inplace`, `.npt`, `.ttt`, `.lact`).

    Attributes:
      inplace_layers: layers whose SwiGLU MLP becomes an In-Place TTT MLP (its `W_down` the
        slow weight; zero conv, so the fast weight does not move at step 0).
      npt_layers: layers whose SwiGLU MLP becomes an NPT MLP (its delta's output factor zero).
      branch_layers: layers that get a gated branch after their mixer,
        `m = mixer(x) + g * branch(x)`, with the per-channel gate `g` zero at step 0.
      branch: the branch's mixer family, `ttt_linear`, `ttt_mlp` or `lact`.
    """

    inplace_layers: tuple[int, ...] = ()
    npt_layers: tuple[int, ...] = ()
    branch_layers: tuple[int, ...] = ()
    branch: str = "ttt_linear"

    @property
    def active(self) -> bool:
        """Whether any layer is retrofitted."""
        return bool(self.inplace_layers or self.npt_layers or self.branch_layers)
