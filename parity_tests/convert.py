"""Conversion between the JAX layers' parameters and the torch reference's.

Both sides store every weight in math convention (`x @ W`), so the conversion is a copy by
name (with a rename table where the two spell a name differently); what differs is the
container (NNX `Param` vs `nn.Parameter`), and a few config defaults, which the
`*_config_to_torch` functions make explicit. Every converter checks that each parameter on one
side has exactly one counterpart of the same shape on the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import ttt_torch_ref
from ttt_jax.layers import (
    InPlaceMLP,
    InPlaceMLPConfig,
    LaCTConfig,
    LaCTLayer,
    NPTBlock,
    NPTBlockConfig,
    NPTMLPConfig,
    TTTConfig,
    TTTLayer,
)
from ttt_jax.layers.npt_mlp import NPTMLP


def to_torch(x, dtype=None, requires_grad: bool = False) -> torch.Tensor:
    """A JAX array as a torch tensor: fp64 stays fp64, anything else becomes fp32 (or `dtype`)."""
    a = np.asarray(jax.device_get(x))
    a = a if a.dtype == np.float64 else a.astype(np.float32)
    if dtype is None:
        dtype = torch.float64 if a.dtype == np.float64 else torch.float32
    return torch.tensor(a, dtype=dtype).requires_grad_(requires_grad)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy: fp64 stays fp64, anything else becomes fp32."""
    t = t.detach().cpu()
    return (t if t.dtype == torch.float64 else t.to(torch.float32)).numpy()


def state_to_torch(state, requires_grad: bool = False):
    """A JAX op state (TTT-Linear/MLP, In-Place, LaCT) as the reference's state dataclass."""
    fields = {
        f.name: to_torch(getattr(state, f.name), requires_grad=requires_grad)
        for f in dataclasses.fields(state)
    }
    if set(fields) == {"w_down"}:
        return ttt_torch_ref.InPlaceTTTState(**fields)
    if set(fields) == {"w0", "w1", "w2", "m0", "m1", "m2"}:
        return ttt_torch_ref.LaCTState(**fields)
    cls = ttt_torch_ref.TTTLinearState if "W2" not in fields else ttt_torch_ref.TTTMLPState
    return cls(**fields)


def lact_state_to_torch(state, requires_grad: bool = False) -> ttt_torch_ref.LaCTState:
    """A JAX `LaCTState` (w0, w1, w2, m0, m1, m2, each `[B, H, ...]`) as the reference's."""
    ref = state_to_torch(state, requires_grad)
    if not isinstance(ref, ttt_torch_ref.LaCTState):
        raise ValueError(f"not a LaCT state: fields {[f.name for f in dataclasses.fields(state)]}")
    return ref


def jax_param_names(layer: nnx.Module) -> dict[str, jax.Array]:
    """Every parameter of an NNX layer by dotted path (`mlp.W_gate`)."""
    flat = nnx.to_flat_state(nnx.state(layer, nnx.Param))
    return {".".join(map(str, path)): v[...] for path, v in flat}


def copy_params(
    layer: nnx.Module,
    ref: torch.nn.Module,
    renames: dict[str, str] | None = None,
    reshaped: frozenset[str] = frozenset(),
):
    """Copy a JAX layer's parameters into a torch module, one to one by (renamed) name.

    Args:
        layer: the NNX layer.
        ref: the torch module; its `named_parameters()` names are the targets.
        renames: JAX name -> torch name where they differ; other names are kept.
        reshaped: torch names whose JAX array is the same elements in another shape (row-major
            reshape, e.g. `[d, 3, d]` -> `[d, 3d]`); every other shape must match exactly.

    Raises:
        ValueError: a parameter without a counterpart on either side, or a shape mismatch.
    """
    renames = renames or {}
    src = {renames.get(n, n): v for n, v in jax_param_names(layer).items()}
    dst = dict(ref.named_parameters())
    if set(src) != set(dst):
        raise ValueError(
            f"parameters differ: JAX only {sorted(set(src) - set(dst))}, "
            f"torch only {sorted(set(dst) - set(src))}"
        )
    with torch.no_grad():
        for name, p in dst.items():
            value = src[name]
            if name in reshaped and value.size == p.numel():
                value = value.reshape(tuple(p.shape))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: JAX shape {src[name].shape} vs torch {tuple(p.shape)}")
            p.copy_(to_torch(value, dtype=p.dtype))
    return ref


def ttt_config_to_torch(config: TTTConfig) -> ttt_torch_ref.TTTLayerConfigRef:
    return ttt_torch_ref.TTTLayerConfigRef(
        d_model=config.d_model,
        num_heads=config.num_heads,
        inner=config.inner,
        mini_batch_size=config.mini_batch_size,
        base_lr=config.lr_scale,
        backbone=config.backbone,
        rope_theta=config.rope_theta,
        conv_width=config.conv_width,
    )


def ttt_layer_to_torch(layer: TTTLayer) -> ttt_torch_ref.TTTLayerRef:
    """A torch reference layer holding exactly the JAX layer's parameters."""
    if layer.config.mlp_ratio != 4:
        raise ValueError("the torch reference fixes the TTT-MLP hidden width at 4 * head_dim")
    ref = ttt_torch_ref.TTTLayerRef(ttt_config_to_torch(layer.config))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            value = getattr(layer, name)[...]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: JAX shape {value.shape} vs torch {tuple(p.shape)}")
            p.copy_(to_torch(value))
    missing = set(nnx.state(layer, nnx.Param).keys()) - {n for n, _ in ref.named_parameters()}
    if missing:
        raise ValueError(f"JAX parameters without a torch counterpart: {sorted(map(str, missing))}")
    return ref


# --- In-Place TTT (SPEC 3.3) ---------------------------------------------------------------

INPLACE_RENAMES = {"w_gate": "W_gate", "w_up": "W_up", "w_down": "W_down"}


def inplace_config_to_torch(config: InPlaceMLPConfig) -> ttt_torch_ref.InPlaceMLPConfigRef:
    return ttt_torch_ref.InPlaceMLPConfigRef(
        d_model=config.d_model,
        d_ff=config.d_ff,
        chunk_size=config.chunk_size,
        eta=config.eta,
        conv_mode=config.conv_mode,
        target_source={"embeddings": "embedding", "input": "input"}[config.target_source],
        clip_tau=config.clip_tau,
        activation=config.activation,
    )


def inplace_mlp_to_torch(layer: InPlaceMLP) -> ttt_torch_ref.InPlaceMLPRef:
    """A torch `InPlaceMLPRef` holding exactly the JAX `InPlaceMLP`'s parameters."""
    if not layer.config.ttt:
        raise ValueError("the reference has no ttt=False baseline; convert a TTT layer")
    ref = ttt_torch_ref.InPlaceMLPRef(inplace_config_to_torch(layer.config))
    return copy_params(layer, ref, INPLACE_RENAMES)


# --- NPT (SPEC 3.4) --------------------------------------------------------------------------


def npt_mlp_config_to_torch(config: NPTMLPConfig) -> ttt_torch_ref.NPTMLPConfigRef:
    return ttt_torch_ref.NPTMLPConfigRef(
        d_model=config.d_model,
        d_ff=config.d_ff,
        rank=config.rank,
        d_mod=config.mod_width,
        scale=config.mod_scale,
        modulation=config.modulation,
        k=config.k,
        reg_lambda=config.reg_lambda,
    )


def npt_mlp_to_torch(layer: NPTMLP) -> ttt_torch_ref.NPTMLPRef:
    """A torch `NPTMLPRef` holding exactly the JAX `NPTMLP`'s parameters (either rank-k form)."""
    ref = ttt_torch_ref.NPTMLPRef(npt_mlp_config_to_torch(layer.config))
    return copy_params(layer, ref)


def npt_block_config_to_torch(config: NPTBlockConfig) -> ttt_torch_ref.NPTBlockConfigRef:
    return ttt_torch_ref.NPTBlockConfigRef(
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        mlp=npt_mlp_config_to_torch(config.mlp),
        attn_residual=config.attn_residual,
        rope_theta=config.rope_theta,
        norm_eps=config.norm_eps,
    )


def npt_block_to_torch(block: NPTBlock) -> ttt_torch_ref.NPTBlockRef:
    """A torch `NPTBlockRef` holding exactly the JAX `NPTBlock`'s parameters."""
    ref = ttt_torch_ref.NPTBlockRef(npt_block_config_to_torch(block.config))
    return copy_params(block, ref)


# --- LaCT (SPEC 3.2) -------------------------------------------------------------------------


def lact_config_to_torch(config: LaCTConfig) -> ttt_torch_ref.LaCTLayerConfigRef:
    """The reference config of the same layer; the JAX-only knobs (memory, attention kernel)
    change no number the reference computes and have no counterpart. A bf16 compute dtype
    becomes the reference's `operand_dtype`, so that the reference's op reads the same
    bf16-rounded q, k, v the layer's op reads (Newton-Schulz amplifies any difference there)."""
    bf16 = jnp.dtype(config.precision.compute_dtype) == jnp.bfloat16
    return ttt_torch_ref.LaCTLayerConfigRef(
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_fw_heads=config.num_fw_heads,
        fw_hidden=config.fw_hidden_dim,
        window=config.window,
        chunk_size=config.chunk_size,
        rank=config.rank if config.rank is not None else 1,
        base_lr=config.base_lr,
        use_momentum=config.use_momentum,
        use_muon=config.use_muon,
        weight_norm=config.weight_norm,
        learnable_scale=config.learnable_scale,
        rope_theta=config.rope_theta,
        norm_eps=config.norm_eps,
        operand_dtype=torch.bfloat16 if bf16 else None,
    )


class DenseStartLaCTLayerRef(ttt_torch_ref.LaCTLayerRef):
    """The reference layer with dense start weights `w0, w2 [H, Dh, D]` in place of the
    low-rank factors (the reference itself is always low rank; the JAX layer's `rank=None`).
    Everything else is the reference's own code."""

    def __init__(self, config: ttt_torch_ref.LaCTLayerConfigRef):
        super().__init__(config)
        H, D, Dh = config.num_fw_heads, config.fw_head_dim, config.fw_hidden
        for name in ("w0_left", "w0_right", "w2_left", "w2_right"):
            delattr(self, name)
        self.w0 = torch.nn.Parameter(torch.zeros(H, Dh, D))
        self.w2 = torch.nn.Parameter(torch.zeros(H, Dh, D))

    def slow_weights(self):
        return self.w0, self.w1, self.w2


def lact_layer_to_torch(layer: LaCTLayer, dtype=torch.float32) -> ttt_torch_ref.LaCTLayerRef:
    """A torch reference layer (in `dtype`) holding exactly the JAX `LaCTLayer`'s parameters;
    `W_qkv [d, 3, d]` becomes the reference's `[d, 3d]` (columns q | k | v)."""
    cfg = lact_config_to_torch(layer.config)
    ref = ttt_torch_ref.LaCTLayerRef(cfg) if layer.config.rank else DenseStartLaCTLayerRef(cfg)
    return copy_params(layer, ref.to(dtype), reshaped=frozenset({"W_qkv"}))
