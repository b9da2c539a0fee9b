"""Checkpoints with orbax: the train state, the data iterator's position, and stopping on SIGTERM or Ctrl-C.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items:

  state   the TrainState (params, optimizer state, EMA, step, RNG), sharded arrays written by every process
  data    the grain iterator state, one small JSON file per process
  meta    {"step", "process_count"}

Saves are asynchronous (the arrays are copied off the devices before `save` returns, then written in the
background) and atomic: a run killed mid-save leaves only complete checkpoints behind. Restoring takes the
target shardings from the caller, so a run may resume on a different mesh shape. The data position is
restored when the process count is unchanged; otherwise each host's shard of the data differs and the
stream starts afresh (logged).

Resuming (`restore_latest`) takes the newest checkpoint that restores. One that does not (a damaged file,
a missing item) is named in one warning line with the reason and, once an older one has restored, moved
aside to `<checkpoints>_unrestorable/<step>` (kept for inspection, never deleted), so the run redoes those
steps and saves them again. When none restores, nothing is moved: the cause may be the run's config
rather than the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

UNRESTORABLE_SUFFIX = "_unrestorable"


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of the run could be restored; the message names the newest and why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder that became unwritable); the message says why in
    one line and names the last complete checkpoint, which the next run resumes from."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (orbax errors run to many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    """The run's orbax CheckpointManager with the items above."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> bool:
        """Saves `step` unless it is already saved; returns whether it did. The caller decides when."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({"step": step, "process_count": jax.process_count()}),
        )
        with self._writing(step):
            return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """The state at `step`, placed as `abstract_state`'s ShapeDtypeStructs say; moves `data_iterator`
        to the saved position when the process count matches the saving run's."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if meta["process_count"] == jax.process_count():
                items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
            else:
                log.warning(
                    "checkpoint %d was written by %d processes, this run has %d: the data stream starts afresh",
                    step, meta["process_count"], jax.process_count(),
                )
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores (see the module docstring); None without any."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # orbax, tensorstore and grain each raise their own types for damaged files
                failed.append((step, _one_line(e)))
                log.warning("checkpoint step %d in %s cannot be restored (%s)", step, self.directory, failed[-1][1])
                continue
            if failed:
                self._set_aside([bad for bad, _ in failed])
                log.warning("resuming from step %d, the newest checkpoint that restores", step)
            return step, state
        if failed:
            step, reason = failed[0]
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} restores; the newest, step {step}: {reason}. If the config changed "
                "since they were written, use the config they were written with, or another workdir"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the checkpoints of `steps` out of the manager's folder, keeping them; a later save of the same
        step then writes afresh."""
        aside = self.directory.with_name(self.directory.name + UNRESTORABLE_SUFFIX)
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():  # an earlier run set the same step aside
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                log.warning("moved the checkpoint of step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True at the same step on every process once any of them got a preemption notice (multi-process)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing(self, step: int | None = None) -> Iterator[None]:
        """Turns a failed write (raised here, or by an earlier asynchronous save) into one CheckpointWriteError."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports a full disk as a ValueError
            with contextlib.suppress(Exception):  # let the save's other writers end before the error unwinds
                self.manager.wait_until_finished()
            complete = [s for s in self.manager.all_steps() if s != step]
            last = f"the last complete checkpoint is step {max(complete)}" if complete else "no checkpoint is complete"
            raise CheckpointWriteError(f"a checkpoint could not be written to {self.directory} ({_one_line(e)}); {last}") from None

    def close(self) -> None:
        self.manager.close()


class StopRequest:
    """Notices a request to stop: SIGTERM, as schedulers send before preempting a job, or Ctrl-C (SIGINT).

    One process: while this is entered, either signal sets a flag, and the run stops after the current step
    with a checkpoint; a second Ctrl-C interrupts at once (KeyboardInterrupt), losing the steps since the last
    checkpoint. Several processes: JAX's preemption service (started by `jax.distributed.initialize`) owns
    SIGTERM and agrees on a step at which every process stops, so the check asks the checkpoint manager instead.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.signalled = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signalled.is_set():
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning("%s: stopping after this step with a checkpoint%s", name, " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        self.signalled.set()

    def __call__(self, step: int) -> bool:
        """Whether to stop after `step` (call it at every step, on every process)."""
        if jax.process_count() > 1:
            return self.checkpointer.reached_preemption(step)
        return self.signalled.is_set()
