"""Fine-tuning a ~0.5B pretrained architecture with and without a TTT retrofit (issue 19):
tokens/s and peak memory of the training step at T=8192, batch 1, one JSON line per config.

The model is Qwen2.5-0.5B's architecture (its `config.json` values below, read by
`ttt_jax.convert.config_from_hf`: 24 layers, d=896, 14 query / 2 key-value heads, F=4864,
vocab 151936, tied, q/k/v biases) with random weights: nothing is downloaded, and the step costs
the same whatever the weights. Each config runs in a fresh process (its own allocator peak),
through the trainer's own setup (`train.state.make_setup`: the optimizer, the jitted step and,
for `+only_new`, the frozen pretrained parameters of `--only-new-params`). The retrofits go
into every 4th layer (3, 7, ..., 23: a scan period of 4 blocks).

On the GPU (a few minutes of device time):

    python benchmarks/bench_retrofit.py --budget-s 480 --out benchmarks/results/retrofit_h100.jsonl

`--configs` picks among CONFIGS (default: all, in order, until the budget is spent; a config
that would start past it is reported as skipped). Block remat defaults to `full`: without it
the full fine-tune's step ran out of memory on an H100 (80 GB) at T=8192 (a 38.5 GiB temporary
on top of the rest), as did the In-Place and TTT-Linear retrofits.

Measured on one H100 (jax 0.11.2, 2026-12-07; benchmarks/results/retrofit_qwen05b_t8192_h100.jsonl,
5-6 steps each, medians after 2, device time ran out before the other configs):

| config | block remat | tokens/s | peak memory |
|---|---|---|---|
| pretrained (no retrofit) | full | 48,032 | 20.28 GiB |
| ttt_linear branch in 6 layers | full | 38,162 (0.79x) | 20.31 GiB |
| ttt_linear branch, `+only_new` | none | 50,141 | 39.61 GiB |
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import environment, run_in_subprocess  # noqa: E402

# Qwen2.5-0.5B's config.json (the fields that shape the model).
QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 21,
}

EVERY_4TH = tuple(range(3, 24, 4))

# name -> (RetrofitOptions fields, train only the new parameters)
CONFIGS = {
    "pretrained": ({}, False),
    "inplace": ({"inplace_layers": EVERY_4TH}, False),
    "npt": ({"npt_layers": EVERY_4TH}, False),
    "ttt_linear": ({"branch_layers": EVERY_4TH}, False),
    "ttt_mlp": ({"branch_layers": EVERY_4TH, "branch": "ttt_mlp"}, False),
    "lact": ({"branch_layers": EVERY_4TH, "branch": "lact"}, False),
    "inplace+only_new": ({"inplace_layers": EVERY_4TH}, True),
    "ttt_linear+only_new": ({"branch_layers": EVERY_4TH}, True),
}


def run_one(spec: dict) -> dict:
    """Compiles and times the training step of one config (in this process)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from harness import peak_bytes

    from train.config import TrainConfig
    from train.sharding import make_mesh
    from train.state import make_setup
    from ttt_jax.convert import config_from_hf
    from ttt_jax.data import DataConfig
    from ttt_jax.models import param_counts
    from ttt_jax.models.options import InPlaceOptions, RetrofitOptions

    fields, only_new = CONFIGS[spec["name"]]
    model = config_from_hf(
        QWEN25_05B,
        precision=spec["precision"],
        block_remat=spec["block_remat"],
        inplace=InPlaceOptions(chunk_size=spec["inplace_chunk"]),
        retrofit=RetrofitOptions(**fields),
    )
    cfg = TrainConfig(
        model=model,
        data=DataConfig(segments=False),
        seq=spec["seq"],
        batch_size=spec["batch"],
        steps=spec["steps"],
    )
    # `only_new_params` needs `init_from` in a TrainConfig; the setup reads the fields alone,
    # and random weights cost the same as pretrained ones.
    cfg = types.SimpleNamespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    cfg.only_new_params = only_new
    mesh = make_mesh((-1, 1, 1))
    setup = make_setup(cfg, mesh)
    state = setup.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (1, spec["batch"], spec["seq"] + 1), np.int32)
    batch = {
        "tokens": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "segment_ids": np.zeros_like(tokens[..., 1:]),
        "loss_mask": np.ones(tokens[..., 1:].shape, np.float32),
    }
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, setup.batch_sharding)
    t0 = time.perf_counter()
    step = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    analysis = step.memory_analysis()
    times, losses = [], []
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # syncs
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    counts = param_counts(model)
    peak = peak_bytes()
    return {
        "name": spec["name"],
        "retrofit": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        "only_new_params": only_new,
        "seq": spec["seq"],
        "batch": spec["batch"],
        "precision": spec["precision"],
        "block_remat": spec["block_remat"],
        "scan_period": model.period,
        "params_m": counts["total"] / 1e6,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": spec["seq"] * spec["batch"] / step_s,
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "xla_temp_gib": None if analysis is None else analysis.temp_size_in_bytes / 2**30,
        "loss_first_last": [losses[0], losses[-1]],
        **environment(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--block-remat", default="full")
    p.add_argument("--inplace-chunk", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget, all configs")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    start = time.perf_counter()
    for name in args.configs:
        spec = dict(
            name=name, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup,
            precision=args.precision, block_remat=args.block_remat,
            inplace_chunk=args.inplace_chunk,
        )  # fmt: skip
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            row = dict(spec, skipped=f"budget ({args.budget_s:.0f} s) spent")
        else:
            row = run_in_subprocess(__file__, spec, timeout=left)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
