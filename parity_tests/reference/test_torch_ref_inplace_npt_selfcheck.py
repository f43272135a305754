"""Self checks of the In-Place TTT and NPT references (torch only, fp64, tiny sizes).

Run: python3 -m pytest parity_tests/reference/test_torch_ref_inplace_npt_selfcheck.py -q   (a few seconds)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_torch_ref.attention import causal_attention
from ttt_torch_ref.inplace_ttt import (
    InPlaceMLPConfigRef,
    InPlaceMLPRef,
    InPlaceTTTState,
    chunk_conv,
    inplace_ttt,
)
from ttt_torch_ref.npt import (
    NPTMLPConfigRef,
    NPTMLPRef,
    npt_generated_rank_k_linear,
    npt_modulated_linear,
    npt_modulated_linear_materialised,
    npt_rank_k_linear,
    npt_rank_k_linear_materialised,
)
from ttt_torch_ref.npt_block import NPTBlockConfigRef, NPTBlockRef

DTYPE = torch.float64
ATOL = 1e-12


def _randn(g, *shape, scale=1.0, requires_grad=False):
    return (scale * torch.randn(*shape, generator=g, dtype=DTYPE)).requires_grad_(requires_grad)


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0.0)


# NPT ------------------------------------------------------------------------------------------


def test_npt_modulated_efficient_equals_materialised():
    g = torch.Generator().manual_seed(0)
    Bsz, S, d, F_, r = 2, 3, 4, 5, 2
    args = [
        _randn(g, Bsz, S, d, requires_grad=True),
        _randn(g, Bsz, S, r, requires_grad=True),
        _randn(g, d, F_, requires_grad=True),
        _randn(g, d, r, requires_grad=True),
        _randn(g, r, F_, requires_grad=True),
    ]
    cot = _randn(g, Bsz, S, F_)

    def run(fn):
        h, m, W, A, B = args
        y = fn(h, m, W=W, A=A, B=B)
        return y, torch.autograd.grad((y * cot).sum(), args)

    y_eff, g_eff = run(npt_modulated_linear)
    y_mat, g_mat = run(npt_modulated_linear_materialised)
    _close(y_eff, y_mat)
    for a, b in zip(g_eff, g_mat, strict=True):
        _close(a, b)


def test_npt_rank_k_efficient_equals_materialised():
    g = torch.Generator().manual_seed(1)
    Bsz, S, d, F_, k = 2, 3, 4, 5, 3
    args = [
        _randn(g, Bsz, S, d, requires_grad=True),
        _randn(g, Bsz, S, k, d, requires_grad=True),
        _randn(g, Bsz, S, k, F_, requires_grad=True),
        _randn(g, d, F_, requires_grad=True),
    ]
    cot = _randn(g, Bsz, S, F_)

    def run(fn):
        h, u, w, W = args
        y = fn(h, u, w, W=W)
        return y, torch.autograd.grad((y * cot).sum(), args)

    y_eff, g_eff = run(npt_rank_k_linear)
    y_mat, g_mat = run(npt_rank_k_linear_materialised)
    _close(y_eff, y_mat)
    for a, b in zip(g_eff, g_mat, strict=True):
        _close(a, b)


def test_npt_mlp_layer():
    g = torch.Generator().manual_seed(2)
    cfg = NPTMLPConfigRef(d_model=4, d_ff=6, rank=2, d_mod=3)
    layer = NPTMLPRef(cfg, generator=g).to(DTYPE)
    assert layer.W_gate.shape == (4, 6) and layer.W_down.shape == (6, 4)
    assert layer.A.shape == (4, 2) and layer.B.shape == (2, 6) and layer.A_m.shape == (3, 2)
    with torch.no_grad():  # make the delta large enough to matter
        layer.A.mul_(100.0)
        layer.B.mul_(100.0)
        layer.A_m.mul_(100.0)
    x, a = _randn(g, 2, 3, 4), _randn(g, 2, 3, 3)
    m = 0.1 * torch.tanh(a @ layer.A_m)
    gate = npt_modulated_linear_materialised(x, m, W=layer.W_gate, A=layer.A, B=layer.B)
    want = (F.silu(gate) * (x @ layer.W_up)) @ layer.W_down
    y, aux = layer(x, a)
    _close(y, want)
    assert aux.item() == 0.0
    plain = (F.silu(x @ layer.W_gate) * (x @ layer.W_up)) @ layer.W_down
    assert (y - plain).abs().max() > 1e-6


def test_npt_generated_rank_k_is_rank_k_of_the_generated_vectors():
    g = torch.Generator().manual_seed(4)
    h, code = _randn(g, 2, 3, 4), _randn(g, 2, 3, 2)
    W, W_u, W_w = _randn(g, 4, 5), _randn(g, 2, 3, 4), _randn(g, 2, 3, 5)
    want = torch.zeros(2, 3, 5, dtype=DTYPE)
    for b in range(2):
        for s in range(3):
            delta = sum(
                torch.outer(code[b, s] @ W_u[:, k], code[b, s] @ W_w[:, k]) for k in range(3)
            )
            want[b, s] = h[b, s] @ (W + delta)
    _close(npt_generated_rank_k_linear(h, code, W=W, W_u=W_u, W_w=W_w), want)


def test_npt_aux_loss_low_rank_closed_form():
    g = torch.Generator().manual_seed(6)
    cfg = NPTMLPConfigRef(d_model=4, d_ff=6, rank=3, scale=0.5, reg_lambda=0.3)
    layer = NPTMLPRef(cfg, generator=g).to(DTYPE)
    x, a = _randn(g, 2, 5, 4), _randn(g, 2, 5, 4)
    _, aux = layer(x, a)
    m = layer.modulation(a)
    col_sq = (layer.A**2).sum(0)
    want = 0.3 * ((m**2 * col_sq).sum(-1).mean() + (layer.B**2).sum())
    _close(aux, want)


def test_npt_rank_k_layer_and_none():
    g = torch.Generator().manual_seed(7)
    cfg = NPTMLPConfigRef(d_model=4, d_ff=6, rank=2, d_mod=3, modulation="rank_k", k=3)
    layer = NPTMLPRef(cfg, generator=g).to(DTYPE)
    x, a = _randn(g, 2, 5, 4), _randn(g, 2, 5, 3)
    u, w = layer.vectors(a)
    gate = x @ layer.W_gate + torch.einsum("bsd,bskd,bskf->bsf", x, u, w)
    y, _ = layer(x, a)
    _close(y, (F.silu(gate) * (x @ layer.W_up)) @ layer.W_down)
    plain = NPTMLPRef(NPTMLPConfigRef(d_model=4, d_ff=6, modulation="none")).to(DTYPE)
    y0, aux0 = plain(x)
    _close(y0, (F.silu(x @ plain.W_gate) * (x @ plain.W_up)) @ plain.W_down)
    assert aux0.item() == 0.0


def test_attention_window_by_hand():
    g = torch.Generator().manual_seed(8)
    q, k, v = (_randn(g, 1, 6, 1, 2) for _ in range(3))
    out = causal_attention(q, k, v, window=3)
    for t in range(6):
        keys = list(range(max(0, t - 2), t + 1))
        w = torch.softmax(torch.stack([q[0, t, 0] @ k[0, s, 0] for s in keys]) / 2**0.5, 0)
        _close(out[0, t, 0], sum(wi * v[0, s, 0] for wi, s in zip(w, keys, strict=True)))


@pytest.mark.parametrize("attn_residual", [True, False])
def test_npt_block_causal_and_residual(attn_residual):
    g = torch.Generator().manual_seed(9)
    mlp = NPTMLPConfigRef(d_model=4, d_ff=6, rank=2, scale=1.0)
    block = NPTBlockRef(
        NPTBlockConfigRef(num_heads=2, head_dim=2, mlp=mlp, attn_residual=attn_residual),
        generator=g,
    ).to(DTYPE)
    with torch.no_grad():
        for p in (block.mlp.A, block.mlp.B, block.mlp.A_m):
            p.mul_(1000.0)
    x = _randn(g, 1, 7, 4)
    y, _ = block(x)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    y2, _ = block(x2)
    assert torch.equal(y[:, :4], y2[:, :4])
    # Without the residual the attention still reaches the output, through the modulation.
    block.mlp.A_m.data.zero_()
    y_nomod, _ = block(x)
    assert (y_nomod - y).abs().max() > 1e-6


# In-Place TTT ---------------------------------------------------------------------------------


def _inplace_inputs(Bsz=2, T=11, d=3, F_=4, K=5, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    z = _randn(g, Bsz, T, F_, requires_grad=requires_grad)
    target = _randn(g, Bsz, T, d, requires_grad=requires_grad)
    params = dict(
        w_down=_randn(g, d, F_, requires_grad=requires_grad),
        w_target=_randn(g, d, d, scale=0.5, requires_grad=requires_grad),
        conv_kernel=_randn(g, K, d, scale=0.5, requires_grad=requires_grad),
    )
    return z, target, params, g


def test_chunk_conv_matches_definition():
    g = torch.Generator().manual_seed(3)
    x = _randn(g, 6, 2)
    for mode, K, shift in (("centered", 5, 2), ("causal_next", 2, 0)):
        kernel = _randn(g, K, 2)
        want = torch.zeros_like(x)
        for t in range(6):
            for j in range(K):
                if 0 <= t + j - shift < 6:
                    want[t] += kernel[j] * x[t + j - shift]
        _close(chunk_conv(x, kernel, mode), want)


def test_exclusive_prefix_by_hand():
    z, target, p, _ = _inplace_inputs(Bsz=1, T=8, K=5)
    C, eta = 4, 0.7
    o, state = inplace_ttt(z, target, **p, eta=eta, chunk_size=C)
    W = p["w_down"]
    # Chunk 0 sees no delta at all, not even its own.
    assert torch.equal(o[:, :C], z[:, :C] @ W.T)
    delta = [
        (chunk_conv(target[0, i : i + C], p["conv_kernel"], "centered") @ p["w_target"]).T
        @ z[0, i : i + C]
        for i in (0, C)
    ]
    _close(o[0, C:], z[0, C:] @ (W + eta * delta[0]).T)
    _close(state.w_down[0], W + eta * (delta[0] + delta[1]))


@pytest.mark.parametrize("conv_mode,K", [("centered", 5), ("causal_next", 2)])
def test_causality(conv_mode, K):
    z, target, p, g = _inplace_inputs(T=12, K=K)
    C = 4
    o, _ = inplace_ttt(z, target, **p, eta=0.5, chunk_size=C, conv_mode=conv_mode)
    for i in range(3):
        # Changing chunks >= i leaves earlier outputs alone; changing the target of chunk i
        # leaves chunk i alone too.
        z2, t2 = z.clone(), target.clone()
        z2[:, (i + 1) * C :] += _randn(g, *z2[:, (i + 1) * C :].shape)
        t2[:, i * C :] += _randn(g, *t2[:, i * C :].shape)
        o2, _ = inplace_ttt(z2, t2, **p, eta=0.5, chunk_size=C, conv_mode=conv_mode)
        assert torch.equal(o[:, : (i + 1) * C], o2[:, : (i + 1) * C])


def test_partial_chunk_reads_but_does_not_update():
    z, target, p, _ = _inplace_inputs(T=11)
    C = 4
    o, state = inplace_ttt(z, target, **p, eta=0.5, chunk_size=C)
    o8, state8 = inplace_ttt(z[:, :8], target[:, :8], **p, eta=0.5, chunk_size=C)
    _close(o[:, :8], o8)
    _close(state.w_down, state8.w_down)
    _close(o[:, 8:], torch.einsum("btf,bdf->btd", z[:, 8:], state8.w_down))


def test_clip():
    z, target, p, _ = _inplace_inputs(Bsz=1, T=4)
    _, s = inplace_ttt(z, target, **p, eta=0.5, chunk_size=4, clip_tau=1e-3)
    _close(torch.linalg.matrix_norm(s.w_down[0] - p["w_down"]), torch.tensor(0.5e-3, dtype=DTYPE))
    _, s_big = inplace_ttt(z, target, **p, eta=0.5, chunk_size=4, clip_tau=1e9)
    _, s_off = inplace_ttt(z, target, **p, eta=0.5, chunk_size=4)
    _close(s_big.w_down, s_off.w_down)


def test_packed_segments_equal_each_document_alone():
    z, target, p, g = _inplace_inputs(Bsz=2, T=13)
    C, eta = 3, 0.6
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2], [4] * 8 + [9] * 5])
    init = InPlaceTTTState(w_down=_randn(g, 2, *p["w_down"].shape))
    o, state = inplace_ttt(
        z, target, **p, eta=eta, chunk_size=C, segment_ids=seg, initial_state=init
    )
    for b, bounds in enumerate([[(0, 5), (5, 12), (12, 13)], [(0, 8), (8, 13)]]):
        for n, (s, e) in enumerate(bounds):
            first = InPlaceTTTState(w_down=init.w_down[b : b + 1]) if n == 0 else None
            o_doc, s_doc = inplace_ttt(
                z[b : b + 1, s:e],
                target[b : b + 1, s:e],
                **p,
                eta=eta,
                chunk_size=C,
                initial_state=first,
            )
            _close(o[b : b + 1, s:e], o_doc)
        _close(state.w_down[b : b + 1], s_doc.w_down)
    # The last document of sample 0 is one token long: its state is the slow w_down.
    _close(state.w_down[0], p["w_down"])


@pytest.mark.parametrize("segmented", [False, True])
def test_streaming_split_at_chunk_boundary(segmented):
    z, target, p, _ = _inplace_inputs(Bsz=2, T=14)
    C, eta = 3, torch.tensor(0.4, dtype=DTYPE)
    # With segments, split at a chunk boundary of the document in progress (it starts at 2).
    seg = torch.tensor([[0, 0] + [1] * 12] * 2) if segmented else None
    t1 = 8 if segmented else 6
    o, state = inplace_ttt(z, target, **p, eta=eta, chunk_size=C, segment_ids=seg)
    o1, s1 = inplace_ttt(
        z[:, :t1],
        target[:, :t1],
        **p,
        eta=eta,
        chunk_size=C,
        segment_ids=None if seg is None else seg[:, :t1],
    )
    o2, s2 = inplace_ttt(
        z[:, t1:],
        target[:, t1:],
        **p,
        eta=eta,
        chunk_size=C,
        segment_ids=None if seg is None else seg[:, t1:],
        initial_state=s1,
    )
    _close(torch.cat([o1, o2], dim=1), o)
    _close(s2.w_down, state.w_down)


def test_gradcheck():
    z, target, p, g = _inplace_inputs(Bsz=1, T=5, d=2, F_=3, K=5, requires_grad=True)
    eta = torch.tensor(0.8, dtype=DTYPE, requires_grad=True)
    init = _randn(g, 1, 2, 3, requires_grad=True)

    def f(z, target, w_down, w_target, conv_kernel, eta, init):
        o, s = inplace_ttt(
            z,
            target,
            w_down=w_down,
            w_target=w_target,
            conv_kernel=conv_kernel,
            eta=eta,
            chunk_size=2,
            initial_state=InPlaceTTTState(w_down=init),
        )
        return o, s.w_down

    inputs = (z, target, p["w_down"], p["w_target"], p["conv_kernel"], eta, init)
    assert torch.autograd.gradcheck(f, inputs)

    seg = torch.tensor([[0, 0, 0, 1, 1]])

    def f_clip_seg(z, target, w_down, w_target, conv_kernel, eta):
        o, s = inplace_ttt(
            z,
            target,
            w_down=w_down,
            w_target=w_target,
            conv_kernel=conv_kernel[:2],
            eta=eta,
            chunk_size=2,
            conv_mode="causal_next",
            clip_tau=0.3,
            segment_ids=seg,
        )
        return o, s.w_down

    assert torch.autograd.gradcheck(f_clip_seg, inputs[:-1])


@pytest.mark.parametrize("target_source", ["input", "embedding"])
@pytest.mark.parametrize("conv_mode", ["centered", "causal_next"])
def test_layer_at_official_init_is_the_plain_mlp(target_source, conv_mode):
    g = torch.Generator().manual_seed(5)
    cfg = InPlaceMLPConfigRef(
        d_model=3, d_ff=5, chunk_size=2, eta=0.9, conv_mode=conv_mode, target_source=target_source
    )
    layer = InPlaceMLPRef(cfg, generator=g).to(DTYPE)
    assert layer.ttt_conv.shape == (5 if conv_mode == "centered" else 2, 3)
    assert torch.equal(layer.ttt_proj, torch.diag(torch.diagonal(layer.ttt_proj)))
    x, emb = _randn(g, 2, 7, 3), _randn(g, 2, 7, 3)
    o, state = layer(x, embeddings=emb)
    plain = (F.silu(x @ layer.W_gate) * (x @ layer.W_up)) @ layer.W_down.T
    assert torch.equal(o, plain)
    assert torch.equal(state.w_down, layer.W_down.expand(2, 3, 5))
    # The zero conv still gets gradient through the nonzero diagonal W_target.
    (o**2).sum().backward()
    assert layer.ttt_conv.grad.abs().max() > 0
