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
- Several processes writing one folder (a pod's hosts, the folder on shared storage; `Processes`): process 0
  claims it (lock and record) and the others wait for it; each other process records what it writes in a
  part-file of its own (`.layerdiff_outputs.process_K.json`), which process 0 merges into the record at the
  end, marking the run finished only when every process succeeded.

Imports nothing heavy: command-line tools check their arguments with it before loading JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_PREVIOUS_SUFFIX = ".previous"
LOCK_FILE = ".layerdiff.lock"
RECORD_FILE = ".layerdiff_outputs.json"
_PART_PREFIX = ".layerdiff_outputs.process_"  # + K.json: what process K of a multi-process run wrote


def _is_control(name: str) -> bool:
    """The lock, the record and its part-files: the folder's bookkeeping, not a tool's output."""
    return name in (LOCK_FILE, RECORD_FILE) or name.startswith(_PART_PREFIX)


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
        for path in folder.iterdir():  # a claimed folder keeps its lock and record when its content is replaced
            if _is_control(path.name):
                os.replace(path, staging / path.name)
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
        if any(not _is_control(p.name) for p in folder.iterdir()) and not overwrite:
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


@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes of one run that write a shared output folder: this one's `index` and `allgather(value)`, which
    returns every process's integer in process order once all of them have called it (so it is a barrier too; on a
    JAX pod, `mesh.allgather_ints`). The default is a run of one process."""

    index: int = 0
    allgather: Callable[[int], list[int]] = lambda value: [value]


def _part_path(folder: Path, index: int) -> Path:
    return folder / f"{_PART_PREFIX}{index}.json"


def _part_entries(folder: Path) -> dict[int, set[str]]:
    """What each other process of a multi-process run recorded writing, by process index."""
    parts = {}
    for path in folder.glob(f"{_PART_PREFIX}*.json"):
        index, entries = path.name[len(_PART_PREFIX) : -len(".json")], (_read_json(path) or {}).get("entries")
        if index.isdigit() and isinstance(entries, list):
            parts[int(index)] = {e for e in entries if isinstance(e, str)}
    return parts


class OutputRecord:
    """What a tool writes into a claimed folder. `add(name)` before writing an entry; `finish()` once everything the
    run meant to write is there. The run starts writing with `start()` (which the first `add` calls): until then the
    folder is as it was; then the record says unfinished and what an earlier run recorded is removed.

    With several `processes`, process 0 keeps the record and each other process records its entries in its own
    part-file, and `start()` and `finish()` are collective: every process calls `start()` before its first `add` (no
    process writes before process 0 has removed the earlier run's entries) and `finish()` at the end, where process 0
    merges the part-files into the record, marked finished only if the run `succeeded` on every process.
    """

    def __init__(self, folder: Path, tool: str, earlier: set[str], processes: Processes = Processes()):
        self.folder, self.tool, self.processes = folder, tool, processes
        self.entries: set[str] = set()
        self._earlier: set[str] | None = earlier  # None once the run started writing
        self._by_process: dict[int, set[str]] = {}  # after a multi-process finish: who wrote what

    def start(self) -> None:
        self._start(keep=set())

    def _start(self, keep: set[str]) -> None:
        """`keep`: earlier entries about to be rewritten, left to the write that replaces them."""
        if self._earlier is None:
            return
        if self.processes.index == 0:
            self._save(finished=False)  # first, so that a run killed from here on is seen as unfinished
            for name in sorted(self._earlier - keep):
                _remove(self.folder / name)
            for part in self.folder.glob(f"{_PART_PREFIX}*"):  # an earlier multi-process run's: its entries just went
                part.unlink()
        self._earlier = None
        self.processes.allgather(0)

    def add(self, *names: str) -> None:
        self._start(keep=set(names))
        self.entries.update(names)
        self._save(finished=False)

    def finish(self, succeeded: bool = True) -> bool:
        """Marks the run finished if it `succeeded` (on every process); returns whether it did."""
        self.start()
        results = self.processes.allgather(int(succeeded))
        if self.processes.index == 0:
            parts = _part_entries(self.folder)
            if len(results) > 1:
                self._by_process = {0: set(self.entries), **parts}
            self.entries.update(*parts.values())
            self._save(finished=all(results))
            for index in parts:  # merged: the record alone lists them now
                _part_path(self.folder, index).unlink()
        return all(results)

    def _save(self, *, finished: bool) -> None:
        data = {"tool": self.tool, "updated": _now(), "entries": sorted(self.entries)}
        if self.processes.index:
            _write_json(_part_path(self.folder, self.processes.index), data)
            return
        if self._by_process:
            data["by_process"] = {str(k): sorted(v) for k, v in sorted(self._by_process.items())}
        _write_json(self.folder / RECORD_FILE, {**data, "finished": finished})


def recorded_entries(folder: str | os.PathLike) -> set[str] | None:
    """The entries a tool recorded writing into `folder` (with those in the part-files of a multi-process run that
    stopped before merging them), or None when it holds no record."""
    folder = Path(folder)
    record = _read_json(folder / RECORD_FILE)
    entries = None if record is None else record.get("entries")
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        return None
    return set(entries).union(*_part_entries(folder).values())


def check_finished(folder: str | os.PathLike) -> None:
    """Raises OutputFolderError when `folder` records a run that has not finished (still writing, or
    interrupted): its content is not what the tool would have left. A folder without a record passes."""
    folder = Path(folder)
    record = _read_json(folder / RECORD_FILE)
    if record is not None and record.get("finished") is not True:
        tool = record.get("tool", "a tool")
        raise OutputFolderError(
            f"{folder} holds an unfinished run of {tool} (interrupted, failed, or still writing; "
            f"{len(recorded_entries(folder) or ())} entries written): rerun {tool} with --overwrite to finish it"
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
        foreign = sorted(p.name for p in folder.iterdir() if not _is_control(p.name) and p.name not in own)
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
    processes: Processes = Processes(),
) -> Iterator[OutputRecord]:
    """Locks `folder`, checks it (`output_problem`) and yields the new run's `OutputRecord` (which replaces what
    an earlier run recorded once the new one writes). A folder this call created and nothing was written to is
    removed at the end.

    `inputs`: paths the run reads; the output may not be, contain or lie inside any of them. `adopt`: entries
    to count as the tool's own in a folder without a record (one written before records existed). `processes`:
    the run's processes when several write the folder; every one calls this, process 0 claims the folder and the
    others wait for it, and refuse too when it could not (its own error says why).
    """
    folder = Path(folder)
    if processes.index:
        if not all(processes.allgather(1)):
            raise OutputFolderError(f"{folder}: process 0 could not claim it (its error says why)")
        yield OutputRecord(folder, tool, set(), processes)
        return
    with contextlib.ExitStack() as claimed:
        try:
            record = claimed.enter_context(_claim(folder, tool, overwrite, list(inputs), list(adopt), processes))
        except BaseException:
            processes.allgather(0)  # the others stop too
            raise
        processes.allgather(1)
        yield record


@contextlib.contextmanager
def _claim(folder: Path, tool: str, overwrite: bool, inputs: list, adopt: list, processes: Processes) -> Iterator[OutputRecord]:
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
        record = OutputRecord(folder, tool, set(adopt) if earlier is None else earlier, processes)
        try:
            yield record
        finally:
            if created and not recorded_entries(folder):  # refused or interrupted before any process wrote: no trace
                shutil.rmtree(folder, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
