"""A single layer as a memory workload: any registered layer config, trained on `x: [B, T, d]`.

Layer families are registered by config type (`register_layer`), so a new layer joins the
report and the planner by describing how to build and call it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers import (
    NPTMLP,
    InPlaceMLP,
    InPlaceMLPConfig,
    LaCTConfig,
    LaCTLayer,
    MixedPrecision,
    NPTBlock,
    NPTBlockConfig,
    NPTMLPConfig,
    TTTConfig,
    TTTLayer,
)
from ttt_jax.memory.analysis import tree_bytes
from ttt_jax.memory.workload import Program, Remat, Workload, abstract_split, random_like


def _config_d_model(config) -> int:
    return config.d_model


def _config_precision(config) -> MixedPrecision | None:
    return config.precision


def _one_token(config) -> int:
    return 1


def _no_knobs(config) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class LayerFamily:
    """How the memory tools build and call one kind of layer.

    Attributes:
      name: short name used on the command line.
      build: `(config, precision, rngs) -> module`.
      apply: `(module, x) -> (y, aux_loss)`; x is `[B, T, d_model]` in the compute dtype.
      d_model: `config -> width of x` (default: `config.d_model`).
      precision: `config -> MixedPrecision` when the config carries it, else None (then the
        workload's own `precision` is used; default: `config.precision`).
      chunk: `config -> tokens per fast-weight update` (sequence lengths are multiples of it;
        default 1, a layer without chunks).
      scan_knobs: `config -> bool`, whether checkpoint_group / remat_policy change anything
        (default: never).
    """

    name: str
    build: Callable[[Any, MixedPrecision, nnx.Rngs], nnx.Module]
    apply: Callable[[nnx.Module, jax.Array], tuple[jax.Array, jax.Array]]
    d_model: Callable[[Any], int] = _config_d_model
    precision: Callable[[Any], MixedPrecision | None] = _config_precision
    chunk: Callable[[Any], int] = _one_token
    scan_knobs: Callable[[Any], bool] = _no_knobs


LAYER_FAMILIES: dict[type, LayerFamily] = {}


def register_layer(config_type: type, family: LayerFamily) -> None:
    """Makes layers configured by `config_type` known to the report and the planner."""
    LAYER_FAMILIES[config_type] = family


def _no_aux(y):
    return y, jnp.zeros((), jnp.float32)


def _from_config(module_type: type) -> Callable:
    """`build` of a layer whose config carries everything (precision included)."""
    return lambda config, precision, rngs: module_type(config, rngs=rngs)


def _chunked_mixer(name: str, module_type: type, chunk_field: str) -> LayerFamily:
    """A sequence mixer `[B, T, d] -> [B, T, d]` with the scan's remat knobs, whose fast weights
    update every `config.<chunk_field>` tokens."""
    return LayerFamily(
        name=name,
        build=_from_config(module_type),
        apply=lambda m, x: _no_aux(m(x)),
        chunk=operator.attrgetter(chunk_field),
        scan_knobs=lambda c: True,
    )


register_layer(TTTConfig, _chunked_mixer("ttt", TTTLayer, "mini_batch_size"))
register_layer(
    InPlaceMLPConfig,
    LayerFamily(
        name="inplace",
        build=_from_config(InPlaceMLP),
        # The layer's input doubles as the targets' source X0 (the embeddings in a model).
        apply=lambda m, x: _no_aux(m(x, x)),
        chunk=lambda c: c.chunk_size,
        scan_knobs=lambda c: c.ttt and c.backward == "autodiff" and c.prefix == "sequential",
    ),
)
register_layer(
    NPTMLPConfig,
    LayerFamily(
        name="npt",
        build=_from_config(NPTMLP),
        # The layer's input doubles as the modulating signal (the attention output in a block).
        apply=lambda m, x: m(x, None if m.config.modulation == "none" else x),
    ),
)
register_layer(
    NPTBlockConfig,
    LayerFamily(name="npt_block", build=_from_config(NPTBlock), apply=lambda m, x: m(x)),
)
register_layer(LaCTConfig, _chunked_mixer("lact", LaCTLayer, "chunk_size"))

# Scan remat groups the planner tries, preferred first: G=4 is the fastest TTT setting measured
# (faster than no remat: benchmarks/RESULTS.md), G=16 keeps 4x fewer carried states.
GROUP_CANDIDATES = (4, 16)


@dataclasses.dataclass(frozen=True)
class LayerWorkload(Workload):
    """One layer (any registered config type), trained on `x: [B, T, d_model]`.

    The loss is `mean(y^2)` (plus the layer's auxiliary loss), differentiated w.r.t. the
    parameters and x, so the backward is the one the layer has inside a model.

    Attributes:
      config: the layer config (`TTTConfig`, `LaCTConfig`, `InPlaceMLPConfig`, `NPTMLPConfig`, ...).
      precision: for configs of registered layers that do not carry their own.
    """

    config: Any
    precision: MixedPrecision | None = None

    def __post_init__(self):
        family = LAYER_FAMILIES.get(type(self.config))
        if family is None:
            known = ", ".join(t.__name__ for t in LAYER_FAMILIES)
            raise ValueError(f"config {type(self.config).__name__} is not a layer config: {known}")
        own = family.precision(self.config)
        if own is not None and self.precision is not None and own != self.precision:
            raise ValueError(
                f"precision={self.precision} conflicts with {type(self.config).__name__}."
                f"precision={own}; set it in the config"
            )

    @property
    def family(self) -> LayerFamily:
        return LAYER_FAMILIES[type(self.config)]

    @property
    def mixed_precision(self) -> MixedPrecision:
        return self.family.precision(self.config) or self.precision or MixedPrecision()

    @property
    def remat(self) -> Remat:
        c = self.config
        return Remat(getattr(c, "checkpoint_group", None), getattr(c, "remat_policy", None))

    def with_remat(self, remat: Remat) -> LayerWorkload:
        if remat.block_remat is not None:
            raise ValueError("block_remat applies to models; a single layer has no block")
        if remat == self.remat:
            return self
        if not self.family.scan_knobs(self.config):
            raise ValueError(f"{type(self.config).__name__} has no remat knobs to set ({remat})")
        config = dataclasses.replace(
            self.config,
            checkpoint_group=remat.checkpoint_group,
            remat_policy=remat.remat_policy,
        )
        return dataclasses.replace(self, config=config)

    def remat_candidates(self) -> list[Remat]:
        if not self.family.scan_knobs(self.config):
            return [self.remat]
        return [Remat(group) for group in GROUP_CANDIDATES]

    @property
    def fit_program(self) -> str:
        return "fwd_bwd"

    @property
    def seq_multiple(self) -> int:
        return self.family.chunk(self.config)

    def describe(self) -> str:
        c = self.config
        scan_knobs = self.family.scan_knobs(c)
        fields = []
        for f in dataclasses.fields(c):
            if scan_knobs and f.name in ("checkpoint_group", "remat_policy"):
                continue  # spelled out below, defaults included
            value = getattr(c, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                if isinstance(value, MixedPrecision):
                    value = jnp.dtype(value.compute_dtype).name
                fields.append(f"{f.name}={value}")
        precision = jnp.dtype(self.mixed_precision.compute_dtype).name
        line = f"{type(c).__name__}({', '.join(fields)}) compute={precision}"
        if scan_knobs:
            line += " " + self.remat.label(block=False)
        return line

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        return self.family.build(self.config, self.mixed_precision, rngs)

    def state_bytes(self) -> int:
        _, params, _ = abstract_split(lambda: self._build(nnx.Rngs(0)))
        return tree_bytes(params)

    def programs(self, batch: int, seq: int) -> dict[str, Program]:
        family = self.family
        graphdef, params, rest = abstract_split(lambda: self._build(nnx.Rngs(0)))
        x = jax.ShapeDtypeStruct(
            (batch, seq, family.d_model(self.config)), self.mixed_precision.compute_dtype
        )

        def forward(params, rest, x):
            return family.apply(nnx.merge(graphdef, params, rest), x)[0]

        def loss(params, rest, x):
            y, aux = family.apply(nnx.merge(graphdef, params, rest), x)
            return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux

        def fwd_bwd(params, rest, x):
            return jax.value_and_grad(loss, argnums=(0, 2))(params, rest, x)

        def real_args():
            _, p, r = nnx.split(self._build(nnx.Rngs(0)), nnx.Param, ...)
            return p, r, random_like(x)

        args = (params, rest, x)
        return {
            "forward": Program(forward, args, real_args),
            "fwd_bwd": Program(fwd_bwd, args, real_args),
        }
