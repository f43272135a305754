"""NPT MLP: a SwiGLU MLP whose gate projection is modulated per token (SPEC 3.4).

    gate_t = x_t (W_gate + Delta W_t),   y_t = (silu(gate_t) * (x_t W_up)) W_down

`Delta W_t` is generated from a modulating signal `a_t` (by default the attention output of the
same block, passed in by the caller) and is never formed (`ttt_jax.ops.npt`):

- `modulation="low_rank"`: `Delta W_t = A diag(m_t) B` with `m_t = s * tanh(a_t A_m)`, rank r.
- `modulation="rank_k"`: a generator `r_t = a_t W_gen` (`[r]`), `u_t = r_t W_u` (`[k, d]`),
  `w_t = r_t W_w` (`[k, F]`), and `Delta W_t = sum_k u_{t,k}^T w_{t,k}`. By default
  (`rank_k_form="factored"`) not even u and w are formed: `h_t . u_{t,k}` and the sum over k
  regroup through `[r, k]` per-token numbers (`ttt_jax.ops.npt_generated_rank_k_linear`).
- `modulation="none"`: the plain SwiGLU MLP (`ttt_jax.layers.mlp`, the same parameters and
  computation), the baseline that memory tests and benchmarks compare with.

Regulariser (optional, `reg_lambda > 0`), returned as the layer's auxiliary loss, in fp32:

    aux = reg_lambda * mean_{b, s} [ sum_{k, i} u_{b,s,k,i}^2 + sum_{k, j} w_{b,s,k,j}^2 ]

i.e. the squared norms are summed over the k vectors and their features and averaged over the
B * S tokens (not over features, so it does not shrink as d or F grow). The low-rank mode is
the rank-k form with `k = r`, `u_{t,i} = m_{t,i} A[:, i]` and `w_{t,i} = B[i, :]`, so there
`aux = reg_lambda * (mean_t sum_i m_{t,i}^2 ||A[:, i]||^2 + ||B||_F^2)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.common import FP32, MixedPrecision, normal, param
from ttt_jax.layers.mlp import swiglu_down, swiglu_params
from ttt_jax.ops.core import (
    check_choice,
    check_float,
    check_layer_input,
    check_positive_int,
    check_shapes,
    matmul,
)
from ttt_jax.ops.npt import (
    npt_generated_rank_k_linear,
    npt_modulated_linear,
    npt_rank_k_linear,
)

MODULATIONS = ("low_rank", "rank_k", "none")
RANK_K_FORMS = ("factored", "vectors")


@dataclasses.dataclass(frozen=True)
class NPTMLPConfig:
    """Shape, modulation and precision of an NPT MLP.

    Attributes:
      d_model: d, width of the MLP input and output.
      d_ff: F, hidden width of the gated MLP.
      d_mod: width of the modulating signal `a`; None means d_model (the attention output).
      modulation: `low_rank`, `rank_k` or `none` (module docstring).
      rank: r, rank of `A diag(m_t) B` (low_rank) or width of the generator bottleneck r_t
        (rank_k).
      k: number of per-token vector pairs `(u_{t,k}, w_{t,k})` (rank_k only).
      rank_k_form: how rank_k is computed (same math, same parameters): `factored`
        (`npt_generated_rank_k_linear`, never forms u or w; `[B, S, r, k]` activations) or
        `vectors` (forms u `[B, S, k, d]` and w `[B, S, k, F]` and calls `npt_rank_k_linear`).
      mod_scale: s in `m_t = s * tanh(a_t A_m)` (low_rank only).
      reg_lambda: weight of the auxiliary regulariser (0 turns it off).
      precision: the mixed-precision policy.
    """

    d_model: int
    d_ff: int
    d_mod: int | None = None
    modulation: str = "low_rank"
    rank: int = 16
    k: int = 1
    rank_k_form: str = "factored"
    mod_scale: float = 0.1
    reg_lambda: float = 0.0
    precision: MixedPrecision = FP32

    def __post_init__(self):
        for field in ("d_model", "d_ff", "rank", "k"):
            check_positive_int(f"NPTMLPConfig.{field}", getattr(self, field))
        if self.d_mod is not None:
            check_positive_int("NPTMLPConfig.d_mod", self.d_mod)
        check_choice("NPTMLPConfig.modulation", self.modulation, MODULATIONS)
        check_choice("NPTMLPConfig.rank_k_form", self.rank_k_form, RANK_K_FORMS)
        for field in ("mod_scale", "reg_lambda"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"NPTMLPConfig.{field} must be a finite number >= 0, got {value!r}"
                )
        if not isinstance(self.precision, MixedPrecision):
            raise ValueError(
                f"NPTMLPConfig.precision must be a MixedPrecision, got {self.precision!r}"
            )

    @property
    def mod_width(self) -> int:
        return self.d_model if self.d_mod is None else self.d_mod


def _generated_sq_norm(g: jax.Array, gen: jax.Array) -> jax.Array:
    """`sum_{b,s,k} |g_t gen[:, k]|^2` for `g: [B, S, r]`, `gen: [r, k, n]`, never forming
    `g_t gen[:, k]`: it is `g_t G[k] g_t^T` with the `[k, r, r]` Gram matrices of `gen`."""
    gen = gen.astype(jnp.float32)
    gram = matmul("ikn,jkn->kij", gen, gen, jnp.float32)
    g = g.astype(jnp.float32)
    return jnp.sum(matmul("bsi,kij->bskj", g, gram, jnp.float32) * g[:, :, None, :])


class NPTMLP(nnx.Module):
    """SwiGLU MLP with a per-token modulated gate projection.

    Parameters (logical axes): `W_gate, W_up: [d, F]` (embed, mlp), `W_down: [F, d]`
    (mlp, embed); low_rank adds `A: [d, r]` (embed, rank), `B: [r, F]` (rank, mlp),
    `A_m: [d_mod, r]` (embed, rank); rank_k adds `W_gen: [d_mod, r]` (embed, rank),
    `W_u: [r, k, d]` (rank, -, embed), `W_w: [r, k, F]` (rank, -, mlp). The k axis is left
    unnamed (replicated): it is small and not worth a mesh axis. A projection is `x @ W`.

    Init: dense weights `N(0, 1/fan_in)`. Low rank as in the source design: `A` and `A_m`
    `N(0, (0.01/sqrt(d))^2)`, `B` `N(0, (0.01/sqrt(r))^2)`. Rank k: `W_gen` `N(0, 1/d_mod)`
    so r_t is O(1), then `W_u` `N(0, (0.01/sqrt(r d))^2)` and `W_w` `N(0, (0.01/sqrt(r k))^2)`
    so that each `u_{t,k}` has the per-entry scale of a column of A and the sum over k of
    `w_{t,k}` that of a row of B: the layer starts close to the plain MLP and still gets
    gradient.
    """

    def __init__(self, config: NPTMLPConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, pd = config, config.precision.param_dtype
        d, f, r, dm = c.d_model, c.d_ff, c.rank, c.mod_width
        self.W_gate, self.W_up, self.W_down = swiglu_params(rngs, d, f, pd)
        if c.modulation == "low_rank":
            self.A = param(rngs, normal(0.01 / math.sqrt(d)), (d, r), ("embed", "rank"), pd)
            self.B = param(rngs, normal(0.01 / math.sqrt(r)), (r, f), ("rank", "mlp"), pd)
            self.A_m = param(rngs, normal(0.01 / math.sqrt(d)), (dm, r), ("embed", "rank"), pd)
        elif c.modulation == "rank_k":
            k = c.k
            self.W_gen = param(rngs, normal(dm**-0.5), (dm, r), ("embed", "rank"), pd)
            self.W_u = param(
                rngs, normal(0.01 / math.sqrt(r * d)), (r, k, d), ("rank", None, "embed"), pd
            )
            self.W_w = param(
                rngs, normal(0.01 / math.sqrt(r * k)), (r, k, f), ("rank", None, "mlp"), pd
            )

    def __call__(self, x: jax.Array, a: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Applies the MLP.

        Args:
          x: `[B, S, d]` MLP input (already normalised by the block).
          a: `[B, S, d_mod]` modulating signal (the block passes its attention output).
            Required unless `modulation="none"`, where it is ignored.

        Returns:
          `y: [B, S, d]` in the compute dtype, and the auxiliary loss, an fp32 scalar
          (0 when `reg_lambda == 0` or `modulation="none"`).
        """
        c, cd = self.config, self.config.precision.compute_dtype
        check_shapes([("x", x, ("B", "S", c.d_model))])
        check_layer_input(x, c.d_model)
        if c.modulation != "none":
            if a is None:
                raise ValueError(
                    f"a (the modulating signal) is required for modulation={c.modulation!r}"
                )
            check_shapes([("x", x, ("B", "S", c.d_model)), ("a", a, ("B", "S", c.mod_width))])
            check_float(a=a)
        x = x.astype(cd)
        aux = jnp.zeros((), jnp.float32)
        if c.modulation == "none":
            gate = matmul("bsd,df->bsf", x, self.W_gate[...], cd).astype(cd)
        elif c.modulation == "low_rank":
            # m is [B, S, r]: fp32 costs nothing and keeps tanh's small outputs exact.
            m = c.mod_scale * jnp.tanh(matmul("bsi,ir->bsr", a, self.A_m[...], cd))
            gate = npt_modulated_linear(x, m, W=self.W_gate[...], A=self.A[...], B=self.B[...])
            if c.reg_lambda:
                a_sq = jnp.sum(jnp.square(self.A[...].astype(jnp.float32)), axis=0)[None, None]
                b_sq = jnp.sum(jnp.square(self.B[...].astype(jnp.float32)))
                aux = c.reg_lambda * (jnp.mean(jnp.sum(m * m * a_sq, -1)) + b_sq)
        else:
            g = matmul("bsi,ir->bsr", a, self.W_gen[...], cd)
            if c.rank_k_form == "factored":
                gate = npt_generated_rank_k_linear(
                    x, g, W=self.W_gate[...], W_u=self.W_u[...], W_w=self.W_w[...]
                )
                if c.reg_lambda:
                    sq = _generated_sq_norm(g, self.W_u[...]) + _generated_sq_norm(g, self.W_w[...])
                    aux = c.reg_lambda * sq / (x.shape[0] * x.shape[1])
            else:
                # u and w are activations k times as large as x and gate: stored in the
                # compute dtype, like every activation between matmuls.
                u = matmul("bsr,rkd->bskd", g, self.W_u[...], cd).astype(cd)
                w = matmul("bsr,rkf->bskf", g, self.W_w[...], cd).astype(cd)
                if c.reg_lambda:
                    sq = jnp.sum(jnp.square(u.astype(jnp.float32))) + jnp.sum(
                        jnp.square(w.astype(jnp.float32))
                    )
                    aux = c.reg_lambda * sq / (x.shape[0] * x.shape[1])
                gate = npt_rank_k_linear(x, u, w, W=self.W_gate[...])
        return swiglu_down(x, gate, self.W_up[...], self.W_down[...], cd), aux
