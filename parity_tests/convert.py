"""Conversion between the JAX layers' parameters and the torch reference's.

Both sides store every weight in math convention (`x @ W`) under the same names, so the
conversion is a copy by name; what differs is the container (NNX `Param` vs `nn.Parameter`),
and a few config defaults, which `ttt_config_to_torch` makes explicit.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import torch
from flax import nnx

import ttt_torch_ref
from ttt_jax.layers import TTTConfig, TTTLayer


def to_torch(x, dtype=torch.float32, requires_grad: bool = False) -> torch.Tensor:
    t = torch.tensor(np.asarray(jax.device_get(x), dtype=np.float32), dtype=dtype)
    return t.requires_grad_(requires_grad)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def state_to_torch(state, requires_grad: bool = False):
    """A JAX op state (`TTTLinearState` / `TTTMLPState`) as the reference's state dataclass."""
    fields = {
        f.name: to_torch(getattr(state, f.name), requires_grad=requires_grad)
        for f in dataclasses.fields(state)
    }
    cls = ttt_torch_ref.TTTLinearState if "W2" not in fields else ttt_torch_ref.TTTMLPState
    return cls(**fields)


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
