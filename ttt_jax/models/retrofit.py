"""TTT retrofitted into a pretrained model: each recipe starts as the pretrained function.

A retrofit is a model option (`ModelConfig.retrofit`, `RetrofitOptions`) naming the layers each
recipe applies to; `retrofit_params` takes the parameters of the pretrained model (the same
config without the retrofit, `base_config`: e.g. a Hugging Face checkpoint imported by
`ttt_jax.convert.load_pretrained`) and returns the retrofitted model's, the pretrained weights
placed and the new ones initialised so that the logits at step 0 are the pretrained model's:

- **In-Place TTT MLP** (`inplace_layers`, SPEC 3.3): the SwiGLU's `W_gate`, `W_up` become the
  In-Place MLP's `w_gate`, `w_up` and its `W_down: [F, d]` the slow weight `w_down: [d, F]`
  (transposed: the In-Place MLP applies `Z W_down^T`). `ttt_conv` and `ttt_proj` keep the
  layer's official init, a zero conv and a diagonal `N(0, 0.02^2)` target projection: the
  targets `V = conv(X0) W_target` are 0, so every chunk's update `V^T Z` is 0 and the output is
  `Z W_down^T`, the SwiGLU's. At step 0 `ttt_conv` gets gradient (through the nonzero
  `W_target`) and `ttt_proj` none (`conv(X0) = 0`); after the first update both do.
- **NPT MLP** (`npt_layers`, SPEC 3.4): `W_gate`, `W_up`, `W_down` copied; the delta's output
  factor is zero (`B` for `low_rank`, `W_w` for `rank_k`), as LoRA zeroes its up projection, so
  `Delta W_t = A diag(m_t) B = 0`. That factor gets gradient at step 0 (`A`, `A_m` keep their
  random init, so `(h A) * m` is not 0); the others from the first update on.
- **Gated branch** (`branch_layers`, `branch`): the block's mixer is kept and a TTT-Linear,
  TTT-MLP or LaCT layer reads the same normalised input, `m = mixer(x) + g * branch(x)`, with a
  per-channel gate `g: [d]` at 0 (`ttt_jax.models.block`). Per channel rather than one scalar:
  it costs d numbers a layer and lets the model open the channels where the branch helps
  without opening all the others (a LayerScale-style gate); the branch's output projection
  could not do that alone, since at g = 0 it gets no gradient. With g = 0 exactly the branch's
  parameters get no gradient at step 0 and the gate does, `dL/dg_c = sum_t b_c(t) dL/dm_c(t)`:
  the first update moves the gate, and from then on the branch trains through it.

Layers and the layer scan: the LM scans over repeats of one period of blocks (`BlockGroup`),
and a retrofit on chosen layers breaks the pattern's period. Of the ways to keep the scan, the
least invasive is to lengthen the period and change nothing else: `ModelConfig.period` is the
shortest multiple of the pattern's length that divides `num_layers` and after which every
layer's parts repeat (retrofitting every 4th layer of a 1-block pattern gives 4 blocks per scan
step; layers that follow no period give one step of all `num_layers` blocks, a longer compile
and the same run time). Parameters stay stacked on the leading `layers` axis of their period
position, so layer `l` of a model with period `P` is index `l // P` of position `l % P`.

`new_params(config)` tells which parameters the retrofit adds or re-initialises (True) and
which come from the pretrained model (False): what `python -m train --only-new-params` trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.models.config import ModelConfig
from ttt_jax.models.lm import LM
from ttt_jax.models.options import RetrofitOptions

# MLP parameter names in the retrofitted family <- (name in the pretrained SwiGLU, transposed).
MLP_SOURCES: dict[str, dict[str, tuple[str, bool]]] = {
    "inplace_ttt": {
        "w_gate": ("W_gate", False),
        "w_up": ("W_up", False),
        "w_down": ("W_down", True),
    },
    "npt": {"W_gate": ("W_gate", False), "W_up": ("W_up", False), "W_down": ("W_down", False)},
}

# Per retrofitted MLP family: the parameters set to zero so that the layer starts as the SwiGLU.
ZEROED = {"npt": ("B", "W_w")}

Path = tuple


def base_config(config: ModelConfig) -> ModelConfig:
    """The pretrained model a retrofitted `config` starts from: the same config, no retrofit."""
    return dataclasses.replace(config, retrofit=RetrofitOptions())


def _flatten(tree, prefix: Path = ()) -> dict[Path, object]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, k)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[Path, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _fmt(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _abstract_params(config: ModelConfig) -> dict:
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _sources(config: ModelConfig) -> dict[Path, tuple[Path, bool] | None]:
    """Every parameter of the retrofitted model -> `(its source in the pretrained model's params,
    transposed)`, or None for a parameter the retrofit initialises (module docstring).

    A block parameter's source path is that of the same layers in the pretrained layout; the
    caller slices the layers (`_pretrained_leaf`)."""
    base = base_config(config).blocks
    out: dict[Path, tuple[Path, bool] | None] = {}
    for path in _flatten(_abstract_params(config)):
        if path[0] != "groups":
            out[path] = (path, False)
            continue
        j, part, rest = path[2], path[3], path[4:]
        mlp = config.blocks[j][1]
        if part in ("mixer_norm", "mlp_norm", "mixer") or (part == "mlp" and mlp == base[j][1]):
            out[path] = ((part, *rest), False)
        elif part == "mlp" and rest[0] in MLP_SOURCES.get(mlp, {}):
            name, transpose = MLP_SOURCES[mlp][rest[0]]
            out[path] = (("mlp", name), transpose)
        else:  # the retrofitted MLP's own parameters, the branch and its gate
            out[path] = None
    return out


def new_params(config: ModelConfig) -> dict:
    """The params tree of `config`'s LM with True for every parameter its retrofit adds or
    re-initialises and False for those taken from the pretrained model (`base_config`)."""
    return _unflatten({path: src is None for path, src in _sources(config).items()})


def _pretrained_leaf(flat: dict, config: ModelConfig, path: Path, src: Path) -> jax.Array:
    """The pretrained layers of the retrofitted model's block parameter at `path` (or a
    top-level parameter), stacked as the retrofitted model stacks them (module docstring)."""
    if path[0] != "groups":
        return flat[src]
    base_period = base_config(config).period
    j, step = path[2], config.period // base_period
    # Position j of period P' holds layers j + r P'; P' is a multiple of the base period P,
    # so they all sit at position j % P of the pretrained stack, every (P' / P)-th from j // P.
    return flat[("groups", "blocks", j % base_period, *src)][j // base_period :: step]


def check_pretrained(params: dict, config: ModelConfig) -> None:
    """ValueError naming the first parameter of `params` that is missing, extra or of another
    shape than in `base_config(config)`'s LM."""
    want = _flatten(_abstract_params(base_config(config)))
    got = _flatten(params)
    for path, x in want.items():
        if path not in got:
            raise ValueError(
                f"retrofit: the pretrained params lack {_fmt(path)} (shape {tuple(x.shape)}) of "
                "the model without the retrofit"
            )
        if tuple(jnp.shape(got[path])) != tuple(x.shape):
            raise ValueError(
                f"retrofit: the pretrained {_fmt(path)} has shape {tuple(jnp.shape(got[path]))}, "
                f"the model without the retrofit needs {tuple(x.shape)}"
            )
    extra = sorted(_fmt(p) for p in got if p not in want)
    if extra:
        raise ValueError(
            f"retrofit: the pretrained params hold {extra[0]}, which the model without the "
            f"retrofit does not have ({len(extra)} such)"
        )


def retrofit_params(
    params: dict,
    config: ModelConfig,
    *,
    seed: int = 0,
    fresh: Callable[[], dict] | None = None,
) -> dict:
    """The params of the retrofitted `config`'s LM from those of the pretrained model.

    Args:
      params: the pure params dict of `base_config(config)`'s LM (`nnx.to_pure_dict` of its
        `nnx.Param` state; block parameters stacked per period position).
      config: the retrofitted model.
      seed: seeds the parameters the retrofit adds (the model's own init, `nnx.Rngs(seed)`).
      fresh: `() -> params` of a freshly initialised `config` LM, instead of building one (the
        trainer passes its own, traced under `jax.jit` with its shardings).

    Returns:
      The pure params dict of `config`'s LM: pretrained weights placed (cast to the model's
      param dtype), new ones initialised as the module docstring says. Jittable.

    Raises:
      ValueError: `params` do not fit the model without the retrofit (naming the parameter).
    """
    check_pretrained(params, config)
    if fresh is None:
        # Under jit: building an LM eagerly dispatches every initializer op by op (seconds).
        new = jax.jit(
            lambda: nnx.to_pure_dict(nnx.state(LM(config, rngs=nnx.Rngs(seed)), nnx.Param))
        )()
    else:
        new = fresh()
    flat_new, flat_old = _flatten(new), _flatten(params)
    zeroed = {
        (*path[:4], name)
        for path in flat_new
        if path[0] == "groups" and path[3] == "mlp"
        for name in ZEROED.get(config.blocks[path[2]][1], ())
    }
    out = {}
    for path, src in _sources(config).items():
        x = flat_new[path]
        if src is None:
            out[path] = jnp.zeros_like(x) if path in zeroed else x
            continue
        old_path, transpose = src
        value = _pretrained_leaf(flat_old, config, path, old_path)
        if transpose:
            value = jnp.swapaxes(value, -1, -2)
        out[path] = jnp.asarray(value, x.dtype)
    return _unflatten(out)


__all__ = ["base_config", "check_pretrained", "new_params", "retrofit_params"]
