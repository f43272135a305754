"""What the run prints: a start banner (versions, devices, mesh, parameters) and the final
summary table."""

from __future__ import annotations

import platform

import flax
import jax
import optax
import orbax.checkpoint as ocp


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def banner(cfg, mesh, counts: dict, flops: float, data_info: str, resumed: int | None) -> str:
    """The lines printed at start (process 0)."""
    devices = jax.devices()
    m = cfg.model
    period = ", ".join(m.pattern)
    run = f"resumed from step {resumed}" if resumed is not None else "new run"
    if cfg.init_from is not None and resumed is None:
        run += f", initialised from {cfg.init_from}"
    r = m.retrofit
    recipes = [
        f"{what} in layers {list(layers)}"
        for what, layers in (
            ("In-Place TTT MLP", r.inplace_layers),
            ("NPT MLP", r.npt_layers),
            (f"gated {r.branch} branch", r.branch_layers),
        )
        if layers
    ]
    if recipes:
        trained = "only the new parameters train" if cfg.only_new_params else "all parameters train"
        period = f"{period}; retrofit: {', '.join(recipes)}; {trained}; scan period {m.period}"
    return "\n".join(
        [
            f"ttt-jax train | python {platform.python_version()} jax {jax.__version__} "
            f"flax {flax.__version__} optax {optax.__version__} orbax "
            f"{getattr(ocp, '__version__', '?')}",
            f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}) over "
            f"{jax.process_count()} process(es) | mesh "
            + " ".join(f"{k}={v}" for k, v in mesh.shape.items()),
            f"model: {cfg.preset if cfg.init_from is None else cfg.init_from}  [{period}] x "
            f"{m.repeats}  d_model={m.d_model} "
            f"layers={m.num_layers} heads={m.num_heads} d_ff={m.d_ff} vocab={m.vocab_size}  "
            f"precision={m.precision} block_remat={m.block_remat}",
            f"params: {_millions(counts['total'])} total ({_millions(counts['embedding'])} "
            f"embedding, {_millions(counts['non_embedding'])} non-embedding) | "
            f"{flops / 1e6:.1f} MFLOP/token (train)",
            f"data: {data_info} | batch {cfg.batch_size} x {cfg.seq} tokens, grad_accum "
            f"{cfg.grad_accum}, {cfg.steps} steps",
            f"run dir: {cfg.resolved_run_dir} ({run})",
        ]
    )


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if isinstance(v, float) else str(v)


def summary(rows: dict) -> str:
    """A two-column table of the final numbers (`None` prints as n/a)."""
    width = max(len(k) for k in rows)
    lines = ["", "=" * 20 + " summary " + "=" * 20]
    lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in rows.items()]
    lines.append("=" * 49)
    return "\n".join(lines)
