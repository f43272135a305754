"""Retrofits (`ttt_jax.models.retrofit`): every recipe gives the pretrained model's logits at
initialisation (fp32, <= 1e-5 relative, packed documents included) and trains: the step-0
gradients are where the init says (the gate's and the zero factor's, not what they hide), one
update later every new parameter has gradient, and a few updates lower the loss. The layer
indices choose the scan period; bad indices name the field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.models import LM, InPlaceOptions, LaCTOptions, ModelConfig
from ttt_jax.models.config import migrate_flat_fields
from ttt_jax.models.options import RetrofitOptions
from ttt_jax.models.retrofit import base_config, new_params, retrofit_params
from ttt_jax.testing import micro_model, rel_err

# "The pretrained model": attention/SwiGLU blocks, random init (the recipes do not depend on
# where the weights came from).
PRETRAINED = micro_model(
    pattern=("attention/swiglu",),
    inplace=InPlaceOptions(chunk_size=8),
    lact=LaCTOptions(chunk_size=8, window=8, rank=4),
)

# Per recipe: the retrofit, and the new parameters that get gradient at step 0 (the rest of
# the new ones get none until the first update).
RECIPES = {
    "inplace": (RetrofitOptions(inplace_layers=(1,)), {"ttt_conv"}),
    "npt": (RetrofitOptions(npt_layers=(0,)), {"B"}),
    "ttt_linear": (RetrofitOptions(branch_layers=(0, 1)), {"branch_gate"}),
    "ttt_mlp": (RetrofitOptions(branch_layers=(1,), branch="ttt_mlp"), {"branch_gate"}),
    "lact": (RetrofitOptions(branch_layers=(0,), branch="lact"), {"branch_gate"}),
}


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves(tree) -> dict[str, jax.Array]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _random_params(config: ModelConfig, seed: int) -> dict:
    """Random params of `config`'s LM without compiling its init: norms near 1, the rest
    `N(0, 0.15^2)` (about 1/sqrt(d) at d = 32)."""
    rng = np.random.default_rng(seed)
    abstract = _pure(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))))

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        norm = str(path[-1].key).endswith("norm")
        return jnp.asarray(1 + 0.1 * noise if norm else 0.15 * noise)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _tokens():
    # Rows repeating a random 8-token motif: learnable by any of the recipes.
    motif = jax.random.randint(jax.random.key(0), (2, 8), 0, PRETRAINED.vocab_size)
    return jnp.tile(motif, (1, 5))  # [2, 40]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_starts_as_the_pretrained_model_and_trains(recipe):
    retrofit, moving_at_0 = RECIPES[recipe]
    config = dataclasses.replace(PRETRAINED, retrofit=retrofit)
    base_graph = nnx.graphdef(nnx.eval_shape(lambda: LM(PRETRAINED, rngs=nnx.Rngs(0))))
    pretrained = _random_params(PRETRAINED, 1)
    params = retrofit_params(pretrained, config, seed=2)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))))

    @jax.jit
    def logits(base, p, tokens, segments):
        return nnx.merge(base_graph, base)(tokens, segments)[0], nnx.merge(graphdef, p)(
            tokens, segments
        )[0]

    tokens = _tokens()
    segments = jnp.concatenate([jnp.zeros((2, 19), jnp.int32), jnp.ones((2, 21), jnp.int32)], 1)
    for seg in (jnp.zeros_like(segments), segments):  # one document, then two packed
        want, got = logits(pretrained, params, tokens, seg)
        assert rel_err(got, want) <= 1e-5, recipe

    new = _leaves(new_params(config))
    assert {k for k, v in new.items() if v}, recipe  # the recipe adds parameters
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)
        return jnp.mean(nll) + aux

    @jax.jit
    def step(p, opt):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss, grads

    opt = tx.init(params)
    losses, grads = [], []
    for _ in range(6):
        params, opt, loss, g = step(params, opt)
        losses.append(float(loss))
        grads.append(_leaves(g))
    norms = [{k: float(jnp.linalg.norm(v)) for k, v in g.items() if new[k]} for g in grads[:2]]
    leaf = {k: k.rsplit("/", 1)[-1] for k in norms[0]}
    # Step 0: only the gate (or the zero factor, the zero-conv's conv) has gradient; exactly
    # zero for what it multiplies.
    assert {k for k, n in norms[0].items() if n > 0} == {
        k for k in norms[0] if leaf[k] in moving_at_0
    }, (recipe, norms[0])
    # One update later every new parameter has gradient.
    assert all(n > 0 for n in norms[1].values()), (recipe, norms[1])
    assert losses[-1] < losses[0] - 0.05, (recipe, losses)


def test_layer_indices_choose_the_scan_period_and_are_checked():
    def period(**kw):
        return dataclasses.replace(PRETRAINED, num_layers=8, retrofit=RetrofitOptions(**kw)).period

    assert PRETRAINED.period == 1 and PRETRAINED.repeats == 2
    assert period(branch_layers=(0, 4)) == 4  # every 4th layer of 8: 4 blocks per scan step
    assert period(inplace_layers=(1, 3, 5, 7)) == 2
    assert period(npt_layers=(0, 1, 2, 3, 4, 5, 6, 7)) == 1
    assert period(inplace_layers=(6,)) == 8  # no period: one step of all 8 blocks
    two = dataclasses.replace(
        PRETRAINED, pattern=("attention/swiglu", "ttt_linear/swiglu"), num_layers=8
    )
    assert dataclasses.replace(two, retrofit=RetrofitOptions(npt_layers=(0, 4))).period == 4
    config = dataclasses.replace(two, retrofit=RetrofitOptions(npt_layers=(4,), branch_layers=(1,)))
    assert config.period == 8 and config.repeats == 1
    assert config.blocks[4] == ("attention", "npt") and config.parts[1] == (
        "ttt_linear",
        "swiglu",
        "ttt_linear",
    )
    assert base_config(config).blocks == two.blocks

    bad = [
        (dict(inplace_layers=(2,)), r"retrofit.inplace_layers must be distinct layer indices in \[0, 2\)"),
        (dict(npt_layers=(1, 1)), "retrofit.npt_layers must be distinct"),
        (dict(inplace_layers=(1,), npt_layers=(0, 1)), r"layers \[1\] are in both"),
        (dict(branch="attention"), "retrofit.branch"),
    ]  # fmt: skip
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(PRETRAINED, retrofit=RetrofitOptions(**kw))
    npt = dataclasses.replace(PRETRAINED, pattern=("attention/npt",))
    with pytest.raises(ValueError, match="layer 0's MLP is 'npt'; a retrofit replaces"):
        dataclasses.replace(npt, retrofit=RetrofitOptions(inplace_layers=(0,)))

    # A run saved before retrofits existed resumes as the same (unretrofitted) model.
    saved = {k: v for k, v in dataclasses.asdict(PRETRAINED).items() if k != "retrofit"}
    assert migrate_flat_fields(saved)["retrofit"] == {
        "inplace_layers": [],
        "npt_layers": [],
        "branch_layers": [],
        "branch": "ttt_linear",
    }


def test_pretrained_params_must_fit():
    base = dataclasses.replace(PRETRAINED, num_layers=4)
    config = dataclasses.replace(base, retrofit=RetrofitOptions(inplace_layers=(0, 2)))
    assert config.period == 2

    def zeros(c):
        abstract = _pure(nnx.eval_shape(lambda: LM(c, rngs=nnx.Rngs(0))))
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)

    # Each pretrained layer's weights land where the retrofitted layout keeps that layer
    # (layer l at position l % 2, index l // 2), W_down transposed into the In-Place w_down.
    params = zeros(base)
    for layer in range(4):
        params["groups"]["blocks"][0]["mlp"]["W_down"][layer] = layer + 1
        params["groups"]["blocks"][0]["mlp"]["W_down"][layer, 0, 1] = -1
    out = retrofit_params(params, config, fresh=lambda: zeros(config))
    inplace = out["groups"]["blocks"][0]["mlp"]["w_down"]  # layers 0 and 2: [2, d, F]
    swiglu = out["groups"]["blocks"][1]["mlp"]["W_down"]  # layers 1 and 3: [2, F, d]
    assert inplace.shape == (2, 32, 64) and swiglu.shape == (2, 64, 32)
    assert [float(inplace[i, 1, 0]) for i in range(2)] == [-1, -1]
    assert [float(jnp.max(inplace[i])) for i in range(2)] == [1, 3]
    assert [float(jnp.max(swiglu[i])) for i in range(2)] == [2, 4]
    params["groups"]["blocks"][0]["mlp"]["W_up"] = np.zeros((4, 32, 65), np.float32)
    with pytest.raises(
        ValueError, match=r"pretrained groups/blocks/0/mlp/W_up has shape \(4, 32, 65\)"
    ):
        retrofit_params(params, config)
    del params["final_norm"]
    with pytest.raises(ValueError, match="pretrained params lack final_norm"):
        retrofit_params(params, config)
