"""Memory report of a layer: forward and forward+backward, from the compiler and (on a GPU)
from the allocator. `python -m ttt_jax.memory report --help` is the command-line face."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers import MixedPrecision, TTTConfig, TTTLayer
from ttt_jax.memory.analysis import CompiledMemory, MeasuredMemory, compiled_memory, measured_memory

LAYERS = ("ttt_linear", "ttt_mlp")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer and the input it is measured on.

    Attributes:
      layer: one of `LAYERS`.
      seq: sequence length T.
      batch: batch size B.
      d_model: model width (the 125M shape is 768 with 12 heads).
      heads: number of heads.
      mini_batch: TTT mini-batch size C.
      checkpoint_group: inner-scan remat group (None: no remat).
      remat_policy: policy name inside a group.
      precision: "fp32" or "bf16" (fp32 params and state, bf16 compute).
    """

    layer: Literal["ttt_linear", "ttt_mlp"] = "ttt_linear"
    seq: int = 2048
    batch: int = 1
    d_model: int = 768
    heads: int = 12
    mini_batch: int = 16
    checkpoint_group: int | None = None
    remat_policy: str | None = None
    precision: Literal["fp32", "bf16"] = "bf16"

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer={self.layer!r} is not one of {', '.join(LAYERS)}")
        for name in ("seq", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    def build(self, rngs: nnx.Rngs) -> TTTLayer:
        config = TTTConfig(
            d_model=self.d_model,
            num_heads=self.heads,
            inner="linear" if self.layer == "ttt_linear" else "mlp",
            mini_batch_size=self.mini_batch,
            checkpoint_group=self.checkpoint_group,
            remat_policy=self.remat_policy,
            precision=MixedPrecision.named(self.precision),
        )
        return TTTLayer(config, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Report:
    spec: LayerSpec
    forward: CompiledMemory
    fwd_bwd: CompiledMemory
    measured_forward: MeasuredMemory | None = None
    measured_fwd_bwd: MeasuredMemory | None = None

    def to_json(self) -> str:
        def enc(x):
            if dataclasses.is_dataclass(x):
                d = dataclasses.asdict(x)
                for prop in ("peak", "efficiency"):
                    if hasattr(type(x), prop):
                        d[prop] = getattr(x, prop)
                return d
            return x

        return json.dumps(
            {
                k: enc(getattr(self, k))
                for k in ("spec", "forward", "fwd_bwd", "measured_forward", "measured_fwd_bwd")
            },
            default=str,
            indent=2,
        )

    def table(self) -> str:
        rows = [("", "forward", "fwd+bwd")]
        for field in ("argument", "output", "temp", "peak"):
            rows.append(
                (
                    f"{field} (compiled)",
                    gib(getattr(self.forward, field)),
                    gib(getattr(self.fwd_bwd, field)),
                )
            )
        if self.measured_fwd_bwd is not None:
            mf, mb = self.measured_forward, self.measured_fwd_bwd
            rows += [
                ("peak_bytes_in_use", gib(mf.peak), gib(mb.peak)),
                ("steady bytes_in_use", gib(mf.steady), gib(mb.steady)),
                ("efficiency steady/peak", f"{mf.efficiency:.2f}", f"{mb.efficiency:.2f}"),
            ]
        width = max(len(r[0]) for r in rows)
        s = self.spec
        head = (
            f"{s.layer}  B={s.batch} T={s.seq} d_model={s.d_model} heads={s.heads} "
            f"C={s.mini_batch} checkpoint_group={s.checkpoint_group} "
            f"remat_policy={s.remat_policy} precision={s.precision}  "
            f"[{jax.default_backend()}, jax {jax.__version__}]"
        )
        lines = [head] + [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}" for r in rows]
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def layer_report(spec: LayerSpec, measure: bool = False) -> Report:
    """Compiles the layer's forward and forward+backward on abstract shapes and reports their
    memory; with `measure=True` on a GPU also runs them and reads the allocator."""
    abstract = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    compute = MixedPrecision.named(spec.precision).compute_dtype
    x = jax.ShapeDtypeStruct((spec.batch, spec.seq, spec.d_model), compute)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x)

    def fwd_bwd(params, x):
        def loss(params, x):
            return jnp.mean(forward(params, x).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    report = Report(spec, compiled_memory(forward, params, x), compiled_memory(fwd_bwd, params, x))
    if measure:
        real_params = nnx.state(spec.build(nnx.Rngs(0)), nnx.Param)
        real_x = jax.random.normal(jax.random.PRNGKey(0), x.shape, x.dtype)
        report = dataclasses.replace(
            report,
            measured_forward=measured_memory(forward, real_params, real_x),
            measured_fwd_bwd=measured_memory(fwd_bwd, real_params, real_x),
        )
    return report
