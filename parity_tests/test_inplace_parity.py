"""In-Place TTT: JAX op and `InPlaceMLP` vs the torch reference (SPEC 3.3, 5).

Outputs, final states, and gradients with respect to z, the targets, w_down, w_target, the conv
kernel, eta and the initial state (op, fp32 CPU, <= 1e-5); outputs, states and gradients with
respect to the input, the embeddings and every parameter (layer, <= 1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ttt_torch_ref
from parity_tests.convert import inplace_mlp_to_torch, state_to_torch, to_numpy, to_torch
from ttt_jax.layers import InPlaceMLP, InPlaceMLPConfig
from ttt_jax.ops import InPlaceState, inplace_ttt
from ttt_jax.testing import GPU_BF16_TOL, LAYER_TOL, OP_TOL, rel_err
from ttt_torch_ref.inplace_ttt import chunk_conv, segments

B, D, F = 2, 6, 10
KERNEL = {"centered": 5, "causal_next": 2}


def make_inputs(t, conv_mode, seed, with_state):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape)  # noqa: E731
    x = {"z": n((B, t, F)), "target": n((B, t, D))}
    params = {
        "w_down": n((D, F), 0.3),
        "w_target": n((D, D), 0.3),
        "conv_kernel": n((KERNEL[conv_mode], D), 0.5),
        "eta": jnp.asarray(0.1),
    }
    state = InPlaceState(w_down=params["w_down"] + n((B, D, F), 0.1)) if with_state else None
    return x, params, state


def make_segments(t, c):
    """Packed documents: one shorter than a chunk, one of whole chunks, a ragged tail."""
    rows = []
    for cut in ([2, 2 + 2 * c], [c + 1, 2 * c + 3]):
        ids = np.zeros(t, np.int32)
        for i, s in enumerate(cut):
            ids[s:] = i + 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def middle_tau(x, params, c, conv_mode, seg):
    """A clip threshold between the middle two chunk-update norms: some chunks clip, some not."""
    z, tgt = to_torch(x["z"]), to_torch(x["target"])
    kern, wt = to_torch(params["conv_kernel"]), to_torch(params["w_target"])
    norms = []
    for b in range(B):
        bounds = [(0, z.shape[1])] if seg is None else segments(torch.tensor(np.asarray(seg[b])))
        for s, e in bounds:
            for i in range(s, e - c + 1, c):
                v = chunk_conv(tgt[b, i : i + c], kern, conv_mode) @ wt
                norms.append(float(torch.linalg.matrix_norm(v.T @ z[b, i : i + c])))
    norms.sort()
    assert len(norms) >= 2
    mid = len(norms) // 2
    return 0.5 * (norms[mid - 1] + norms[mid])


CASES = [
    # T, C, conv_mode, initial state, clip, segments, prefix, backward, checkpoint_group
    (16, 4, "centered", False, False, False, "sequential", "custom", None),
    (19, 4, "causal_next", True, False, False, "sequential", "custom", None),
    (21, 4, "centered", True, True, False, "associative", "custom", None),
    (3, 4, "centered", True, False, False, "sequential", "custom", None),  # < one chunk
    (18, 3, "causal_next", False, True, False, "sequential", "autodiff", 2),
    (20, 3, "centered", False, False, True, "sequential", "custom", None),
    (17, 3, "causal_next", True, True, True, "associative", "custom", None),
    (19, 3, "centered", True, False, True, "sequential", "autodiff", None),
    # One-token chunks: every tap of the centered conv but the middle one falls outside.
    (6, 1, "centered", True, False, False, "sequential", "custom", None),
    (7, 1, "centered", False, True, True, "associative", "autodiff", None),
]


@pytest.mark.parametrize("t,c,conv_mode,with_state,clip,segmented,prefix,backward,group", CASES)
def test_op_parity(t, c, conv_mode, with_state, clip, segmented, prefix, backward, group):
    x, params, state0 = make_inputs(t, conv_mode, seed=t + c, with_state=with_state)
    seg = make_segments(t, c) if segmented else None
    tau = middle_tau(x, params, c, conv_mode, seg) if clip else None

    def run(x, params, state0):
        return inplace_ttt(
            x["z"],
            x["target"],
            w_down=params["w_down"],
            w_target=params["w_target"],
            conv_kernel=params["conv_kernel"],
            eta=params["eta"],
            chunk_size=c,
            conv_mode=conv_mode,
            clip_tau=tau,
            segment_ids=seg,
            initial_state=state0,
            prefix=prefix,
            backward=backward,
            checkpoint_group=group,
        )

    # Random cotangents so every output and state element enters the gradient.
    ko, ks = jax.random.split(jax.random.PRNGKey(t + 100))
    r_out, r_state = jax.random.normal(ko, (B, t, D)), jax.random.normal(ks, (B, D, F))

    @jax.jit
    def objective(x, params, state0):
        o, s = run(x, params, state0)
        return jnp.sum(o * r_out) + jnp.sum(s.w_down * r_state), (o, s)

    (_, (o, s)), (gx, gp, gs) = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        x, params, state0
    )

    tx = {k: to_torch(v, requires_grad=True) for k, v in x.items()}
    tp = {k: to_torch(v, requires_grad=True) for k, v in params.items()}
    ts0 = state_to_torch(state0, requires_grad=True) if with_state else None
    to, tstate = ttt_torch_ref.inplace_ttt(
        tx["z"],
        tx["target"],
        **tp,
        chunk_size=c,
        conv_mode=conv_mode,
        clip_tau=tau,
        segment_ids=None if seg is None else torch.tensor(np.asarray(seg)),
        initial_state=ts0,
    )
    obj = (to * to_torch(r_out)).sum() + (tstate.w_down * to_torch(r_state)).sum()
    leaves = [*tx.values(), *tp.values()] + ([ts0.w_down] if with_state else [])
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)

    assert rel_err(o, to_numpy(to)) <= OP_TOL
    assert rel_err(s.w_down, to_numpy(tstate.w_down)) <= OP_TOL
    # Inputs that cannot reach the result get a zero gradient on both sides: w_down when the
    # initial state starts the only document, the update's inputs when no chunk completes.
    unused = {"w_down"} if with_state and not segmented else set()
    if t < c:
        unused |= {"target", "w_target", "conv_kernel", "eta"}
    names = [*tx, *tp] + (["initial_state.w_down"] if with_state else [])
    jax_grads = [*(gx[k] for k in tx), *(gp[k] for k in tp)] + ([gs.w_down] if with_state else [])
    for name, gj, gt in zip(names, jax_grads, grads, strict=True):
        gt = np.zeros(gj.shape) if gt is None else to_numpy(gt)
        if name in unused:
            assert not np.any(gt) and not np.any(np.asarray(gj)), name
            continue
        assert rel_err(gj, gt) <= OP_TOL, (name, rel_err(gj, gt))


# --- the layer ------------------------------------------------------------------------------


def perturbed_layer(config, seed):
    """A layer whose every parameter is random, the conv and W_target large enough to matter."""
    layer = InPlaceMLP(config, rngs=nnx.Rngs(seed))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    noisy = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)
    nnx.update(layer, noisy)
    return layer


LAYER_CASES = [
    # T, conv_mode, target_source, activation, clip_tau, segments, prefix, backward
    (16, "centered", "embeddings", "silu", None, False, "sequential", "custom"),
    (19, "causal_next", "input", "silu", None, False, "associative", "custom"),
    (18, "centered", "input", "gelu_tanh", 0.5, False, "sequential", "autodiff"),
    (21, "causal_next", "embeddings", "silu", None, True, "sequential", "custom"),
    (17, "centered", "embeddings", "silu", 0.5, True, "associative", "autodiff"),
]


@pytest.mark.parametrize("t,conv_mode,source,act,tau,segmented,prefix,backward", LAYER_CASES)
def test_layer_parity(t, conv_mode, source, act, tau, segmented, prefix, backward):
    c = 4
    config = InPlaceMLPConfig(
        d_model=8,
        d_ff=12,
        chunk_size=c,
        conv_mode=conv_mode,
        target_source=source,
        activation=act,
        eta=0.7,
        clip_tau=tau,
        prefix=prefix,
        backward=backward,
    )
    layer = perturbed_layer(config, seed=t)
    ref = inplace_mlp_to_torch(layer)
    kx, ke, kr = jax.random.split(jax.random.PRNGKey(t), 3)
    x = jax.random.normal(kx, (2, t, 8))
    emb = jax.random.normal(ke, (2, t, 8))
    r = jax.random.normal(kr, (2, t, 8))
    seg = make_segments(t, c) if segmented else None

    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def objective(params, x, emb):
        y = nnx.merge(graphdef, params)(x, emb, segment_ids=seg)
        return jnp.sum(y * r), y

    (_, y), (gp, gx, ge) = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        params, x, emb
    )

    tx, te = to_torch(x, requires_grad=True), to_torch(emb, requires_grad=True)
    ty, tstate = ref(tx, te, segment_ids=None if seg is None else torch.tensor(np.asarray(seg)))
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(
        (ty * to_torch(r)).sum(), [tx, te, *ref.parameters()], allow_unused=True
    )

    assert rel_err(y, to_numpy(ty)) <= LAYER_TOL
    assert rel_err(gx, to_numpy(grads[0])) <= LAYER_TOL
    if source == "embeddings":
        assert rel_err(ge, to_numpy(grads[1])) <= LAYER_TOL
    else:
        assert grads[1] is None and not np.any(np.asarray(ge))
    jax_names = {v: k for k, v in {"w_gate": "W_gate", "w_up": "W_up", "w_down": "W_down"}.items()}
    for name, g in zip(names, grads[2:], strict=True):
        gj = gp[jax_names.get(name, name)][...]
        assert rel_err(gj, to_numpy(g)) <= LAYER_TOL, (name, rel_err(gj, to_numpy(g)))
    if not segmented:
        # The streaming prefill carries the op's final state: it equals the reference's.
        _, cache = layer.prefill(x, emb)
        assert rel_err(cache.w, to_numpy(tstate.w_down)) <= LAYER_TOL


# --- bf16 on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("segmented", [False, True])
def test_op_parity_bf16_gpu(segmented):
    t, c = 64, 16
    x, params, state0 = make_inputs(t, "centered", seed=5, with_state=True)
    seg = make_segments(t, c) if segmented else None
    o, s = inplace_ttt(
        x["z"].astype(jnp.bfloat16),
        x["target"].astype(jnp.bfloat16),
        **params,
        chunk_size=c,
        segment_ids=seg,
        initial_state=state0,
    )
    assert o.dtype == jnp.bfloat16 and s.w_down.dtype == jnp.float32
    with torch.no_grad():
        to, ts = ttt_torch_ref.inplace_ttt(
            to_torch(x["z"]),
            to_torch(x["target"]),
            **{k: to_torch(v) for k, v in params.items()},
            chunk_size=c,
            segment_ids=None if seg is None else torch.tensor(np.asarray(seg)),
            initial_state=state_to_torch(state0),
        )
    assert rel_err(o.astype(jnp.float32), to_numpy(to)) <= GPU_BF16_TOL
    assert rel_err(s.w_down, to_numpy(ts.w_down)) <= GPU_BF16_TOL


@pytest.mark.gpu
def test_layer_parity_bf16_gpu():
    from ttt_jax.layers import BF16

    config = InPlaceMLPConfig(d_model=64, d_ff=128, chunk_size=16, eta=0.5, precision=BF16)
    layer = InPlaceMLP(config, rngs=nnx.Rngs(1))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(params))))
    nnx.update(
        layer, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    )
    ref = inplace_mlp_to_torch(layer)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 64))
    emb = jax.random.normal(jax.random.PRNGKey(8), (2, 64, 64))
    y = layer(x, emb)
    assert y.dtype == jnp.bfloat16
    with torch.no_grad():
        ty, _ = ref(to_torch(x), to_torch(emb))
    assert rel_err(y.astype(jnp.float32), to_numpy(ty)) <= GPU_BF16_TOL
