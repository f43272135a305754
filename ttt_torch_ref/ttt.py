"""TTT-Linear and TTT-MLP ops in the primal form (Sun et al. 2024), written for reading.

Per sample b and head h the sequence is cut into mini-batches of C tokens. With W the fast weights
at the start of a mini-batch, token i (0-based position inside it) reads

    W_i   = W - sum_{j <= i} token_scale[i] * eta[j] * grad l_j(W)     (all gradients at W)
    out_i = q_i + LN(f_{W_i}(q_i))
    l_j(W) = 1/2 * || LN(f_W(k_j)) - (v_j - k_j) ||^2

and the next mini-batch starts from W_{C-1}. This module materialises every W_i and takes every
grad l_j with `torch.autograd.grad(..., create_graph=True)`, so the result is differentiable with
respect to every input. It is slow on purpose: it is the independent reference that the JAX dual
form is checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import check_shape, gelu_tanh, layer_norm

# An inner model maps (fast weights with leading [B, H] dims, x [B, H, n, D]) to [B, H, n, D].
InnerModel = Callable[[Sequence[Tensor], Tensor], Tensor]


@dataclass
class TTTLinearState:
    """Per-sample fast weights of TTT-Linear.

    Attributes:
        W1: [B, H, D, D], the inner linear map, applied as x @ W1.
        b1: [B, H, D], its bias.
    """

    W1: Tensor
    b1: Tensor


@dataclass
class TTTMLPState:
    """Per-sample fast weights of TTT-MLP.

    Attributes:
        W1: [B, H, D, 4D], first layer, applied as x @ W1.
        b1: [B, H, 4D].
        W2: [B, H, 4D, D], second layer.
        b2: [B, H, D].
    """

    W1: Tensor
    b1: Tensor
    W2: Tensor
    b2: Tensor


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def linear_model(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """f(x) = x W1 + b1 with W1 [B, H, D, D], b1 [B, H, D] and x [B, H, n, D]."""
    W1, b1 = weights
    return x @ W1 + b1.unsqueeze(-2)


def mlp_model(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """f(x) = gelu_tanh(x W1 + b1) W2 + b2 with hidden size 4D; x [B, H, n, D]."""
    W1, b1, W2, b2 = weights
    hidden = gelu_tanh(x @ W1 + b1.unsqueeze(-2))
    return hidden @ W2 + b2.unsqueeze(-2)


def default_token_scale(mini_batch_size: int, dtype: torch.dtype) -> Tensor:
    """token_scale[i] = 1 / (i + 1): token i averages the i + 1 gradients it has seen. [C]."""
    return 1.0 / torch.arange(1, mini_batch_size + 1, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The primal form
# ---------------------------------------------------------------------------------------------


def _per_sample(scalar: Tensor, like: Tensor) -> Tensor:
    """Reshapes a per-(b, h) scalar [B, H] so that it broadcasts against a weight [B, H, ...]."""
    return scalar.reshape(scalar.shape + (1,) * (like.dim() - 2))


def _inner_loss_grads(
    model: InnerModel,
    ln: Callable[[Tensor], Tensor],
    weights: Sequence[Tensor],
    k_j: Tensor,
    v_j: Tensor,
) -> tuple[Tensor, ...]:
    """grad l_j(W) for one token j, for every (b, h) at once.

    Args:
        model: the inner model f.
        ln: the per-head LayerNorm.
        weights: the start weights W, each [B, H, ...].
        k_j: [B, H, 1, D].
        v_j: [B, H, 1, D].

    Returns:
        One gradient per weight, each with that weight's shape.
    """
    reconstruction_target = v_j - k_j
    loss = 0.5 * ((ln(model(weights, k_j)) - reconstruction_target) ** 2).sum(dim=(-2, -1))
    # Summing over (b, h) before differentiating is exact: each (b, h) owns its own weights, so
    # d(sum of losses) / dW[b, h] = d(loss[b, h]) / dW[b, h].
    return torch.autograd.grad(loss.sum(), weights, create_graph=True)


def _mini_batch(
    model: InnerModel,
    ln: Callable[[Tensor], Tensor],
    weights: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    token_scale: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Outputs of one mini-batch of n <= C tokens and the weights W_{n-1} of its last token.

    Args:
        model: the inner model f.
        ln: the per-head LayerNorm.
        weights: the start weights W, each [B, H, ...].
        q, k, v: [B, H, n, D].
        eta: [B, H, n], the per-source-token learning rates.
        token_scale: [n], the per-position scales (the first n entries of the [C] vector).

    Returns:
        out: [B, H, n, D], out_i = q_i + LN(f_{W_i}(q_i)).
        last_weights: W_{n-1}, each [B, H, ...].
    """
    n = q.shape[2]
    grads = [
        _inner_loss_grads(model, ln, weights, k[:, :, j : j + 1], v[:, :, j : j + 1])
        for j in range(n)
    ]
    outputs = []
    for i in range(n):
        # W_i = W - token_scale[i] * sum_{j <= i} eta[j] * grad l_j(W), for each weight tensor.
        weights_i = []
        for p, w in enumerate(weights):
            step = sum(_per_sample(eta[:, :, j], w) * grads[j][p] for j in range(i + 1))
            weights_i.append(w - token_scale[i] * step)
        q_i = q[:, :, i : i + 1]
        outputs.append(q_i + ln(model(weights_i, q_i)))
    return torch.cat(outputs, dim=2), tuple(weights_i)


def _ttt_primal(
    model: InnerModel,
    weights: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    ln_scale: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_scale: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs the mini-batches in order. Inputs in [B, H, T, ...] layout, already in compute dtype.

    Returns:
        out: [B, H, T, D].
        final_weights: the weights after the last complete mini-batch, each [B, H, ...].
    """
    scale, bias = ln_scale[:, None, :], ln_bias[:, None, :]  # [H, 1, D] against [B, H, n, D]

    def ln(z: Tensor) -> Tensor:
        return layer_norm(z, scale, bias)

    T = q.shape[2]
    outputs = []
    for start in range(0, T, mini_batch_size):
        stop = min(start + mini_batch_size, T)
        out, last_weights = _mini_batch(
            model,
            ln,
            weights,
            q[:, :, start:stop],
            k[:, :, start:stop],
            v[:, :, start:stop],
            eta[:, :, start:stop],
            token_scale[: stop - start],
        )
        outputs.append(out)
        # A trailing partial mini-batch is read but never written back into the state.
        if stop - start == mini_batch_size:
            weights = last_weights
    return torch.cat(outputs, dim=2), tuple(weights)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 unless the caller asks for fp64 (gradcheck, tight self checks).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_and_dim(q: Tensor) -> tuple[int, int]:
    if q.dim() != 4 or q.shape[1] == 0:
        raise ValueError(f"q must be [B, T, H, D] with T >= 1, got shape {tuple(q.shape)}")
    return q.shape[2], q.shape[3]


def _run(
    model: InnerModel,
    param_names: tuple[str, ...],
    params: dict[str, Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    ln_scale: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_scale: Tensor | None,
    initial_state: object | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Shared driver of ttt_linear / ttt_mlp: checks, casts, layouts, and grad-mode handling."""
    B, T, H, D = q.shape
    C = mini_batch_size
    if C < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {C}")
    check_shape("k", k, (B, T, H, D))
    check_shape("v", v, (B, T, H, D))
    check_shape("eta", eta, (B, T, H))
    check_shape("ln_scale", ln_scale, (H, D))
    check_shape("ln_bias", ln_bias, (H, D))
    dtype = _compute_dtype(q)
    if token_scale is None:
        token_scale = default_token_scale(C, dtype)
    check_shape("token_scale", token_scale, (C,))

    if initial_state is None:
        weights = [
            params[name].to(dtype).unsqueeze(0).expand(B, *params[name].shape).clone()
            for name in param_names
        ]
    else:
        for name in param_names:
            check_shape(
                f"initial_state.{name}", getattr(initial_state, name), (B, *params[name].shape)
            )
        weights = [getattr(initial_state, name).to(dtype) for name in param_names]

    inputs = (q, k, v, eta, ln_scale, ln_bias, token_scale, *weights)
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    # The inner gradients need autograd even when the caller runs under torch.no_grad().
    with torch.enable_grad():
        # autograd.grad needs start weights that require grad; a fresh leaf cuts no graph when
        # nothing upstream requires grad.
        weights = tuple(
            w if w.requires_grad else w.detach().clone().requires_grad_() for w in weights
        )
        to_bht = [x.to(dtype).transpose(1, 2) for x in (q, k, v, eta)]  # [B, H, T, ...]
        out, final = _ttt_primal(
            model, weights, *to_bht, ln_scale.to(dtype), ln_bias.to(dtype), C, token_scale.to(dtype)
        )
    out = out.transpose(1, 2).to(q.dtype)
    if not needs_graph:  # then the graph built for the inner gradients is of no use outside
        out, final = out.detach(), tuple(w.detach() for w in final)
    return out, final


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    *,
    W1: Tensor,
    b1: Tensor,
    ln_scale: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_scale: Tensor | None = None,
    initial_state: TTTLinearState | None = None,
) -> tuple[Tensor, TTTLinearState]:
    """TTT-Linear, primal form: inner model f(x) = x W1 + b1 per head.

    Args:
        q: [B, T, H, D], queries (the inputs the output is read at).
        k: [B, T, H, D], keys (the inputs of the inner reconstruction loss).
        v: [B, T, H, D], values; the inner target is v - k.
        eta: [B, T, H], learning rate of each source token j.
        W1: [H, D, D], initial inner weights (used when initial_state is None).
        b1: [H, D], initial inner bias.
        ln_scale: [H, D], scale of the per-head LayerNorm inside the inner model.
        ln_bias: [H, D], its bias.
        mini_batch_size: C, tokens per inner mini-batch.
        token_scale: [C], scale of position i in a mini-batch; None means 1 / (i + 1).
        initial_state: per-sample start weights (W1 [B, H, D, D], b1 [B, H, D]); None means the
            parameters W1, b1 broadcast over B.

    Returns:
        o: [B, T, H, D] in q's dtype, o_t = q_t + LN(f_{W_t}(q_t)).
        final_state: TTTLinearState after the last complete mini-batch, in fp32 (fp64 for fp64
            inputs). A trailing partial mini-batch does not update it.
    """
    H, D = _heads_and_dim(q)
    check_shape("W1", W1, (H, D, D))
    check_shape("b1", b1, (H, D))
    names = ("W1", "b1")
    o, final = _run(
        linear_model,
        names,
        {"W1": W1, "b1": b1},
        q,
        k,
        v,
        eta,
        ln_scale,
        ln_bias,
        mini_batch_size,
        token_scale,
        initial_state,
    )
    return o, TTTLinearState(*final)


def ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    *,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    ln_scale: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_scale: Tensor | None = None,
    initial_state: TTTMLPState | None = None,
) -> tuple[Tensor, TTTMLPState]:
    """TTT-MLP, primal form: inner model f(x) = gelu_tanh(x W1 + b1) W2 + b2 per head.

    Args:
        q: [B, T, H, D], queries.
        k: [B, T, H, D], keys.
        v: [B, T, H, D], values; the inner target is v - k.
        eta: [B, T, H], learning rate of each source token j.
        W1: [H, D, 4D], initial first-layer weights.
        b1: [H, 4D].
        W2: [H, 4D, D], initial second-layer weights.
        b2: [H, D].
        ln_scale: [H, D], scale of the per-head LayerNorm inside the inner model.
        ln_bias: [H, D], its bias.
        mini_batch_size: C, tokens per inner mini-batch.
        token_scale: [C], scale of position i in a mini-batch; None means 1 / (i + 1).
        initial_state: per-sample start weights with fields W1, b1, W2, b2 ([B, H, ...]); None
            means the parameters broadcast over B.

    Returns:
        o: [B, T, H, D] in q's dtype.
        final_state: TTTMLPState after the last complete mini-batch, in fp32 (fp64 for fp64
            inputs).
    """
    H, D = _heads_and_dim(q)
    check_shape("W1", W1, (H, D, 4 * D))
    check_shape("b1", b1, (H, 4 * D))
    check_shape("W2", W2, (H, 4 * D, D))
    check_shape("b2", b2, (H, D))
    names = ("W1", "b1", "W2", "b2")
    params = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    o, final = _run(
        mlp_model,
        names,
        params,
        q,
        k,
        v,
        eta,
        ln_scale,
        ln_bias,
        mini_batch_size,
        token_scale,
        initial_state,
    )
    return o, TTTMLPState(*final)
