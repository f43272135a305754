"""The optimizer: AdamW (or Muon for matrices) with warmup + cosine decay and global-norm clipping.

Weight decay applies to projection matrices only, told apart by their logical axes: at least
two axes besides the stacked `layers` one, one of them the model width (`embed`) or the MLP
width (`mlp`), none a depthwise-conv tap (`conv`). So norms and biases (one axis, or per-head
`[heads, head_dim]` norms), per-channel scales and offsets and depthwise convs are not decayed,
and neither are the initial values of fast weights (`ttt_jax.models.registry`, e.g. TTT's
W1/b1, LaCT's w0/w1/w2): decay would pull the inner model's starting point to zero, which the
inner loop then has to undo in every sequence.

Muon (`optax.contrib.muon`) orthogonalises the updates of projection matrices (parameters with
an `embed` axis and at least one other, not the vocab ones); every other parameter gets Muon's
built-in AdamW. Its matrix learning rate is `muon_lr` on the same schedule shape.

Training only some parameters (`--only-new-params`, `trainable`): the rule above (clipping
included, so the frozen gradients do not count in the clipped norm) runs on the trainable
parameters alone (`optax.multi_transform`), the others get a zero update and keep no moments.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P

from ttt_jax.models import MIXERS, MLPS

# The parameter names that hold a fast weight's initial value, per block part (the path
# component a block's mixer, MLP or retrofitted branch, a mixer family, sits under), from the
# families' registry entries.
FAST_WEIGHTS = {
    part: {name for family in families.values() for name in family.fast_weights}
    for part, families in (("mixer", MIXERS), ("mlp", MLPS), ("branch", MIXERS))
}


def schedule(lr: float, warmup: int, total: int, min_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine to `min_ratio * lr`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=lr * min_ratio,
    )


def _names(path) -> list:
    return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def _core_axes(spec: P) -> tuple:
    return tuple(a for a in spec if a != "layers")


def _fast_weight(names: list) -> bool:
    return any(part in names and names[-1] in fast for part, fast in FAST_WEIGHTS.items())


def decay_mask(params, logical_specs):
    """True where weight decay applies (module docstring); same tree as params."""

    def decide(path, spec, leaf):
        del leaf
        names, core = _names(path), _core_axes(spec)
        matrix = len(core) > 1 and ("embed" in core or "mlp" in core) and "conv" not in core
        return matrix and not _fast_weight(names)

    return jax.tree_util.tree_map_with_path(
        decide, logical_specs, params, is_leaf=lambda s: isinstance(s, P)
    )


def muon_dims(params, logical_specs):
    """Muon dimension numbers per leaf (None: AdamW), from the logical axis names."""
    from optax.contrib import MuonDimensionNumbers

    def decide(path, spec, leaf):
        del leaf
        names, core = _names(path), _core_axes(spec)
        offset = len(spec) - len(core)
        if len(core) < 2 or "embed" not in core or "vocab" in core or _fast_weight(names):
            return None
        return MuonDimensionNumbers(
            reduction_axis=(offset,), output_axis=tuple(range(offset + 1, len(spec)))
        )

    return jax.tree_util.tree_map_with_path(
        decide, logical_specs, params, is_leaf=lambda s: isinstance(s, P)
    )


def make_optimizer(
    cfg, total_steps: int, params, logical_specs, trainable=None
) -> optax.GradientTransformation:
    """The full update rule from an `OptimConfig` (`train.config`).

    `trainable`: a bool tree shaped like `params` (None: all train); the others are frozen
    (module docstring).
    """
    sched = schedule(cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    mask = decay_mask(params, logical_specs)
    dims = muon_dims(params, logical_specs) if cfg.muon else None
    if trainable is not None:
        # The rule runs on the trainable subtree, whose frozen leaves optax masks out: the
        # per-leaf trees it takes are masked the same way.
        def only(tree):
            # `trainable` first: its leaves are a prefix of the tree (a Muon leaf is a tuple).
            return jax.tree.map(lambda t, x: x if t else optax.MaskedNode(), trainable, tree)

        mask, dims = only(mask), None if dims is None else only(dims)
    if cfg.muon:
        try:
            from optax.contrib import muon
        except ImportError as err:
            raise ValueError(
                f"--optim.muon needs optax.contrib.muon, which optax {optax.__version__} lacks"
            ) from err
        inner = muon(
            learning_rate=schedule(cfg.muon_lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio),
            weight_decay=cfg.weight_decay,
            weight_decay_mask=mask,
            adam_b1=cfg.b1,
            adam_b2=cfg.b2,
            adam_weight_decay=cfg.weight_decay,
            adam_learning_rate=sched,
            muon_weight_dimension_numbers=dims,
        )
    else:
        inner = optax.adamw(
            sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    rule = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), inner)
    if trainable is None:
        return rule
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": rule, "frozen": optax.set_to_zero()}, labels)
