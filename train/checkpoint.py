"""Orbax checkpoints of the train state and the data position.

Saves are asynchronous (training continues while the files are written) and atomic: Orbax
writes into a temporary directory and renames it when complete, so a crash mid-save leaves a
temporary directory that is never listed as a step. Retention: the newest `keep_last`, plus
every step that is a multiple of `keep_every`. On restore the newest step that reads back is
used; one that fails (truncated or missing files, a partial copy) is skipped with a warning and
the previous complete one is tried.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger("train")


class Checkpointer:
    """Save / restore `(state, data_state)` under `<run_dir>/checkpoints/<step>`."""

    def __init__(self, run_dir: str, cfg):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable: set[int] = set()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts saving step `step` (returns before the files are written when async)."""
        if step in self.unreadable:
            # The resumed run has redone this step: its unreadable files give way to the new.
            self.manager.delete(step)
            self.unreadable.discard(step)
        elif step in self.manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """`(step, state, data_state)` of the newest readable checkpoint, or None.

        Args:
          abstract_state: `ShapeDtypeStruct` tree with shardings: where the arrays go.
        """
        for step in reversed(self.steps()):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            )
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                self.unreadable.add(step)
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); skipped, trying the "
                    "previous one",
                    step,
                    self.directory,
                    type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "",
                )
                continue
            return step, restored["state"], dict(restored["data"])
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
