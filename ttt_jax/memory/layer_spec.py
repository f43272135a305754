"""A layer at a given shape, named the way the command line names it (`--layer ttt_linear ...`)."""

from __future__ import annotations

import dataclasses

from ttt_jax.layers import InPlaceMLPConfig, LaCTConfig, MixedPrecision, NPTMLPConfig, TTTConfig
from ttt_jax.memory.layer_workload import LayerWorkload

LAYERS = ("ttt_linear", "ttt_mlp", "lact", "inplace", "npt")
# Layers whose op has a choice of backward (`custom` / `autodiff`).
BACKWARD_LAYERS = ("lact", "inplace")
DEFAULT_CHUNK = {"lact": 2048, "inplace": 1024}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer at a given shape.

    Attributes:
      layer: one of `LAYERS`: `ttt_linear` / `ttt_mlp` (`TTTLayer`), `lact` (`LaCTLayer`: its
        window attention and fast weights; on the CPU, XLA's attention materialises the
        `[B, H, T, T]` scores, which dominate at long T), `inplace` (`InPlaceMLP`, targets from
        its input), `npt` (`NPTMLP`, low-rank, modulated by its input).
      seq: sequence length T.
      batch: batch size B.
      d_model: model width (the 125M shape is 768 with 12 heads).
      heads: number of heads (TTT layers; LaCT's attention and fast-weight heads, with
        low-rank starts of rank min(32, d_model / heads)).
      mini_batch: TTT mini-batch size C (ttt_linear, ttt_mlp).
      chunk: tokens per fast-weight update of `lact` (None: 2048) and `inplace` (None: 1024).
      d_ff: MLP hidden width of `inplace` / `npt` (None: 4 * d_model).
      checkpoint_group: inner-scan remat group (None: no remat; "default": the layer config's
        own default, 4 for TTT layers, none for the others).
      remat_policy: policy name inside a group.
      backward: `lact` / `inplace`: "custom" or "autodiff" (None: custom, except `inplace` with
        a checkpoint group: its custom backward keeps no per-chunk state, so the knobs act on
        the autodiff one).
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
        precision = MixedPrecision.named(self.precision)
        d_ff = self.d_ff or 4 * self.d_model
        chunk = self.chunk or DEFAULT_CHUNK.get(self.layer)
        knobs = dict(remat_policy=self.remat_policy)
        if self.checkpoint_group != "default":
            knobs.update(checkpoint_group=self.checkpoint_group)
        group = knobs.get("checkpoint_group")
        if self.layer in ("ttt_linear", "ttt_mlp"):
            config = TTTConfig(
                d_model=self.d_model,
                num_heads=self.heads,
                inner="linear" if self.layer == "ttt_linear" else "mlp",
                mini_batch_size=self.mini_batch,
                precision=precision,
                **knobs,
            )
            return LayerWorkload(config)
        if self.layer == "lact":
            config = LaCTConfig(
                d_model=self.d_model,
                num_heads=self.heads,
                num_fw_heads=self.heads,
                chunk_size=chunk,
                rank=min(32, self.d_model // self.heads),
                backward=self.backward or "custom",
                precision=precision,
                **knobs,
            )
            return LayerWorkload(config)
        if self.layer == "inplace":
            backward = self.backward or ("custom" if group is None else "autodiff")
            config = InPlaceMLPConfig(
                d_model=self.d_model,
                d_ff=d_ff,
                chunk_size=chunk,
                target_source="input",
                backward=backward,
                **knobs,
            )
            return LayerWorkload(config, precision=precision)
        if group is not None or self.remat_policy is not None:
            raise ValueError(f"layer={self.layer!r} has no scan: drop checkpoint_group/policy")
        return LayerWorkload(NPTMLPConfig(d_model=self.d_model, d_ff=d_ff, precision=precision))
