"""Self checks of the PyTorch reference (torch only, fp64, tiny sizes).

Run: python3 -m pytest parity_tests/reference/test_torch_ref_selfcheck.py -q   (a few seconds on CPU)
"""

from __future__ import annotations

import pytest
import torch

from ttt_torch_ref import (
    TTTLayerConfigRef,
    TTTLayerRef,
    TTTLinearState,
    TTTMLPState,
    ttt_linear,
    ttt_mlp,
)
from ttt_torch_ref.common import gelu_tanh

DTYPE = torch.float64
ATOL = 1e-10


def _inputs(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=DTYPE) for _ in range(3))
    eta = 0.5 * torch.rand(B, T, H, generator=g, dtype=DTYPE)
    ln = dict(
        ln_scale=1.0 + 0.1 * torch.randn(H, D, generator=g, dtype=DTYPE),
        ln_bias=0.1 * torch.randn(H, D, generator=g, dtype=DTYPE),
    )
    return q, k, v, eta, ln, g


def _linear_params(H, D, g):
    return dict(
        W1=0.3 * torch.randn(H, D, D, generator=g, dtype=DTYPE),
        b1=0.1 * torch.randn(H, D, generator=g, dtype=DTYPE),
    )


def _mlp_params(H, D, g):
    return dict(
        W1=0.3 * torch.randn(H, D, 4 * D, generator=g, dtype=DTYPE),
        b1=0.1 * torch.randn(H, 4 * D, generator=g, dtype=DTYPE),
        W2=0.3 * torch.randn(H, 4 * D, D, generator=g, dtype=DTYPE),
        b2=0.1 * torch.randn(H, D, generator=g, dtype=DTYPE),
    )


def _random_state(cls, params, B, g):
    return cls(
        **{
            n: p.unsqueeze(0) + 0.1 * torch.randn(B, *p.shape, generator=g, dtype=DTYPE)
            for n, p in params.items()
        }
    )


OPS = {
    "linear": (ttt_linear, _linear_params, TTTLinearState),
    "mlp": (ttt_mlp, _mlp_params, TTTMLPState),
}


# ---------------------------------------------------------------------------------------------
# Hand-written loops, one (b, h) and one token at a time
# ---------------------------------------------------------------------------------------------


def _ln(z, scale, bias, eps=1e-6):
    mu = z.mean()
    sigma = torch.sqrt(((z - mu) ** 2).mean() + eps)
    return (z - mu) / sigma * scale + bias


def _linear_token_grad(W, b, k, v, scale, bias, eps=1e-6):
    """grad of 1/2 ||LN(k W + b) - (v - k)||^2 w.r.t. (W, b), LayerNorm backward by hand."""
    z = k @ W + b
    sigma = torch.sqrt(((z - z.mean()) ** 2).mean() + eps)
    y = (z - z.mean()) / sigma
    g_y = (y * scale + bias - (v - k)) * scale
    g_z = (g_y - g_y.mean() - y * (g_y * y).mean()) / sigma
    return torch.outer(k, g_z), g_z


def _hand_ttt_linear(q, k, v, eta, W1, b1, ln_scale, ln_bias, C, token_scale):
    """The mini-batch rule of SPEC 3.1 with explicit loops and hand-derived gradients."""
    B, T, H, _ = q.shape
    o = torch.zeros_like(q)
    final_W, final_b = W1.new_zeros(B, *W1.shape), b1.new_zeros(B, *b1.shape)
    for b in range(B):
        for h in range(H):
            W, bias = W1[h], b1[h]
            s, c = ln_scale[h], ln_bias[h]
            for start in range(0, T, C):
                n = min(C, T - start)
                grads = [
                    _linear_token_grad(W, bias, k[b, start + j, h], v[b, start + j, h], s, c)
                    for j in range(n)
                ]
                for i in range(n):
                    W_i = W - token_scale[i] * sum(
                        eta[b, start + j, h] * grads[j][0] for j in range(i + 1)
                    )
                    b_i = bias - token_scale[i] * sum(
                        eta[b, start + j, h] * grads[j][1] for j in range(i + 1)
                    )
                    x = q[b, start + i, h]
                    o[b, start + i, h] = x + _ln(x @ W_i + b_i, s, c)
                if n == C:
                    W, bias = W_i, b_i
            final_W[b, h], final_b[b, h] = W, bias
    return o, final_W, final_b


def _online_gd_linear(q, k, v, eta, W1, b1, ln_scale, ln_bias):
    """C = 1: one plain gradient step per token, then read the query."""
    B, T, H, _ = q.shape
    o = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            W, bias = W1[h], b1[h]
            for t in range(T):
                gW, gb = _linear_token_grad(
                    W, bias, k[b, t, h], v[b, t, h], ln_scale[h], ln_bias[h]
                )
                W, bias = W - eta[b, t, h] * gW, bias - eta[b, t, h] * gb
                o[b, t, h] = q[b, t, h] + _ln(q[b, t, h] @ W + bias, ln_scale[h], ln_bias[h])
    return o


def _online_gd_mlp(q, k, v, eta, W1, b1, W2, b2, ln_scale, ln_bias):
    """C = 1 for TTT-MLP, one (b, h) at a time, autograd on a single token's loss."""
    B, T, H, _ = q.shape
    o = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            w = [
                W1[h].clone().requires_grad_(),
                b1[h].clone().requires_grad_(),
                W2[h].clone().requires_grad_(),
                b2[h].clone().requires_grad_(),
            ]

            def f(x, w=w):
                return gelu_tanh(x @ w[0] + w[1]) @ w[2] + w[3]

            for t in range(T):
                kt, vt, qt = k[b, t, h], v[b, t, h], q[b, t, h]
                loss = 0.5 * ((_ln(f(kt), ln_scale[h], ln_bias[h]) - (vt - kt)) ** 2).sum()
                grads = torch.autograd.grad(loss, w)
                with torch.no_grad():
                    for p, gp in zip(w, grads, strict=True):
                        p -= eta[b, t, h] * gp
                    o[b, t, h] = qt + _ln(f(qt), ln_scale[h], ln_bias[h])
    return o


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_linear_c1_is_online_gradient_descent():
    q, k, v, eta, ln, g = _inputs(B=2, T=5, H=2, D=4)
    params = _linear_params(2, 4, g)
    o, _ = ttt_linear(q, k, v, eta, **params, **ln, mini_batch_size=1)
    expected = _online_gd_linear(
        q, k, v, eta, params["W1"], params["b1"], ln["ln_scale"], ln["ln_bias"]
    )
    torch.testing.assert_close(o, expected, atol=ATOL, rtol=0)


def test_mlp_c1_is_online_gradient_descent():
    q, k, v, eta, ln, g = _inputs(B=1, T=4, H=2, D=4)
    params = _mlp_params(2, 4, g)
    o, _ = ttt_mlp(q, k, v, eta, **params, **ln, mini_batch_size=1)
    expected = _online_gd_mlp(q, k, v, eta, *params.values(), ln["ln_scale"], ln["ln_bias"])
    torch.testing.assert_close(o, expected, atol=ATOL, rtol=0)


def test_linear_mini_batch_rule_matches_hand_loop():
    # T = 2C + 2: two full mini-batches and a partial one, with a non-default token_scale so that
    # token_scale[i] and eta[j] cannot be swapped without notice.
    C = 4
    q, k, v, eta, ln, g = _inputs(B=2, T=2 * C + 2, H=2, D=4)
    params = _linear_params(2, 4, g)
    token_scale = torch.rand(C, generator=g, dtype=DTYPE)
    o, state = ttt_linear(q, k, v, eta, **params, **ln, mini_batch_size=C, token_scale=token_scale)
    o_ref, W_ref, b_ref = _hand_ttt_linear(
        q, k, v, eta, params["W1"], params["b1"], ln["ln_scale"], ln["ln_bias"], C, token_scale
    )
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.W1, W_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.b1, b_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_streaming(inner):
    op, make_params, state_cls = OPS[inner]
    C, B, H, D = 3, 2, 2, 4
    q, k, v, eta, ln, g = _inputs(B=B, T=3 * C + 1, H=H, D=D)
    params = make_params(H, D, g)
    s0 = _random_state(state_cls, params, B, g)
    kw = dict(**params, **ln, mini_batch_size=C, initial_state=s0)

    o_full, s_full = op(q, k, v, eta, **kw)
    t1 = C
    first = [x[:, :t1] for x in (q, k, v, eta)]
    second = [x[:, t1:] for x in (q, k, v, eta)]
    o1, s1 = op(*first, **kw)
    o2, s2 = op(*second, **{**kw, "initial_state": s1})

    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, atol=ATOL, rtol=0)
    for name in vars(s_full):
        torch.testing.assert_close(getattr(s2, name), getattr(s_full, name), atol=ATOL, rtol=0)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_partial_trailing_mini_batch(inner):
    op, make_params, _ = OPS[inner]
    C, r, H, D = 4, 2, 2, 4
    q, k, v, eta, ln, g = _inputs(B=2, T=3 * C, H=H, D=D)
    kw = dict(**make_params(H, D, g), **ln, mini_batch_size=C)

    def prefix(t):
        return op(*(x[:, :t] for x in (q, k, v, eta)), **kw)

    o_long, _ = prefix(3 * C)
    o_partial, s_partial = prefix(2 * C + r)
    _, s_complete = prefix(2 * C)
    torch.testing.assert_close(o_partial, o_long[:, : 2 * C + r], atol=ATOL, rtol=0)
    for name in vars(s_complete):
        torch.testing.assert_close(
            getattr(s_partial, name), getattr(s_complete, name), atol=ATOL, rtol=0
        )


def test_gradcheck_linear():
    B, T, H, D, C = 1, 5, 1, 4, 2  # two full mini-batches and a partial one
    q, k, v, eta, ln, g = _inputs(B, T, H, D)
    params = _linear_params(H, D, g)
    s0 = _random_state(TTTLinearState, params, B, g)
    token_scale = torch.rand(C, generator=g, dtype=DTYPE)
    leaves = [
        t.clone().requires_grad_()
        for t in (
            q,
            k,
            v,
            eta,
            ln["ln_scale"],
            ln["ln_bias"],
            token_scale,
            params["W1"],
            params["b1"],
            s0.W1,
            s0.b1,
        )
    ]

    def from_params(q, k, v, eta, ln_scale, ln_bias, token_scale, W1, b1, *_):
        o, s = ttt_linear(
            q,
            k,
            v,
            eta,
            W1=W1,
            b1=b1,
            ln_scale=ln_scale,
            ln_bias=ln_bias,
            mini_batch_size=C,
            token_scale=token_scale,
        )
        return o, s.W1, s.b1

    def from_state(q, k, v, eta, ln_scale, ln_bias, token_scale, W1, b1, sW1, sb1):
        o, s = ttt_linear(
            q,
            k,
            v,
            eta,
            W1=W1,
            b1=b1,
            ln_scale=ln_scale,
            ln_bias=ln_bias,
            mini_batch_size=C,
            token_scale=token_scale,
            initial_state=TTTLinearState(sW1, sb1),
        )
        return o, s.W1, s.b1

    assert torch.autograd.gradcheck(from_params, leaves[:9])
    assert torch.autograd.gradcheck(
        from_state, leaves[:7] + [leaves[7].detach(), leaves[8].detach()] + leaves[9:]
    )


def test_no_grad_and_dtype():
    q, k, v, eta, ln, g = _inputs(B=1, T=5, H=2, D=4)
    params = _linear_params(2, 4, g)
    as32 = [x.float() for x in (q, k, v, eta)]
    with torch.no_grad():
        o, s = ttt_linear(*as32, **params, **ln, mini_batch_size=2)
    assert o.dtype == torch.float32 and not o.requires_grad and not s.W1.requires_grad
    o64, _ = ttt_linear(q, k, v, eta, **params, **ln, mini_batch_size=2)
    torch.testing.assert_close(o.double(), o64, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_layer_is_causal_and_reaches_every_parameter(inner, backbone):
    cfg = TTTLayerConfigRef(
        d_model=8, num_heads=2, inner=inner, backbone=backbone, mini_batch_size=3
    )
    layer = TTTLayerRef(cfg, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # non-trivial values everywhere, so no gradient is zero by accident
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=DTYPE))
    x = torch.randn(2, 7, 8, dtype=DTYPE)
    y, state = layer(x)
    assert y.shape == x.shape and state.W1.shape[:2] == (2, 2)

    x_changed = x.clone()
    x_changed[:, 4] += 1.0
    y_changed, _ = layer(x_changed)
    torch.testing.assert_close(y_changed[:, :4], y[:, :4], atol=ATOL, rtol=0)
    assert (y_changed[:, 4] - y[:, 4]).abs().max() > 1e-6

    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_layer_streaming_transformer_backbone():
    # Without convs the layer carries no state other than the fast weights, so a split at a
    # multiple of C with position_offset is exact.
    cfg = TTTLayerConfigRef(d_model=8, num_heads=2, backbone="transformer", mini_batch_size=3)
    layer = TTTLayerRef(cfg, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(2, 8, 8, dtype=DTYPE)
    y, s = layer(x)
    y1, s1 = layer(x[:, :3])
    y2, s2 = layer(x[:, 3:], initial_state=s1, position_offset=3)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=ATOL, rtol=0)
    torch.testing.assert_close(s2.W1, s.W1, atol=ATOL, rtol=0)
