"""Verified Orbax checkpoints of the train state and the data position.

Layout: `<run_dir>/checkpoints/<step>/` holds three Orbax items, `state` (the arrays), `data`
(the data iterator's position, JSON) and `manifest` (JSON: every array's path, shape, dtype and
checksum, `train.checksum`, and the SHA-256 of the data item). Orbax writes a step into a
temporary directory and renames it when complete, so the manifest is committed atomically with
the arrays it describes, and a crash mid-save leaves only a temporary directory, which is never
taken for a step. Saves are asynchronous (training continues while the files are written).

Restore walks the steps newest first. A step is used only if its manifest reads back, its
arrays restore and every checksum (arrays and data position) matches; otherwise it is skipped
with a warning that names the step and what failed (the array, for a checksum), and the
previous step is tried. Nothing that fails is ever deleted or changed. If steps exist but none
verifies, `restore_latest` raises `CheckpointError` instead of starting over (the CLI exits
with `EXIT_CHECKPOINT`; `--fresh` is the explicit way to start over).

Retention (the newest `keep_last`, plus every multiple of `keep_every`) is done here, not by
Orbax, and deletes only steps this process saved or verified: a step left by an earlier
process is restored and checked before it is deleted (once per resumed run), one that fails is
kept. Entries that are not steps (other names, Orbax's temporary directories) are never
touched. A step directory that failed to read and is in the way of a new save of the same step
is renamed `<step>.unreadable` (Orbax ignores that name), never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.checksum import ALGORITHM, leaf_paths, tree_checksums

log = logging.getLogger("train")


class CheckpointError(Exception):
    """The run's checkpoints cannot be used: none verifies, or the directory cannot be read."""


def data_digest(data_state: dict) -> str:
    """SHA-256 of the data iterator's state (canonical JSON)."""
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def make_manifest(step: int, state, data_state: dict) -> dict:
    """The manifest saved with `step`: checksums of every array of `state` and of `data_state`."""
    sums = tree_checksums(state)
    leaves = jax.tree.leaves(state)
    arrays = {
        path: {"checksum": sums[path], "shape": list(x.shape), "dtype": str(x.dtype)}
        for path, x in zip(leaf_paths(state), leaves, strict=True)
    }
    return {"format": ALGORITHM, "step": step, "arrays": arrays, "data": data_digest(data_state)}


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _data_problem(data: dict) -> str | None:
    batches = data.get("batches")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        return f"its data iterator state is invalid (batches={batches!r}, need an int >= 0)"
    if not isinstance(data.get("fingerprint"), str):
        return f"its data iterator state is invalid (fingerprint={data.get('fingerprint')!r})"
    return None


def verify(step: int, manifest, state, data: dict | None, *, prefix: str = "") -> str | None:
    """What is wrong with a restored step (None: it matches its manifest).

    Args:
      step: the step the entry is named by.
      manifest: its manifest as read back.
      state: the restored arrays: the whole state, or the subtree under `prefix`.
      data: the restored data iterator state (None: not restored, not checked).
      prefix: `"params/"` when `state` is only the params: the manifest's arrays under that
        prefix must then be exactly the leaves of `state`.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != ALGORITHM:
        return f"has a manifest of unknown format ({str(manifest)[:80]})"
    if manifest.get("step") != step:
        return f"holds the manifest of step {manifest.get('step')!r}"
    saved = manifest.get("arrays")
    if not isinstance(saved, dict):
        return "has a manifest without arrays"
    saved = {p[len(prefix) :]: v for p, v in saved.items() if p.startswith(prefix)}
    paths = leaf_paths(state)
    missing, extra = sorted(set(saved) - set(paths)), sorted(set(paths) - set(saved))
    if missing or extra:
        return (
            f"does not hold the arrays its manifest lists (missing {missing[:3]}, "
            f"extra {extra[:3]})"
        )
    sums = tree_checksums(state)
    bad = [
        p for p in paths if not isinstance(saved[p], dict) or saved[p].get("checksum") != sums[p]
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return (
            f"failed verification: checksum mismatch in array {', '.join(bad[:3])}{more} "
            f"({len(bad)} of {len(paths)} arrays)"
        )
    if data is None:
        return None
    if manifest.get("data") != data_digest(data):
        return "failed verification: the data iterator state does not match its checksum"
    return _data_problem(data)


class Checkpointer:
    """Save / restore `(state, data_state)` under `<run_dir>/checkpoints/<step>` (module doc).

    Args:
      run_dir: the run directory.
      cfg: a `CheckpointConfig` (retention, async).
      checksums: write manifests (False only to measure their cost; such steps never verify).
    """

    def __init__(self, run_dir: str, cfg, *, checksums: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.keep_last, self.keep_every = cfg.keep_last, cfg.keep_every
        self.checksums = checksums
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: Orbax would count foreign entries as steps
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as err:
            raise CheckpointError(f"cannot open {self.directory} ({_brief(err)})") from None
        self.trusted: set[int] = set()  # saved by this process, or restored and verified
        self.rejected: dict[int, str] = {}  # step -> why it failed (never deleted)
        self._pending: int | None = None
        self._abstract = None

    # ----------------------------------------------------------------- listing

    def entries(self) -> list[int]:
        """Steps on disk: directories named by a plain decimal int (what Orbax lists)."""
        try:
            names = os.listdir(self.directory)
        except OSError as err:
            raise CheckpointError(f"cannot list {self.directory} ({_brief(err)})") from None
        steps = []
        for name in names:
            if name.isdigit() and name == str(int(name)):
                if os.path.isdir(os.path.join(self.directory, name)):
                    steps.append(int(name))
        return sorted(steps)

    def steps(self) -> list[int]:
        """Verified steps (saved by this run or restored and checked)."""
        return sorted(self.trusted)

    # ----------------------------------------------------------------- restore

    def _read(self, step: int, abstract_state):
        """`(state, data)` of a step that verifies, else a string saying what failed."""
        try:
            manifest = self.manager.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore())
            )
            manifest = manifest["manifest"]
        except Exception as err:  # noqa: BLE001 - whatever fails, the step is not used
            return f"is unreadable: no manifest ({_brief(err)})"
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001
            return f"is unreadable ({_brief(err)})"
        state, data = restored["state"], restored["data"]
        if not isinstance(data, dict):
            return f"its data iterator state is invalid ({str(data)[:80]})"
        problem = verify(step, manifest, state, dict(data))
        return problem if problem else (state, dict(data))

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """`(step, state, data_state)` of the newest step that verifies; None if there is none.

        Args:
          abstract_state: `ShapeDtypeStruct` tree with shardings: where the arrays go.

        Raises:
          CheckpointError: steps exist but none verifies (nothing is changed on disk).
        """
        self._abstract = abstract_state
        step, got = self._newest(lambda s: self._read(s, abstract_state))
        if step is not None:
            self.trusted.add(step)
            return step, got[0], got[1]
        entries = got
        if entries:
            reasons = "; ".join(f"step {s} {self.rejected[s]}" for s in reversed(entries))
            raise CheckpointError(
                f"none of the {len(entries)} checkpoints in {self.directory} can be used "
                f"({reasons}). Nothing in the run directory was changed: restore or move the "
                "checkpoints away, or pass --fresh to delete this run and start over"
            )
        return None

    def _read_params(self, step: int):
        """The params of a step if they match its manifest, else a string saying what failed."""
        try:
            got = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    manifest=ocp.args.JsonRestore(), state=ocp.args.StandardRestore()
                ),
            )
            manifest, params = got["manifest"], got["state"]["params"]
        except Exception as err:  # noqa: BLE001 - whatever fails, the step is not used
            return f"is unreadable ({_brief(err)})"
        problem = verify(step, manifest, params, None, prefix="params/")
        return params if problem is None else problem

    def _newest(self, read):
        """`(step, read(step))` of the newest step that `read` accepts (a string is a refusal,
        recorded and warned about); `(None, entries)` when there is none."""
        entries = self.entries()
        for step in reversed(entries):
            got = read(step)
            if not isinstance(got, str):
                return step, got
            self._reject(step, got, "skipped (left as it is), trying the previous one")
        return None, entries

    def _reject(self, step: int, problem: str, action: str) -> None:
        self.rejected[step] = problem
        log.warning("checkpoint at step %d in %s %s; %s", step, self.directory, problem, action)

    def restore_latest_params(self) -> tuple[int, dict]:
        """`(step, params)` of the newest step whose params verify (`--init-from RUN_DIR`).

        The arrays are read without a target (to the host, whatever optimizer the run had) and
        only the `params` subtree is checked against the manifest; a step that fails is skipped
        with a warning, as in `restore_latest`.

        Raises:
          CheckpointError: no step, or none whose params verify (the reasons, per step).
        """
        step, got = self._newest(self._read_params)
        if step is not None:
            return step, got
        entries = got
        reasons = "; ".join(f"step {s} {self.rejected[s]}" for s in reversed(entries))
        raise CheckpointError(
            f"no checkpoint in {self.directory} has params that verify"
            + (f" ({reasons})" if entries else " (there are no checkpoints)")
        )

    # ----------------------------------------------------------------- save

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts saving step `step` (returns before the files are written when async)."""
        self._finish_pending()
        if step in self.trusted:
            return
        self._move_aside(step)
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
        if self.checksums:
            items["manifest"] = ocp.args.JsonSave(make_manifest(step, state, data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = step

    def _move_aside(self, step: int) -> None:
        """Renames an unusable entry named `step` out of the way of a new save of that step."""
        path = os.path.join(self.directory, str(step))
        if not os.path.isdir(path):
            return
        target = f"{path}.unreadable"
        n = 0
        while os.path.exists(target):
            n += 1
            target = f"{path}.unreadable-{n}"
        if jax.process_index() == 0:
            try:
                os.rename(path, target)
            except OSError as err:
                raise CheckpointError(
                    f"cannot save step {step}: {path} exists and could not be read, and it "
                    f"cannot be moved aside ({_brief(err)})"
                ) from None
            log.warning(
                "checkpoint at step %d %s; moved to %s (nothing deleted) to save step %d anew",
                step,
                self.rejected.get(step, "was not verified"),
                target,
                step,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-move-aside-{step}")
        self.rejected.pop(step, None)
        self.manager.reload()

    def _finish_pending(self) -> None:
        self.manager.wait_until_finished()
        if self._pending is not None:
            self.trusted.add(self._pending)
            self._pending = None
            self._retain()

    # ----------------------------------------------------------------- retention

    def _retain(self) -> None:
        on_disk = set(self.entries())
        self.trusted &= on_disk
        unverified = on_disk - self.trusted - set(self.rejected)
        order = sorted(self.trusted | unverified, reverse=True)
        for step in order[self.keep_last :]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            if step not in self.trusted:
                got = (
                    "was never read" if self._abstract is None else self._read(step, self._abstract)
                )
                if isinstance(got, str):
                    self._reject(step, got, "kept (retention deletes only verified steps)")
                    continue
                del got
            self._delete(step)

    def _delete(self, step: int) -> None:
        self.manager.reload()
        if step in self.manager.all_steps():
            try:
                self.manager.delete(step)
            except OSError as err:
                log.warning("could not delete checkpoint at step %d (%s)", step, _brief(err))
                return
        self.trusted.discard(step)

    # ----------------------------------------------------------------- end

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self.manager.close()
