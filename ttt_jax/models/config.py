"""The decoder LM's configuration: shape, per-layer block pattern, precision, block remat, the
options of each layer family (`ttt_jax.models.options`), and TTT retrofitted into chosen layers
(`ModelConfig.retrofit`, `ttt_jax.models.retrofit`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ttt_jax.layers.attention import IMPLEMENTATIONS
from ttt_jax.layers.common import MixedPrecision
from ttt_jax.models.options import (
    AttentionOptions,
    InPlaceOptions,
    LaCTOptions,
    NPTOptions,
    RetrofitOptions,
    Shared,
    TTTOptions,
)
from ttt_jax.models.registry import FAMILIES, MIXERS, MLPS
from ttt_jax.ops.core import (
    check_choice,
    check_optional_positive_int,
    check_positive_int,
    resolve_policy,
)

PRECISIONS = ("fp32", "bf16", "fp64")

# The mixers a retrofit can add as a gated branch: the recurrent ones (TTT-Linear, TTT-MLP, LaCT).
BRANCHES = tuple(name for name, family in MIXERS.items() if family.recurrent)


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
      precision: "bf16" (fp32 params and fast-weight state, bf16 compute), "fp32", or "fp64"
        (everything float64, under `jax_enable_x64`: the exactness tests).
      block_remat: remat policy name wrapped around each whole block (`ttt_jax.ops.core.remat`):
        none, full, dots, dots_no_batch, save_names:..., offload_names:... (block names are
        `ttt_jax.models.block.NAMES`). `offload_names:` reaches host memory only with two or
        more layer groups (`num_layers > len(pattern)`): XLA drops a one-trip layer loop and
        the offload with it, and the residuals stay on the device (H100, jax 0.11.2).
      norm_eps: RMSNorm epsilon.
      embed_std: std of the embedding (and untied head) init.
      attention: options of attention mixers (`AttentionConfig`'s fields: num_kv_heads,
        head_dim, qk_norm, qkv_bias, o_bias, rope_scaling, ...), all off by default; a
        pretrained checkpoint sets them (`ttt_jax.convert`).
      ttt: options of TTT-Linear / TTT-MLP mixers (`TTTConfig`'s fields: mini_batch_size,
        checkpoint_group, remat_policy, unroll, ...).
      lact: options of LaCT mixers (`LaCTConfig`'s fields: num_fw_heads, chunk_size, window,
        rank, use_muon, learnable_scale, checkpoint_group, ...).
      inplace: options of In-Place TTT MLPs (`InPlaceMLPConfig`'s fields: chunk_size,
        target_source, checkpoint_group, ...).
      npt: options of NPT MLPs (`NPTMLPConfig`'s fields: rank, modulation, ...).
      retrofit: TTT in chosen layers of a pretrained model (`RetrofitOptions`): In-Place TTT or
        NPT MLPs in place of SwiGLU ones, a gated branch after the mixer. The layer scan then
        repeats the shortest period after which the retrofitted layers repeat too (`period`):
        the pattern's own when they follow it (e.g. every 4th layer of a 1-block pattern
        gives 4 blocks per scan step), all `num_layers` blocks in one step when they do not.

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
    attention: AttentionOptions = AttentionOptions()
    ttt: TTTOptions = TTTOptions()
    lact: LaCTOptions = LaCTOptions()
    inplace: InPlaceOptions = InPlaceOptions()
    npt: NPTOptions = NPTOptions()
    retrofit: RetrofitOptions = RetrofitOptions()

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
        self._check_retrofit()

    def _check_retrofit(self):
        r, n = self.retrofit, self.num_layers
        check_choice("ModelConfig.retrofit.branch", r.branch, BRANCHES)
        for field in ("inplace_layers", "npt_layers", "branch_layers"):
            layers = getattr(r, field)
            if (
                not isinstance(layers, tuple)
                or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
                or len(set(layers)) != len(layers)
                or any(not 0 <= i < n for i in layers)
            ):
                raise ValueError(
                    f"ModelConfig.retrofit.{field} must be distinct layer indices in [0, {n}), "
                    f"got {layers!r}"
                )
        both = sorted(set(r.inplace_layers) & set(r.npt_layers))
        if both:
            raise ValueError(
                f"ModelConfig.retrofit: layers {both} are in both inplace_layers and npt_layers "
                "(each replaces the layer's MLP)"
            )
        base = self._pattern_blocks
        for field in ("inplace_layers", "npt_layers"):
            for i in getattr(r, field):
                if base[i][1] != "swiglu":
                    raise ValueError(
                        f"ModelConfig.retrofit.{field}: layer {i}'s MLP is {base[i][1]!r}; a "
                        "retrofit replaces a (pretrained) 'swiglu' MLP"
                    )

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
    def _pattern_blocks(self) -> tuple[tuple[str, str], ...]:
        period = tuple(parse_block(s) for s in self.pattern)
        return period * (self.num_layers // len(period))

    @property
    def blocks(self) -> tuple[tuple[str, str], ...]:
        """`(mixer, mlp)` of every layer, in order (the retrofit's MLPs in place)."""
        mlps = dict.fromkeys(self.retrofit.inplace_layers, "inplace_ttt")
        mlps.update(dict.fromkeys(self.retrofit.npt_layers, "npt"))
        return tuple((mx, mlps.get(i, mlp)) for i, (mx, mlp) in enumerate(self._pattern_blocks))

    @property
    def branches(self) -> tuple[str | None, ...]:
        """The gated branch's mixer family of every layer (None: no branch)."""
        branch = set(self.retrofit.branch_layers)
        return tuple(self.retrofit.branch if i in branch else None for i in range(self.num_layers))

    @property
    def parts(self) -> tuple[tuple[str, ...], ...]:
        """The family names in every layer's block: `(mixer, mlp)` or `(mixer, mlp, branch)`."""
        pairs = zip(self.blocks, self.branches, strict=True)
        return tuple(blk if b is None else (*blk, b) for blk, b in pairs)

    @property
    def period(self) -> int:
        """Blocks per step of the layer scan: `len(pattern)`, or with a retrofit the shortest
        multiple of it that divides `num_layers` and after which every layer's parts repeat."""
        base, n = len(self.pattern), self.num_layers
        if not self.retrofit.active:
            return base
        parts = self.parts
        return next(
            p
            for p in range(base, n + 1, base)
            if n % p == 0 and all(parts[i] == parts[i % p] for i in range(n))
        )

    @property
    def repeats(self) -> int:
        """How many times the scan repeats its period (`period`)."""
        return self.num_layers // self.period


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
OPTIONS = {
    "attention": AttentionOptions,
    "ttt": TTTOptions,
    "lact": LaCTOptions,
    "inplace": InPlaceOptions,
    "npt": NPTOptions,
    "retrofit": RetrofitOptions,
}

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
    equal the values that format passed to the layers). A run saved before retrofits or the
    attention options existed had none: a dict without the `retrofit` or `attention` section
    gets the default one.
    """
    # Sections added after a run was saved (`attention`, `retrofit`): their defaults, which is
    # what such a run used.
    for name in ("attention", "retrofit"):
        if name not in model:
            model = {**model, name: json.loads(json.dumps(dataclasses.asdict(OPTIONS[name]())))}
    if not any(flat in model for flat in FLAT_FIELDS):
        return model
    try:
        used = {FAMILIES[n].options for spec in model["pattern"] for n in parse_block(spec)}
    except (KeyError, TypeError, ValueError):
        used = set(OPTIONS)
    model = dict(model)
    # As JSON (tuples as lists), as the config.json of a current run holds them.
    sections = {
        name: json.loads(json.dumps(dataclasses.asdict(kind()))) for name, kind in OPTIONS.items()
    }
    for flat, targets in FLAT_FIELDS.items():
        if flat not in model:
            continue
        value = model.pop(flat)
        for target in targets:
            section, field = target.split(".")
            if section in used:
                sections[section][field] = value
    return {**model, **sections}
