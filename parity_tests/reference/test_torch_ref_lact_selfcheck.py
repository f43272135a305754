"""Self checks of the LaCT reference (torch only, fp64, tiny sizes), SPEC 3.2.

Run: python3 -m pytest parity_tests/reference/test_torch_ref_lact_selfcheck.py -q   (a few seconds)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_torch_ref.lact import (
    NEWTON_SCHULZ_COEFFS,
    LaCTLayerConfigRef,
    LaCTLayerRef,
    LaCTState,
    inner_gradients,
    lact_swiglu,
    newton_schulz5,
    swiglu_fast_weight,
)

DTYPE = torch.float64
ATOL = 1e-11


def _randn(g, *shape, scale=1.0, requires_grad=False):
    return (scale * torch.randn(*shape, generator=g, dtype=DTYPE)).requires_grad_(requires_grad)


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0.0)


def _inputs(Bsz=2, T=10, H=2, D=4, Dh=6, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    rg = requires_grad
    x = dict(
        q=_randn(g, Bsz, T, H, D, requires_grad=rg),
        k=_randn(g, Bsz, T, H, D, requires_grad=rg),
        v=_randn(g, Bsz, T, H, D, requires_grad=rg),
        lr0=(0.1 * torch.rand(Bsz, T, H, generator=g, dtype=DTYPE)).requires_grad_(rg),
        lr1=(0.1 * torch.rand(Bsz, T, H, generator=g, dtype=DTYPE)).requires_grad_(rg),
        lr2=(0.1 * torch.rand(Bsz, T, H, generator=g, dtype=DTYPE)).requires_grad_(rg),
    )
    w = dict(
        w0=_randn(g, H, Dh, D, scale=0.5, requires_grad=rg),
        w1=_randn(g, H, D, Dh, scale=0.5, requires_grad=rg),
        w2=_randn(g, H, Dh, D, scale=0.5, requires_grad=rg),
    )
    beta = torch.rand(Bsz, T, H, generator=g, dtype=DTYPE).requires_grad_(rg)
    return x, w, beta, g


def _run(x, w, **kw):
    return lact_swiglu(*x.values(), **w, **kw)


def test_fast_weight_is_the_column_formula():
    g = torch.Generator().manual_seed(1)
    w0, w1, w2 = _randn(g, 1, 1, 3, 2), _randn(g, 1, 1, 2, 3), _randn(g, 1, 1, 3, 2)
    x = _randn(g, 1, 1, 4, 2)
    for t in range(4):
        col = x[0, 0, t]
        want = w1[0, 0] @ (F.silu(w0[0, 0] @ col) * (w2[0, 0] @ col))
        _close(swiglu_fast_weight(w0, w1, w2, x)[0, 0, t], want)


def test_autograd_inner_gradient_is_the_closed_form():
    """The SPEC's G0, G1, G2 (per sample and head, columns = tokens)."""
    g = torch.Generator().manual_seed(2)
    Bsz, H, C, D, Dh = 2, 3, 5, 4, 6
    w = (_randn(g, Bsz, H, Dh, D), _randn(g, Bsz, H, D, Dh), _randn(g, Bsz, H, Dh, D))
    K, V = _randn(g, Bsz, H, C, D), _randn(g, Bsz, H, C, D)
    lrs = tuple(torch.rand(Bsz, H, C, generator=g, dtype=DTYPE) for _ in range(3))
    G = inner_gradients(w, K, V, lrs)
    for b in range(Bsz):
        for h in range(H):
            w0, w1, w2 = (wj[b, h] for wj in w)
            Kt, Vt = K[b, h], V[b, h]  # [C, D]: K^T in the SPEC is Kt.T
            A, Bm = w0 @ Kt.T, w2 @ Kt.T  # [Dh, C]
            Hid = F.silu(A) * Bm
            P = w1.T @ Vt.T
            dsilu = torch.sigmoid(A) * (1 + A * (1 - torch.sigmoid(A)))
            G1 = Vt.T @ torch.diag(lrs[1][b, h]) @ Hid.T
            G0 = (P * Bm * dsilu) @ torch.diag(lrs[0][b, h]) @ Kt
            G2 = (P * F.silu(A)) @ torch.diag(lrs[2][b, h]) @ Kt
            for got, want in zip(G, (G0, G1, G2), strict=True):
                _close(got[b, h], want)


def test_one_chunk_by_hand_with_momentum_muon_and_weight_norm():
    x, w, beta, g = _inputs(Bsz=1, T=8, H=1)
    C = 4
    init = LaCTState(
        *(_randn(g, 1, *w[n].shape, scale=0.5) for n in ("w0", "w1", "w2")),
        *(_randn(g, 1, *w[n].shape, scale=0.1) for n in ("w0", "w1", "w2")),
    )
    o, s = _run(x, w, chunk_size=C, momentum=beta, use_muon=True, initial_state=init)
    W = [init.w0, init.w1, init.w2]
    M = [init.m0, init.m1, init.m2]
    heads = {n: t.transpose(1, 2) for n, t in x.items()}
    for i in range(2):
        sl = slice(i * C, (i + 1) * C)
        _close(o[:, sl].transpose(1, 2), swiglu_fast_weight(*W, heads["q"][:, :, sl]))
        G = inner_gradients(
            W,
            heads["k"][:, :, sl],
            heads["v"][:, :, sl],
            [heads[f"lr{j}"][:, :, sl] for j in range(3)],
        )
        m_i = beta[0, sl, 0].mean()
        M = [G[j] + m_i * M[j] for j in range(3)]
        W = [W[j] + newton_schulz5(M[j]) for j in range(3)]
        slow = [w["w0"], w["w1"], w["w2"]]
        W = [
            W[j] / (W[j].norm(dim=-1, keepdim=True) + 1e-5) * slow[j].norm(dim=-1, keepdim=True)
            for j in range(3)
        ]
    for got, want in zip((s.w0, s.w1, s.w2, s.m0, s.m1, s.m2), (*W, *M), strict=True):
        _close(got, want)


def test_newton_schulz_by_hand_and_near_orthogonal():
    g = torch.Generator().manual_seed(3)
    for shape in ((3, 5), (5, 3)):
        G = _randn(g, *shape)
        X = G / (torch.linalg.matrix_norm(G) + 1e-7)
        if shape[0] > shape[1]:
            X = X.T
        for a, b, c in NEWTON_SCHULZ_COEFFS:
            A = X @ X.T
            X = a * X + b * A @ X + c * A @ A @ X
        want = X.T if shape[0] > shape[1] else X
        _close(newton_schulz5(G), want)
        sv = torch.linalg.svdvals(newton_schulz5(G))
        assert sv.min() > 0.5 and sv.max() < 1.5, sv


def test_weight_norm_keeps_the_slow_row_norms():
    x, w, beta, _ = _inputs(T=12)
    _, s = _run(x, w, chunk_size=4, momentum=beta)
    for j in range(3):
        fast, slow = getattr(s, f"w{j}"), w[f"w{j}"]
        _close(fast.norm(dim=-1), slow.norm(dim=-1).expand_as(fast.norm(dim=-1)), atol=1e-4)
    _, s_off = _run(x, w, chunk_size=4, momentum=beta, weight_norm=False)
    assert (s_off.w0.norm(dim=-1) - w["w0"].norm(dim=-1)).abs().max() > 1e-3


def test_apply_then_update_and_causality():
    x, w, beta, g = _inputs(T=12)
    C = 4
    o, _ = _run(x, w, chunk_size=C, momentum=beta, use_muon=True)
    # The first chunk reads the slow weights.
    _close(
        o[:, :C].transpose(1, 2),
        swiglu_fast_weight(w["w0"], w["w1"], w["w2"], x["q"][:, :C].transpose(1, 2)),
    )
    for i in range(3):
        # Changing any k, v, rate or beta of chunks >= i leaves the outputs of chunks <= i.
        x2 = {n: t.clone() for n, t in x.items()}
        for n in ("k", "v", "lr0", "lr1", "lr2"):
            x2[n][:, i * C :] += torch.rand(x2[n][:, i * C :].shape, generator=g, dtype=DTYPE)
        beta2 = beta.clone()
        beta2[:, i * C :] = torch.rand(beta2[:, i * C :].shape, generator=g, dtype=DTYPE)
        o2, _ = _run(x2, w, chunk_size=C, momentum=beta2, use_muon=True)
        assert torch.equal(o[:, : (i + 1) * C], o2[:, : (i + 1) * C])
        if i < 2:
            assert (o[:, (i + 1) * C :] - o2[:, (i + 1) * C :]).abs().max() > 1e-6


@pytest.mark.parametrize(
    "momentum,muon,wn", [(False, False, True), (True, True, True), (True, False, False)]
)
def test_streaming_split_at_chunk_boundary(momentum, muon, wn):
    x, w, beta, _ = _inputs(T=14)
    C, t1 = 3, 6
    kw = dict(chunk_size=C, use_muon=muon, weight_norm=wn)
    b = beta if momentum else None
    o, s = _run(x, w, momentum=b, **kw)
    o1, s1 = _run(
        {n: t[:, :t1] for n, t in x.items()}, w, momentum=None if b is None else b[:, :t1], **kw
    )
    o2, s2 = _run(
        {n: t[:, t1:] for n, t in x.items()},
        w,
        momentum=None if b is None else b[:, t1:],
        initial_state=s1,
        **kw,
    )
    _close(torch.cat([o1, o2], dim=1), o)
    for n in ("w0", "w1", "w2", "m0", "m1", "m2"):
        _close(getattr(s2, n), getattr(s, n))


def test_trailing_partial_chunk_is_read_and_padding_changes_nothing():
    x, w, beta, g = _inputs(T=11)
    C = 4
    o, s = _run(x, w, chunk_size=C, momentum=beta)
    o8, s8 = _run({n: t[:, :8] for n, t in x.items()}, w, chunk_size=C, momentum=beta[:, :8])
    _close(o[:, :8], o8)
    for n in ("w0", "w1", "w2", "m0", "m1", "m2"):
        _close(getattr(s, n), getattr(s8, n))
    _close(
        o[:, 8:].transpose(1, 2),
        swiglu_fast_weight(s8.w0, s8.w1, s8.w2, x["q"][:, 8:].transpose(1, 2)),
    )
    # Padding the partial chunk to a whole one with junk leaves the first 11 outputs alone.
    pad = {
        n: torch.cat([t, torch.rand(t[:, :1].shape, generator=g, dtype=DTYPE)], 1)
        for n, t in x.items()
    }
    o_pad, _ = _run(pad, w, chunk_size=C, momentum=torch.cat([beta, beta[:, :1]], 1))
    _close(o_pad[:, :11], o)
    # Shorter than one chunk: the state is the start.
    _, s_short = _run({n: t[:, :3] for n, t in x.items()}, w, chunk_size=C)
    _close(s_short.w0, w["w0"].expand_as(s_short.w0))
    assert not s_short.m0.any()


def test_no_momentum_gives_zero_buffers():
    x, w, _, g = _inputs(T=8)
    init = LaCTState(*(_randn(g, 2, *w[n].shape) for n in ("w0", "w1", "w2", "w0", "w1", "w2")))
    _, s = _run(x, w, chunk_size=4, initial_state=init)
    assert not (s.m0.any() or s.m1.any() or s.m2.any())


def test_gradcheck():
    x, w, beta, g = _inputs(Bsz=1, T=5, H=1, D=2, Dh=3, requires_grad=True)
    init = [_randn(g, 1, *w[n].shape, scale=0.5, requires_grad=True) for n in ("w0", "w1", "w2")]
    init += [_randn(g, 1, *w[n].shape, scale=0.1, requires_grad=True) for n in ("w0", "w1", "w2")]

    def f(q, k, v, lr0, lr1, lr2, w0, w1, w2, beta, *state):
        o, s = lact_swiglu(
            q,
            k,
            v,
            lr0,
            lr1,
            lr2,
            w0=w0,
            w1=w1,
            w2=w2,
            chunk_size=2,
            momentum=beta,
            use_muon=True,
            initial_state=LaCTState(*state),
        )
        return o, s.w0, s.w1, s.w2, s.m0

    assert torch.autograd.gradcheck(f, (*x.values(), *w.values(), beta, *init))


def test_works_under_no_grad_and_in_fp32():
    x, w, beta, _ = _inputs()
    with torch.no_grad():
        o, s = _run(
            {n: t.float() for n, t in x.items()},
            {n: t.float() for n, t in w.items()},
            chunk_size=4,
            momentum=beta.float(),
        )
    assert o.dtype == torch.float32 and s.w0.dtype == torch.float32 and not o.requires_grad
    o64, _ = _run(x, w, chunk_size=4, momentum=beta)
    assert (o.double() - o64).abs().max() < 1e-4


# --- the layer -------------------------------------------------------------------------------


def _layer(seed=0, **kw):
    cfg = LaCTLayerConfigRef(
        **{**dict(d_model=8, num_heads=2, num_fw_heads=2, window=3, chunk_size=4, rank=2), **kw}
    )
    return LaCTLayerRef(cfg, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def test_layer_low_rank_start_and_gradients_reach_the_factors():
    layer = _layer(learnable_scale=True, use_muon=True)
    w0, w1, w2 = layer.slow_weights()
    D, Dh = layer.config.fw_head_dim, layer.config.fw_hidden
    _close(w0, layer.w0_left @ layer.w0_right + 0.5 * torch.eye(Dh, D, dtype=DTYPE))
    x = _randn(torch.Generator().manual_seed(1), 2, 10, 8)
    y, s = layer(x)
    assert y.shape == x.shape and s.w0.shape == (2, 2, Dh, D)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_layer_rates_start_at_base_lr():
    layer = _layer(base_lr=1e-3)
    # b_lr was made in fp32: softplus(b) = 1e-3 up to its rounding.
    _close(F.softplus(layer.b_lr), torch.full_like(layer.b_lr, 1e-3), atol=1e-9)


def test_layer_is_causal_with_a_sliding_window():
    layer = _layer(chunk_size=4, window=3)
    g = torch.Generator().manual_seed(2)
    x = _randn(g, 1, 12, 8)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    y2, _ = layer(x2)
    assert torch.equal(y[:, :8], y2[:, :8])
    # With the TTT branch off (zero norm scale) token 7 sees keys 5, 6, 7 only.
    with torch.no_grad():
        layer.ttt_norm.zero_()
    y, _ = layer(x)
    x3 = x.clone()
    x3[:, :5] += 1.0
    y3, _ = layer(x3)
    _close(y[:, 7:], y3[:, 7:])
    assert (y[:, 6] - y3[:, 6]).abs().max() > 1e-6
