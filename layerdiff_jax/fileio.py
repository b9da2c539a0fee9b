"""Output folders: one writer at a time, nothing deleted that a tool did not write, no half-written folder
that looks complete.

- `staged_folder(dest)` yields a hidden staging folder beside `dest` (`.<name>.partial`); when the block
  ends, the staging folder is renamed to `dest` (an earlier `dest` is moved aside first and removed after).
  A run killed while writing leaves only the staging folder, which listings of sample folders skip (hidden)
  and which `partial_folders` finds; a later write of the same `dest` replaces it. An exception inside the
  block removes the staging folder and leaves `dest` as it was.
- `claim_output_folder(folder, tool=...)` is what every tool that writes a folder enters before any work:
  a lock file (`.layerdiff.lock`: PID, host, tool) so a second writer is refused, naming the holder (a lock
  whose PID is dead on this host is stale and taken over); and a record (`.layerdiff_outputs.json`) of the
  top-level entries the tool wrote and whether it finished. `--overwrite` removes only the entries a
  previous run recorded, and refuses, naming them, when the folder holds anything else. While a run writes,
  and after one that was interrupted, the record says unfinished, and readers refuse the folder
  (`check_finished`).

Imports nothing heavy: command-line tools check their arguments with it before loading JAX.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_PREVIOUS_SUFFIX = ".previous"
LOCK_FILE = ".layerdiff.lock"
RECORD_FILE = ".layerdiff_outputs.json"
_CONTROL_FILES = (LOCK_FILE, RECORD_FILE)


class OutputFolderError(OSError):
    """An output folder that cannot be written (in use, holding files the tool did not write, an input) or
    read (an unfinished run); the message says which folder and why, in one line."""


def partial_path(folder: str | os.PathLike) -> Path:
    """The staging folder of `folder`: hidden, beside it."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{PARTIAL_SUFFIX}")


def partial_folders(root: str | os.PathLike) -> list[Path]:
    """Staging folders left under `root` by writes that did not finish (a killed process)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX))


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder; on success it becomes `folder`, replacing what was there."""
    folder = Path(folder)
    staging = partial_path(folder)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = folder.with_name(f".{folder.name}{_PREVIOUS_SUFFIX}")
    if folder.exists():
        for name in _CONTROL_FILES:  # a claimed folder keeps its lock and record when its content is replaced
            if (folder / name).exists():
                os.replace(folder / name, staging / name)
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def output_folder_problem(folder: str | os.PathLike, *, overwrite: bool) -> str | None:
    """Why `folder` cannot take a run's outputs, or None: it must be a folder that is empty (or `overwrite`),
    or not exist yet with its nearest existing parent a writable folder (so that creating it will work)."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder"
        if any(p.name not in _CONTROL_FILES for p in folder.iterdir()) and not overwrite:
            return f"{folder} exists and is not an empty folder (use --overwrite to write into it)"
        return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{folder} cannot be created: {parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK) else f"{folder} cannot be created: {parent} is not writable"


# ----------------------------------------------------------------------------- claiming a folder


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    """Written beside and renamed over, so a reader never sees half a record."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _in_use(folder: Path) -> str | None:
    """Who holds `folder`'s lock, as a message, or None when there is no lock, this process holds it, or its
    process is gone (a dead PID on this host; a lock from another host is trusted: it cannot be checked)."""
    lock = folder / LOCK_FILE
    if not lock.exists():
        return None
    holder = _read_json(lock) or {}
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _pid_alive(pid)):
        return None
    return (
        f"{folder} is in use by {holder.get('tool', 'another run')} (PID {pid} on {host}, since "
        f"{holder.get('since', '?')}); wait for it to finish, or choose another folder (if that process is gone, "
        f"delete {lock})"
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, tool: str) -> Iterator[Path]:
    """Holds `folder/.layerdiff.lock` (creating `folder`) for the block; refuses a folder another live
    process holds, naming it. A lock left by a dead process of this host is taken over."""
    folder = Path(folder)
    lock = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"{folder} cannot be created ({e.strerror or e})") from None
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "tool": tool, "since": _now()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            in_use = _in_use(folder)
            if in_use is None:
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise OutputFolderError(in_use) from None
        except OSError as e:
            raise OutputFolderError(f"{folder} is not writable ({e.strerror or e})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        break
    else:
        raise OutputFolderError(f"{folder}: could not take over the stale lock {lock}")
    try:
        yield folder
    finally:
        if (_read_json(lock) or {}).get("pid") == mine["pid"]:
            lock.unlink(missing_ok=True)


class OutputRecord:
    """What a tool writes into a claimed folder. `add(name)` before writing an entry: the first call removes
    what an earlier run recorded (so until then the folder is as it was) and marks the record unfinished;
    `finish()` once everything the run meant to write is there."""

    def __init__(self, folder: Path, tool: str, earlier: set[str]):
        self.folder, self.tool = folder, tool
        self.entries: set[str] = set()
        self._earlier: set[str] | None = earlier

    def add(self, *names: str) -> None:
        self.entries.update(names)
        self._save(finished=False)  # first, so that a run killed from here on is seen as unfinished
        if self._earlier is not None:
            for name in sorted(self._earlier - set(names)):
                _remove(self.folder / name)
            self._earlier = None

    def finish(self) -> None:
        self._save(finished=True)

    def _save(self, *, finished: bool) -> None:
        _write_json(self.folder / RECORD_FILE, {"tool": self.tool, "finished": finished, "updated": _now(), "entries": sorted(self.entries)})


def recorded_entries(folder: str | os.PathLike) -> set[str] | None:
    """The entries a tool recorded writing into `folder`, or None when it holds no record."""
    record = _read_json(Path(folder) / RECORD_FILE)
    entries = None if record is None else record.get("entries")
    return set(entries) if isinstance(entries, list) and all(isinstance(e, str) for e in entries) else None


def check_finished(folder: str | os.PathLike) -> None:
    """Raises OutputFolderError when `folder` records a run that has not finished (still writing, or
    interrupted): its content is not what the tool would have left. A folder without a record passes."""
    folder = Path(folder)
    record = _read_json(folder / RECORD_FILE)
    if record is not None and record.get("finished") is not True:
        tool = record.get("tool", "a tool")
        raise OutputFolderError(
            f"{folder} holds an unfinished run of {tool} (interrupted, failed, or still writing; "
            f"{len(record.get('entries') or [])} entries written): rerun {tool} with --overwrite to finish it"
        )


def _related(out: Path, inputs: Iterable[str | os.PathLike | None]) -> str | None:
    """Why writing to `out` would touch an input: it is one, contains one, or lies inside one."""
    out = out.resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        if path == out:
            return f"it is the input {given}"
        if out in path.parents:
            return f"it contains the input {given}"
        if path in out.parents:
            return f"it lies inside the input {given}"
    return None


def output_problem(
    folder: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    adopt: Iterable[str] = (),
) -> str | None:
    """Why a tool may not write `folder`, or None; checked before any work (see `claim_output_folder`)."""
    folder = Path(folder)
    problem = _in_use(folder) or output_folder_problem(folder, overwrite=overwrite)
    if problem:
        return problem
    related = _related(folder, inputs)
    if related:
        return f"{folder} cannot be the output: {related}; choose another folder"
    if folder.is_dir():
        own = recorded_entries(folder)
        own = set(adopt) if own is None else own
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _CONTROL_FILES and p.name not in own)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            return (
                f"{folder} holds entries this tool did not write ({shown}): --overwrite replaces only what an earlier "
                "run recorded writing; move them out, or choose another folder"
            )
    return None


@contextlib.contextmanager
def claim_output_folder(
    folder: str | os.PathLike,
    *,
    tool: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    adopt: Iterable[str] = (),
) -> Iterator[OutputRecord]:
    """Locks `folder`, checks it (`output_problem`) and yields the new run's `OutputRecord` (which replaces what
    an earlier run recorded once the new one writes). A folder this call created and nothing was written to is
    removed at the end.

    `inputs`: paths the run reads; the output may not be, contain or lie inside any of them. `adopt`: entries
    to count as the tool's own in a folder without a record (one written before records existed).
    """
    folder = Path(folder)
    inputs, adopt = list(inputs), list(adopt)
    check = functools.partial(output_problem, folder, overwrite=overwrite, inputs=inputs, adopt=adopt)
    problem = check()  # before the lock creates the folder (it might lie inside an input)
    if problem:
        raise OutputFolderError(problem)
    created = not folder.exists()
    with folder_lock(folder, tool):
        problem = check()  # again, now that no other writer can change the folder
        if problem:
            raise OutputFolderError(problem)
        earlier = recorded_entries(folder)
        record = OutputRecord(folder, tool, set(adopt) if earlier is None else earlier)
        try:
            yield record
        finally:
            if created and not record.entries:  # refused or interrupted before writing: leave no trace
                shutil.rmtree(folder, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
