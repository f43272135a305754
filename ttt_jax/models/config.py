"""The decoder LM's configuration: shape, per-layer block pattern, precision, block remat, and
the options of each layer family (`ttt_jax.models.options`)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ttt_jax.layers.attention import IMPLEMENTATIONS
from ttt_jax.layers.common import MixedPrecision
from ttt_jax.models.options import InPlaceOptions, LaCTOptions, NPTOptions, Shared, TTTOptions
from ttt_jax.models.registry import FAMILIES, MIXERS, MLPS
from ttt_jax.ops.core import (
    check_choice,
    check_optional_positive_int,
    check_positive_int,
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
      rope_theta: RoPE base of attention mixers and LaCT mixers.
      attention_impl: "auto", "xla" or "cudnn" (`ttt_jax.layers.attention`), for attention
        mixers and LaCT's window attention.
      precision: "bf16" (fp32 params and fast-weight state, bf16 compute) or "fp32".
      block_remat: remat policy name wrapped around each whole block (`ttt_jax.ops.core.remat`):
        none, full, dots, dots_no_batch, save_names:..., offload_names:... (block names are
        `ttt_jax.models.block.NAMES`).
      norm_eps: RMSNorm epsilon.
      embed_std: std of the embedding (and untied head) init.
      ttt: options of TTT-Linear / TTT-MLP mixers (`TTTConfig`'s fields: mini_batch_size,
        checkpoint_group, remat_policy, unroll, ...).
      lact: options of LaCT mixers (`LaCTConfig`'s fields: num_fw_heads, chunk_size, window,
        rank, use_muon, learnable_scale, checkpoint_group, ...).
      inplace: options of In-Place TTT MLPs (`InPlaceMLPConfig`'s fields: chunk_size,
        target_source, checkpoint_group, ...).
      npt: options of NPT MLPs (`NPTMLPConfig`'s fields: rank, modulation, ...).

    Every family's options are validated here, once, by building its layer config
    (`layer_config`), whether or not the pattern uses the family.
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
    precision: str = "bf16"
    block_remat: str = "none"
    norm_eps: float = 1e-6
    embed_std: float = 0.02
    ttt: TTTOptions = TTTOptions()
    lact: LaCTOptions = LaCTOptions()
    inplace: InPlaceOptions = InPlaceOptions()
    npt: NPTOptions = NPTOptions()

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
            check_positive_int(f"ModelConfig.{field}", getattr(self, field))
        check_optional_positive_int("ModelConfig.window", self.window)
        check_choice("ModelConfig.precision", self.precision, PRECISIONS)
        check_choice("ModelConfig.attention_impl", self.attention_impl, IMPLEMENTATIONS)
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
        for field in ("rope_theta", "norm_eps", "embed_std"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a finite number > 0, got {value!r}")
        for field, kind in OPTIONS.items():
            if not isinstance(getattr(self, field), kind):
                raise ValueError(
                    f"ModelConfig.{field} must be a {kind.__name__}, got {getattr(self, field)!r}"
                )
        for name in FAMILIES:
            try:
                self.layer_config(name)
            except ValueError as err:
                raise ValueError(_as_model_error(str(err), name)) from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision.named(self.precision)

    @property
    def shared(self) -> Shared:
        """What the model gives each of its layers (`ttt_jax.models.options.Shared`)."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(Shared)}
        return Shared(**dict(same, precision=self.mixed_precision))

    def layer_config(self, name: str) -> Any:
        """The layer config of the mixer or MLP `name` (`ttt_jax.models.registry`) in this model."""
        family = FAMILIES[name]
        options = None if family.options is None else getattr(self, family.options)
        return family.layer_config(self.shared, options)

    @property
    def blocks(self) -> tuple[tuple[str, str], ...]:
        """`(mixer, mlp)` of every layer, in order."""
        period = tuple(parse_block(s) for s in self.pattern)
        return period * (self.num_layers // len(period))

    @property
    def repeats(self) -> int:
        """How many times the scan repeats the pattern."""
        return self.num_layers // len(self.pattern)


def _as_model_error(message: str, name: str) -> str:
    """A layer config's error about family `name`, with its option fields named the way the
    model's config names them (`TTTConfig.mini_batch_size` -> `ModelConfig.ttt.mini_batch_size`,
    the flag `--model.ttt.mini-batch-size`)."""
    section = FAMILIES[name].options
    if section is None:
        return f"ModelConfig ({name} layers): {message}"
    fields = {f.name for f in dataclasses.fields(OPTIONS[section])}

    def rename(match: re.Match) -> str:
        field = match.group(1)
        return f"ModelConfig.{section}.{field}" if field in fields else match.group(0)

    renamed = re.sub(r"\b[A-Za-z]+Config\.(\w+)", rename, message)
    return renamed if renamed != message else f"ModelConfig.{section}: {message}"


# The option sections of a ModelConfig and their classes.
OPTIONS = {"ttt": TTTOptions, "lact": LaCTOptions, "inplace": InPlaceOptions, "npt": NPTOptions}

# The flat fields of ModelConfig before the options were nested (config.json of older runs),
# each with the option field(s) it became.
FLAT_FIELDS: dict[str, tuple[str, ...]] = {
    "ttt_mini_batch": ("ttt.mini_batch_size",),
    "ttt_base_lr": ("ttt.base_lr",),
    "ttt_backbone": ("ttt.backbone",),
    "ttt_unroll": ("ttt.unroll",),
    "lact_chunk": ("lact.chunk_size",),
    "lact_window": ("lact.window",),
    "lact_heads": ("lact.num_fw_heads",),
    "lact_rank": ("lact.rank",),
    "lact_muon": ("lact.use_muon",),
    "lact_muon_dtype": ("lact.muon_dtype",),
    "inplace_chunk": ("inplace.chunk_size",),
    "inplace_target": ("inplace.target_source",),
    "npt_rank": ("npt.rank",),
    "checkpoint_group": (
        "ttt.checkpoint_group",
        "lact.checkpoint_group",
        "inplace.checkpoint_group",
    ),
    "inner_remat_policy": ("ttt.remat_policy", "lact.remat_policy", "inplace.remat_policy"),
}


def migrate_flat_fields(model: dict) -> dict:
    """A `ModelConfig` as JSON (`dataclasses.asdict`) with the flat fields of the older format
    (`FLAT_FIELDS`, e.g. `lact_heads`, `checkpoint_group`) moved to the nested option fields
    they became; a dict of the current format comes back unchanged (the same object).

    The flat values go to the option sections of the families the pattern uses; the other
    sections, which did not shape the model, take their defaults (the flat format kept, e.g., a
    `checkpoint_group` for every family, its TTT preset's 4 included). An option the flat
    format could not set takes its default too, which is what such a run used (the defaults
    equal the values that format passed to the layers).
    """
    if not any(flat in model for flat in FLAT_FIELDS):
        return model
    try:
        used = {FAMILIES[n].options for spec in model["pattern"] for n in parse_block(spec)}
    except (KeyError, TypeError, ValueError):
        used = set(OPTIONS)
    model = dict(model)
    sections = {name: dataclasses.asdict(kind()) for name, kind in OPTIONS.items()}
    for flat, targets in FLAT_FIELDS.items():
        if flat not in model:
            continue
        value = model.pop(flat)
        for target in targets:
            section, field = target.split(".")
            if section in used:
                sections[section][field] = value
    return {**model, **sections}
