"""Verified checkpoints under fault injection (`train/checkpoint.py`), on a small state saved
through the same Orbax path as training: a flipped byte, a truncated file, deleted metadata,
garbage in the data position, unreadable permissions and foreign entries are each skipped with
a warning naming the step (and the array), the newest good step is restored, nothing that
failed is deleted or changed, no good step at all is an error, and retention deletes only
verified steps. The checksum itself does not depend on the sharding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._train_helpers import DROP_CAPS, ROOT, env
from train.checkpoint import Checkpointer, CheckpointError, data_digest
from train.checksum import tree_checksums
from train.config import CheckpointConfig

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def make_state(step: int) -> dict:
    """A train-state-like tree: random weights (incompressible, like real ones), Adam-like
    moments, a bf16 leaf and int scalars."""
    k = jax.random.key(step)
    w = jax.random.normal(k, (256, 128))
    return {
        "step": jnp.int32(step),
        "params": {"w": w, "b": jnp.full((16,), step, jnp.bfloat16)},
        "opt_state": {"mu": 0.1 * w, "nu": w * w},
        "skipped": jnp.int32(0),
    }


ABSTRACT = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING), make_state(0)
)


def data_state(step: int) -> dict:
    return {"batches": step, "fingerprint": "fp"}


def checkpointer(run_dir, keep_last=10, keep_every=None) -> Checkpointer:
    return Checkpointer(str(run_dir), CheckpointConfig(keep_last=keep_last, keep_every=keep_every))


def save_steps(run_dir, steps, **kw) -> pathlib.Path:
    ckpt = checkpointer(run_dir, **kw)
    for s in steps:
        ckpt.save(s, make_state(s), data_state(s))
    ckpt.close()
    return pathlib.Path(run_dir) / "checkpoints"


def largest_file(path: pathlib.Path) -> pathlib.Path:
    return max((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def snapshot(path: pathlib.Path) -> dict:
    """Every entry under `path` with its mode and content hash (to prove nothing changed)."""
    out = {}
    for f in sorted(path.rglob("*")):
        rel = str(f.relative_to(path))
        if f.is_file():
            out[rel] = (f.stat().st_mode, hashlib.sha1(f.read_bytes()).hexdigest())
        else:
            out[rel] = (f.stat().st_mode, "dir")
    return out


def assert_state_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore(run_dir, **kw):
    return checkpointer(run_dir, **kw).restore_latest(ABSTRACT)


def test_flipped_byte_is_caught_and_the_previous_step_restored(tmp_path, caplog):
    ckpts = save_steps(tmp_path, [10, 20])
    big = largest_file(ckpts / "20" / "state")
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # Orbax alone restores this silently (one value changes)
    big.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="train"):
        step, state, data = restore(tmp_path)
    assert step == 10 and data == data_state(10)
    assert_state_equal(state, make_state(10))
    text = caplog.text
    assert "checkpoint at step 20" in text and "checksum mismatch in array" in text
    assert any(p in text for p in ("params/w", "opt_state/mu", "opt_state/nu"))


def test_truncated_file_and_deleted_metadata_are_skipped(tmp_path, caplog):
    ckpts = save_steps(tmp_path, [10, 20, 30, 40])
    big = largest_file(ckpts / "40" / "state")
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
    (ckpts / "30" / "manifest" / "metadata").unlink()
    # Orbax's own metadata gone: the arrays still restore into the target, and they verify.
    (ckpts / "20" / "state" / "_METADATA").unlink()
    (ckpts / "20" / "_CHECKPOINT_METADATA").unlink()
    with caplog.at_level(logging.WARNING, logger="train"):
        step, state, _ = restore(tmp_path)
    assert step == 20
    assert_state_equal(state, make_state(20))
    assert "checkpoint at step 40 " in caplog.text and "unreadable" in caplog.text
    assert "checkpoint at step 30 " in caplog.text and "no manifest" in caplog.text


def test_no_usable_step_is_an_error_and_changes_nothing(tmp_path):
    ckpts = save_steps(tmp_path, [10, 20])
    for s in ("10", "20"):
        big = largest_file(ckpts / s / "state")
        raw = bytearray(big.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        big.write_bytes(bytes(raw))
    (ckpts / "30").mkdir()  # an empty directory named like a step
    before = snapshot(tmp_path)
    ckpt = checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore_latest(ABSTRACT)
    message = str(err.value)
    assert "none of the 3 checkpoints" in message and "--fresh" in message
    assert "step 30 " in message and "step 20 failed verification" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("batches", [-7, "abc"])
def test_garbage_data_position_is_skipped(tmp_path, caplog, batches):
    ckpts = save_steps(tmp_path, [10, 20])
    meta = ckpts / "20" / "data" / "metadata"
    meta.write_text(json.dumps({"batches": batches, "fingerprint": "fp"}))
    with caplog.at_level(logging.WARNING, logger="train"):
        step, _, data = restore(tmp_path)
    assert step == 10 and data["batches"] == 10
    assert "step 20" in caplog.text and "data iterator state" in caplog.text
    # Even with a manifest that agrees with the garbage, the position itself is checked.
    manifest = ckpts / "20" / "manifest" / "metadata"
    m = json.loads(manifest.read_text())
    m["data"] = data_digest({"batches": batches, "fingerprint": "fp"})
    manifest.write_text(json.dumps(m))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"):
        step, _, _ = restore(tmp_path)
    assert step == 10 and f"batches={batches!r}" in caplog.text


def test_foreign_entries_are_ignored_and_never_cost_a_good_step(tmp_path, caplog):
    ckpts = save_steps(tmp_path, [10, 20, 30])
    (ckpts / "50").mkdir()  # made retention keep it and delete good steps before
    (ckpts / "backup").mkdir()
    (ckpts / "backup" / "keep.txt").write_text("mine")
    (ckpts / "notes.txt").write_text("mine")
    (ckpts / "007").mkdir()
    ckpt = checkpointer(tmp_path, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="train"):
        step, _, _ = ckpt.restore_latest(ABSTRACT)
        assert step == 30 and "checkpoint at step 50" in caplog.text
        ckpt.save(40, make_state(40), data_state(40))
        ckpt.wait()
        # keep_last=2 counts verified steps only: 40 and 30 stay, 20 and 10 (verified first) go.
        names = sorted(p.name for p in ckpts.iterdir())
        assert names == ["007", "30", "40", "50", "backup", "notes.txt"]
        # Saving step 50 anew moves the unreadable entry aside instead of deleting it.
        ckpt.save(50, make_state(50), data_state(50))
        ckpt.close()
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["007", "40", "50", "50.unreadable", "backup", "notes.txt"]
    assert (ckpts / "backup" / "keep.txt").read_text() == "mine"
    assert "moved to" in caplog.text
    step, state, _ = restore(tmp_path)
    assert step == 50
    assert_state_equal(state, make_state(50))


def test_retention_deletes_only_verified_steps(tmp_path, caplog):
    ckpts = save_steps(tmp_path, [10, 20, 30])
    big = largest_file(ckpts / "10" / "state")
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    big.write_bytes(bytes(raw))
    before = snapshot(ckpts / "10")
    ckpt = checkpointer(tmp_path, keep_last=1, keep_every=20)
    with caplog.at_level(logging.WARNING, logger="train"):
        assert ckpt.restore_latest(ABSTRACT)[0] == 30
        ckpt.save(40, make_state(40), data_state(40))
        ckpt.close()
    # 30 goes (verified), 20 stays (a multiple of keep_every), 10 fails verification: kept.
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [10, 20, 40]
    assert snapshot(ckpts / "10") == before
    assert "checkpoint at step 10" in caplog.text and "kept (retention deletes only" in caplog.text


PERMISSION_CHECK = textwrap.dedent(
    """
    import json, sys
    import tests.train.test_checkpoint as t
    ckpt = t.checkpointer(sys.argv[1])
    step, state, _ = ckpt.restore_latest(t.ABSTRACT)
    ckpt.save(20, t.make_state(20), t.data_state(20))  # redo the unreadable step
    ckpt.close()
    print(json.dumps({"step": step}))
    """
)


def test_unreadable_by_permission_is_skipped_and_kept(tmp_path):
    """chmod does not stop root: as root, the check runs under `setpriv` without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (skipped where that cannot be done)."""
    prefix = []
    if os.geteuid() == 0:
        prefix = DROP_CAPS
        probe = tmp_path / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            denied = subprocess.run([*prefix, "cat", str(probe)], capture_output=True).returncode
        except OSError:
            denied = 0
        if not denied:
            pytest.skip("running as root, and setpriv cannot drop the file-permission override")
    ckpts = save_steps(tmp_path, [10, 20])
    os.chmod(ckpts / "20" / "state", 0)
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", PERMISSION_CHECK, str(tmp_path)],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.splitlines()[-1])["step"] == 10
        assert "checkpoint at step 20" in proc.stderr and "ermission" in proc.stderr
        assert sorted(p.name for p in ckpts.iterdir()) == ["10", "20", "20.unreadable"]
        assert (ckpts / "20.unreadable" / "state").stat().st_mode & 0o777 == 0  # untouched
    finally:
        for p in ckpts.glob("20*/state"):
            p.chmod(0o755)


SHARDED_CHECKSUM = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from train.checksum import tree_checksums
    x = jax.random.normal(jax.random.key(0), (8, 12))
    tree = {"x": x, "h": x.astype(jnp.bfloat16), "i": jnp.arange(6, dtype=jnp.int8)}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))
    sharded = {"x": put(x, P("a", "b")), "h": put(tree["h"], P(None, "b")),
               "i": put(tree["i"], P("a"))}
    print(json.dumps([len(jax.devices()), tree_checksums(sharded)]))
    """
)


def test_checksum_ignores_sharding_and_sees_every_word():
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_CHECKSUM],
        cwd=ROOT,
        env=env(devices=4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    devices, sharded = json.loads(proc.stdout.splitlines()[-1])
    x = jax.random.normal(jax.random.key(0), (8, 12))
    tree = {"x": x, "h": x.astype(jnp.bfloat16), "i": jnp.arange(6, dtype=jnp.int8)}
    assert devices == 4 and sharded == tree_checksums(tree)
    # Any single changed byte changes the checksum (both sums are bijective in each word).
    raw = np.asarray(x).copy()
    base = tree_checksums({"x": raw})["x"]
    flat = raw.reshape(-1).view(np.uint8)
    for i in range(0, flat.size, 7):
        flat[i] ^= 0x80
        assert tree_checksums({"x": raw})["x"] != base
        flat[i] ^= 0x80
    assert tree_checksums({"x": raw})["x"] == base


def spoil(state_dir: pathlib.Path) -> None:
    """Flips one byte in every 512 of every array file: each array is hit (or the file no
    longer decodes); either way the step must not be used."""
    for f in (p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 4096):
        raw = bytearray(f.read_bytes())
        for i in range(256, len(raw), 512):
            raw[i] ^= 0x01
        f.write_bytes(bytes(raw))


def test_init_from_a_run_dir_reads_only_params_that_verify(tmp_path, caplog):
    """`--init-from RUN_DIR` (`train.init_from.load_pretrained_params`): the newest step whose
    params match the manifest, whatever the optimizer state; a corrupt one is skipped with a
    warning, none at all is a ValueError naming the flag."""
    from train.init_from import load_pretrained_params

    ckpts = save_steps(tmp_path, [10, 20])
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    spoil(ckpts / "20" / "state")
    shardings = jax.tree.map(lambda _: SHARDING, make_state(0)["params"])
    with caplog.at_level(logging.WARNING, logger="train"):
        params = load_pretrained_params(str(tmp_path), None, shardings)
    assert_state_equal(params, make_state(10)["params"])
    assert "checkpoint at step 20 " in caplog.text and "trying the previous one" in caplog.text

    spoil(ckpts / "10" / "state")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--init-from .*no checkpoint in .* params that verify"):
        load_pretrained_params(str(tmp_path), None, shardings)
    assert snapshot(tmp_path) == before  # nothing of the source run changed
