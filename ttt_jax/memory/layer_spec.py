"""A layer at a given shape, named the way the command line names it (`--layer ttt_linear ...`).

The layers are the model registry's TTT families (`ttt_jax.models.registry`), and a spec builds
its layer config the way a model does: from what a model shares with its layers (`Shared`) and
the family's options, here at their defaults but for the shape flags below.
"""

from __future__ import annotations

import dataclasses

from ttt_jax.layers import MixedPrecision
from ttt_jax.memory.layer_workload import LayerWorkload
from ttt_jax.models import FAMILIES, Shared
from ttt_jax.models.config import OPTIONS

# Every family but the baselines (attention, the plain SwiGLU MLP), by registry name.
LAYERS = tuple(name for name in FAMILIES if name not in ("attention", "swiglu"))


def _option_fields(name: str) -> tuple[str, ...]:
    section = FAMILIES[name].options
    return () if section is None else tuple(f.name for f in dataclasses.fields(OPTIONS[section]))


# Layers whose op has a choice of backward (`custom` / `autodiff`).
BACKWARD_LAYERS = tuple(n for n in LAYERS if "backward" in _option_fields(n))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer at a given shape.

    Attributes:
      layer: one of `LAYERS`: `ttt_linear` / `ttt_mlp` (`TTTLayer`), `lact` (`LaCTLayer`: its
        window attention and fast weights; on the CPU, XLA's attention materialises the
        `[B, H, T, T]` scores, which dominate at long T), `inplace_ttt` (`InPlaceMLP`, targets
        from its input), `npt` (`NPTMLP`, low-rank, modulated by its input).
      seq: sequence length T.
      batch: batch size B.
      d_model: model width (the 125M shape is 768 with 12 heads).
      heads: number of heads (TTT layers; LaCT's attention and fast-weight heads, with
        low-rank starts of rank min(32, d_model / heads)).
      mini_batch: TTT mini-batch size C (ttt_linear, ttt_mlp).
      chunk: tokens per fast-weight update of `lact` and `inplace_ttt` (None: the options'
        default, 2048 and 1024).
      d_ff: MLP hidden width of `inplace_ttt` / `npt` (None: 4 * d_model).
      checkpoint_group: inner-scan remat group (None: no remat; "default": the options' own
        default, 4 for TTT layers, none for the others).
      remat_policy: policy name inside a group.
      backward: `lact` / `inplace_ttt`: "custom" or "autodiff" (None: custom, except
        `inplace_ttt` with a checkpoint group: its custom backward keeps no per-chunk state, so
        the knobs act on the autodiff one).
      precision: "fp32" or "bf16" (fp32 params and state, bf16 compute).
    """

    layer: str = "ttt_linear"
    seq: int = 2048
    batch: int = 1
    d_model: int = 768
    heads: int = 12
    mini_batch: int = 16
    chunk: int | None = None
    d_ff: int | None = None
    checkpoint_group: int | None | str = "default"
    remat_policy: str | None = None
    backward: str | None = None
    precision: str = "bf16"

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer={self.layer!r} is not one of {', '.join(LAYERS)}")
        for name in ("seq", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.backward is not None and self.layer not in BACKWARD_LAYERS:
            raise ValueError(
                f"backward={self.backward!r} applies to {', '.join(BACKWARD_LAYERS)}, "
                f"not layer={self.layer!r}"
            )

    def workload(self) -> LayerWorkload:
        """The layer config this spec names, as a workload (raises the config's own errors)."""
        family = FAMILIES[self.layer]
        shared = Shared(
            d_model=self.d_model,
            num_heads=self.heads,
            d_ff=self.d_ff or 4 * self.d_model,
            precision=MixedPrecision.named(self.precision),
        )
        fields = _option_fields(self.layer)
        knobs = dict(remat_policy=self.remat_policy)
        if self.checkpoint_group != "default":
            knobs.update(checkpoint_group=self.checkpoint_group)
        if not family.recurrent:
            if knobs.get("checkpoint_group") is not None or self.remat_policy is not None:
                raise ValueError(f"layer={self.layer!r} has no scan: drop checkpoint_group/policy")
            knobs = {}
        if "mini_batch_size" in fields:
            knobs.update(mini_batch_size=self.mini_batch)
        if "chunk_size" in fields and self.chunk is not None:
            knobs.update(chunk_size=self.chunk)
        if "target_source" in fields:
            knobs.update(target_source="input")  # the layer's input doubles as its targets X0
        if "backward" in fields:
            lean = self.layer == "inplace_ttt" and knobs.get("checkpoint_group") is not None
            knobs.update(backward=self.backward or ("autodiff" if lean else "custom"))
        options = None
        if family.options is not None:
            options = dataclasses.replace(OPTIONS[family.options](), **knobs)
        return LayerWorkload(family.layer_config(shared, options))
