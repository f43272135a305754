"""What a `ModelConfig` says about its layers: what every layer shares, and each family's options.

`Shared` is what the model decides for all of its layers (widths, precision policy, the RoPE
base and kernel of its attention). Each options class (`ModelConfig.ttt`, `.lact`, `.inplace`,
`.npt`; on the command line `--model.ttt.checkpoint-group 4`) holds the fields of one family's
layer config that the model leaves to the user, made from the layer config itself (`_mirror`):
the same names, types, defaults and order, all but the fields the model sets
(tests/models/test_registry.py checks the split), so a block's layer config is the family's
config class called with `Shared`'s fields and these (`ttt_jax.models.registry`).
`RetrofitOptions` (`ModelConfig.retrofit`, `--model.retrofit.*`) says which layers of a
pretrained model get TTT (`ttt_jax.models.retrofit`).
"""

from __future__ import annotations

import dataclasses

from ttt_jax.layers import InPlaceMLPConfig, LaCTConfig, NPTMLPConfig, TTTConfig
from ttt_jax.layers.common import FP32, MixedPrecision


def _mirror(layer_config: type, set_by_model: tuple[str, ...], **own: tuple[str, object]):
    """Makes the decorated class (its name and docstring) the frozen dataclass of the fields of
    `layer_config` but `set_by_model`, in order, with their types and defaults; `own` gives
    `name=(type, default)` where an option means something the layer config spells otherwise."""

    def make(cls: type) -> type:
        fields = []
        for f in dataclasses.fields(layer_config):
            if f.name not in set_by_model:
                kind, default = own.get(f.name, (f.type, f.default))
                fields.append((f.name, kind, dataclasses.field(default=default)))
        options = dataclasses.make_dataclass(cls.__name__, fields, frozen=True)
        options.__module__, options.__qualname__ = cls.__module__, cls.__qualname__
        options.__doc__ = cls.__doc__
        return options

    return make


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


@_mirror(TTTConfig, ("d_model", "num_heads", "inner", "precision"))
class TTTOptions:
    """TTT-Linear / TTT-MLP mixers: the `TTTConfig` fields (documented there) but `d_model`,
    `num_heads`, `inner` (the block's family) and `precision`, which the model sets.

    `checkpoint_group` is the layer's default, 4 (with `unroll` 4 the fastest setting measured on
    an H100, and less memory than no remat); `rope_theta` is TTT's own: it rotates positions
    modulo the mini-batch, not the model's positions.
    """


@_mirror(
    LaCTConfig,
    ("d_model", "num_heads", "rope_theta", "attention_impl", "precision"),
    num_fw_heads=("int | None", None),
)
class LaCTOptions:
    """LaCT mixers: the `LaCTConfig` fields (documented there) but `d_model`, `num_heads`,
    `rope_theta`, `attention_impl` and `precision`, which the model sets.

    Two differ in meaning: `num_fw_heads=None` takes the model's `num_heads`, and `rank` is capped
    at the fast weight's widths (`min(fw_hidden, d_model / num_fw_heads)`), so one preset rank
    serves narrow test models too. `rope_theta` and `attention_impl` are the model's (`Shared`).
    """


@_mirror(InPlaceMLPConfig, ("d_model", "d_ff", "precision"))
class InPlaceOptions:
    """In-Place TTT MLPs: the `InPlaceMLPConfig` fields (documented there) but `d_model`, `d_ff`
    and `precision`, which the model sets."""


@_mirror(NPTMLPConfig, ("d_model", "d_ff", "d_mod", "precision"))
class NPTOptions:
    """NPT MLPs: the `NPTMLPConfig` fields (documented there) but `d_model`, `d_ff`, `d_mod` and
    `precision`, which the model sets: the modulating signal is the block's mixer output, so its
    width (`d_mod`) is the model's."""


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
