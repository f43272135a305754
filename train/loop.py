"""The training loop: set up, resume, train, evaluate, checkpoint, report.

`run(cfg)` returns the process exit code (`train.signals`): 0 done (or stopped at
`stop_after`), 3 non-finite loss, 75 stopped by SIGTERM/SIGINT after saving a checkpoint.
It raises `ValueError` for bad configuration, data or run directory (naming the flag, the file
or the path) and `train.checkpoint.CheckpointError` when the run directory holds checkpoints of
which none verifies; neither changes what the run directory holds (`--fresh` aside).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.batching import sharded_batch
from train.checkpoint import Checkpointer
from train.metrics import MetricsLog, compiled_bytes, peak_flops, peak_memory_bytes
from train.progress import progress_bar
from train.report import banner, summary
from train.seq_auto import resolve_seq
from train.sharding import check_batch, make_mesh
from train.signals import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, StopFlag
from train.state import make_setup
from ttt_jax.data import Batches, make_dataset
from ttt_jax.models import flops_per_token, param_counts
from ttt_jax.models.config import migrate_flat_fields

log = logging.getLogger("train")


def _usable_dir(path: str, flag: str = "--run-dir") -> None:
    """Creates `path` if needed and checks that files can be written in it (ValueError naming
    the flag otherwise: a file in the way, a read-only mount, no permission, /proc)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{flag} {path!r} cannot be used as a run directory ({reason})") from None


def _prepare_run_dir(cfg) -> str:
    run_dir = cfg.resolved_run_dir
    if jax.process_index() == 0:
        if cfg.fresh and os.path.lexists(run_dir):
            if not os.path.isdir(run_dir) or os.path.islink(run_dir):
                raise ValueError(
                    f"--run-dir {run_dir!r} is not a directory: --fresh deletes only run "
                    "directories"
                )
            try:
                shutil.rmtree(run_dir)
            except OSError as err:
                raise ValueError(
                    f"--fresh could not delete --run-dir {run_dir!r} ({err.strerror or err})"
                ) from None
        _usable_dir(run_dir)
        old = os.path.join(run_dir, "config.json")
        if os.path.exists(old):
            try:
                with open(old) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"{old} cannot be read ({type(err).__name__}: {err}): repair or remove it, "
                    "or pass --fresh to start this run over"
                ) from None
            now = json.loads(cfg.to_json())
            saved = saved if isinstance(saved, dict) else {}
            if isinstance(saved.get("model"), dict):
                # A run from before the layer options were nested (`lact_heads` ->
                # `lact.num_fw_heads`, ...) resumes as the same model.
                migrated = migrate_flat_fields(saved["model"])
                if migrated is not saved["model"]:
                    log.info("%s: flat model fields of older runs read as --model.ttt.* etc.", old)
                saved["model"] = migrated
            if saved.get("model") != now["model"]:
                diff = sorted(
                    k for k in now["model"] if (saved.get("model") or {}).get(k) != now["model"][k]
                )
                raise ValueError(
                    f"{run_dir} holds a run of another model (fields differ: {', '.join(diff)}); "
                    "pass --fresh to replace it or choose another --run-dir"
                )
            changed = sorted(k for k in now if k != "model" and saved.get(k) != now[k])
            if changed:
                log.warning("resuming %s with changed settings: %s", run_dir, ", ".join(changed))
    multihost_utils.sync_global_devices("run_dir")
    return run_dir


def _evaluate(setup, state, batches: Batches, cfg) -> dict:
    sums = {"nll_sum": 0.0, "correct": 0.0, "count": 0.0}
    for i in range(cfg.log.eval_batches):
        out = setup.eval_step(
            state["params"], sharded_batch(batches, i, cfg.grad_accum, setup.batch_sharding)
        )
        for k in sums:
            sums[k] += float(out[k])
    count = max(sums["count"], 1.0)
    return {"eval_loss": sums["nll_sum"] / count, "eval_accuracy": sums["correct"] / count}


def run(cfg) -> int:
    """Trains according to `cfg` (a `TrainConfig`); returns the exit code."""
    main = jax.process_index() == 0
    cfg = dataclasses.replace(cfg, seq=resolve_seq(cfg))
    mesh = make_mesh(cfg.mesh.sizes)
    check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    data = make_dataset(cfg.data, cfg.seq, cfg.seed, vocab_size=cfg.model.vocab_size)
    run_dir = _prepare_run_dir(cfg)
    setup = make_setup(cfg, mesh)
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    restored = ckpt.restore_latest(setup.abstract_state)
    train_batches = Batches(data.train, cfg.batch_size, seed=cfg.seed, shuffle=True)
    val_batches = Batches(data.val, cfg.batch_size, seed=cfg.seed, shuffle=False)
    fingerprint = data.train.fingerprint
    if restored is None:
        state, start, position = setup.init_state(), 0, 0
    else:
        start, state, data_state = restored
        position = data_state["batches"]  # an int >= 0: the checkpoint verified it
        if data_state.get("fingerprint") != fingerprint:
            log.warning(
                "the data differs from the checkpoint's (fingerprint %s vs %s): the resumed run "
                "will not repeat the original one",
                data_state.get("fingerprint"),
                fingerprint,
            )
    counts = param_counts(cfg.model)
    flops = flops_per_token(cfg.model, cfg.seq, counts["total"])
    if main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
        n_val = data.val.num_examples
        info = f"{cfg.data.source} (train {data.train.num_examples or 'unbounded'} / val " + (
            f"{n_val} examples)" if n_val is not None else "unbounded)"
        )
        print(banner(cfg, mesh, counts, flops, info, start if restored else None), flush=True)

    metrics = MetricsLog(run_dir, cfg.log.tensorboard, start, enabled=main)
    stop = StopFlag().install()
    n_dev = jax.device_count()
    peak = peak_flops(jax.devices()[0], cfg.peak_flops)
    tokens_per_step = cfg.batch_size * cfg.seq

    t0 = time.perf_counter()
    batch = sharded_batch(train_batches, position, cfg.grad_accum, setup.batch_sharding)
    step_fn = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    step_bytes = compiled_bytes(step_fn)
    if main:
        mem = f", {step_bytes / 2**20:,.0f} MiB per device (XLA)" if step_bytes else ""
        print(f"compiled the train step in {compile_s:.1f}s{mem}", flush=True)

    bar = progress_bar(cfg.steps, start, main and cfg.log.progress)
    step, reason, code = start, "done", EXIT_OK
    first: list[float] = []
    recent: list[float] = []
    evals: dict = {}
    train_time, trained = 0.0, 0
    last = time.perf_counter()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    while step < end:
        state, m = step_fn(state, batch)
        position += 1
        step += 1
        if step < end:
            batch = sharded_batch(train_batches, position, cfg.grad_accum, setup.batch_sharding)
        loss = float(m["loss"])
        now = time.perf_counter()
        dt, last = now - last, now
        train_time, trained = train_time + dt, trained + 1
        recent = (recent + [loss])[-10:]
        first = first if len(first) == 10 else first + [loss]
        if not math.isfinite(loss):
            if cfg.nonfinite == "stop":
                log.error(
                    "non-finite loss (%s) at step %d: stopping (exit %d)",
                    loss,
                    step,
                    EXIT_NONFINITE,
                )
                reason, code = f"non-finite loss at step {step}", EXIT_NONFINITE
                break
            log.warning(
                "non-finite loss at step %d: update skipped (%d so far)",
                step,
                int(state["skipped"]),
            )
        tps = tokens_per_step / dt
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        record = None
        if step % cfg.log.every == 0 or step == end:
            record = {
                "loss": loss,
                "grad_norm": float(m["grad_norm"]),
                "accuracy": float(m["accuracy"]),
                "aux_loss": float(m["aux_loss"]),
                "lr": float(setup.lr_schedule(step - 1)),
                "step_time_s": dt,
                "tokens_per_s": tps,
                "tokens_per_s_per_device": tps / n_dev,
                "mfu": tps / n_dev * flops / peak if peak else None,
                "peak_memory_bytes": peak_memory_bytes(),
                "skipped": int(state["skipped"]),
            }
        if step % cfg.log.eval_every == 0 or step == end:
            evals = _evaluate(setup, state, val_batches, cfg)
            record = {**(record or {}), **evals}
            last = time.perf_counter()  # evaluation time is not step time
        if record is not None:
            metrics.write(step, record)
        interrupted = stop.set
        if jax.process_count() > 1:
            interrupted = bool(multihost_utils.process_allgather(np.int32(interrupted)).max())
        if step % cfg.checkpoint.every == 0 or step == end or interrupted:
            ckpt.save(step, state, {"batches": position, "fingerprint": fingerprint})
        if interrupted:
            reason, code = "interrupted by signal (checkpoint saved)", EXIT_INTERRUPTED
            break
    bar.close()
    stop.uninstall()
    if code == EXIT_OK and step < cfg.steps:
        reason = f"stopped after step {step} (stop_after)"
    if code == EXIT_OK and not evals:
        evals = _evaluate(setup, state, val_batches, cfg)
    ckpt.close()
    metrics.close()
    if main:
        tps = tokens_per_step * trained / train_time if train_time else None
        rows = {
            "steps": f"{step} / {cfg.steps} ({reason})",
            "tokens seen": f"{step * tokens_per_step:,}",
            "wall time": f"{time.perf_counter() - t0:.1f} s (compile {compile_s:.1f} s)",
            f"train loss (steps {start + 1}-{start + len(first)} -> last {len(recent)})": (
                f"{np.mean(first):.4f} -> {np.mean(recent):.4f}" if recent else None
            ),
            "eval loss": evals.get("eval_loss"),
            f"eval accuracy{' (MQAR)' if data.metric == 'accuracy' else ''}": evals.get(
                "eval_accuracy"
            ),
            "tokens/s (per device)": f"{tps:,.0f} ({tps / n_dev:,.0f})" if tps else None,
            "MFU": f"{tps / n_dev * flops / peak:.1%}" if (tps and peak) else None,
            "peak memory (device)": (
                f"{peak_memory_bytes() / 2**30:.2f} GiB" if peak_memory_bytes() else None
            ),
            "train step memory (XLA)": f"{step_bytes / 2**20:,.0f} MiB" if step_bytes else None,
            "skipped steps": int(state["skipped"]),
            "checkpoints": f"{ckpt.directory} (steps {ckpt.steps()})",
            "exit code": code,
        }
        print(summary(rows), flush=True)
    return code


__all__ = ["run"]
