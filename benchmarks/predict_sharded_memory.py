"""Per-device memory of a sharded train step, predicted by the compiler on abstract shapes.

Builds the real train step (`train.state.make_setup`: the same shardings, optimizer and jit as
`python -m train`) for a preset on a mesh of N devices, lowers it on abstract state and batch
(nothing is allocated) and prints `compiled.memory_analysis()` per device. On a CPU, fake the
devices with `XLA_FLAGS=--xla_force_host_platform_device_count=N`:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \\
        python benchmarks/predict_sharded_memory.py --preset lact-760m --seqs 16384 32768 \\
        --mesh 1 8 1 --block-remat full --out benchmarks/results/predict_lact760m_fsdp8_cpu.json

Caveat: the CPU compiler has no flash attention, so attention (and LaCT's sliding-window
branch) materialises its `[B, H, T, T]` scores for the block being computed; on a GPU with
cuDNN those are not stored. CPU predictions are upper bounds for models with attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp

from train.config import MeshConfig, TrainConfig
from train.sharding import make_mesh
from train.state import BATCH_KEYS, make_setup
from ttt_jax.models import preset

GIB = 2**30
DTYPES = {"tokens": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32}


def predict(name: str, seq: int, batch: int, mesh: tuple[int, int, int], block_remat: str):
    """Per-device memory figures (bytes) of the compiled train step, and its compile time."""
    model = dataclasses.replace(preset(name), block_remat=block_remat)
    cfg = TrainConfig(
        preset=name,
        model=model,
        seq=seq,
        batch_size=batch,
        mesh=MeshConfig(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
    )
    setup = make_setup(cfg, make_mesh(cfg.mesh.sizes))
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            (1, batch, seq), DTYPES.get(k, jnp.float32), sharding=setup.batch_sharding
        )
        for k in BATCH_KEYS
    }
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract_state, abstract_batch).compile()
    m = compiled.memory_analysis()
    return {
        "preset": name,
        "seq": seq,
        "batch": batch,
        "mesh": {"data": mesh[0], "fsdp": mesh[1], "tensor": mesh[2]},
        "block_remat": block_remat,
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        # Donated state aliases its output: live at once are arguments, temporaries and the
        # outputs that are not aliased.
        "peak_bytes": m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes,
        "compile_s": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lact-760m")
    p.add_argument("--seqs", nargs="+", type=int, default=[16384, 32768])
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--mesh", nargs=3, type=int, default=[1, 8, 1], help="data fsdp tensor")
    p.add_argument("--block-remat", default="full")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    mesh = tuple(args.mesh)
    n = mesh[0] * mesh[1] * mesh[2]
    rows = [
        predict(args.preset, t, args.batch_per_device * n // mesh[2], mesh, args.block_remat)
        for t in args.seqs
    ]
    env = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(env))
    print("\n| preset | T | batch | mesh (d,f,t) | block remat | args GiB | temp GiB | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['seq']} | {r['batch']} | {tuple(r['mesh'].values())} | "
            f"{r['block_remat']} | {r['argument_bytes'] / GIB:.2f} | "
            f"{r['temp_bytes'] / GIB:.2f} | {r['peak_bytes'] / GIB:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
