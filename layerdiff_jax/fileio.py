"""Writing folders so that a reader never sees half of one, and checking an output path before work starts.

`staged_folder(dest)` yields a hidden staging folder beside `dest` (`.<name>.partial`); when the block
ends, the staging folder is renamed to `dest` (an earlier `dest` is moved aside first and removed after).
A run killed while writing leaves only the staging folder, which listings of sample folders skip (hidden)
and which `partial_folders` finds; a later write of the same `dest` replaces it. An exception inside the
block removes the staging folder and leaves `dest` as it was.

Imports nothing heavy: command-line tools check their arguments with it before loading JAX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_PREVIOUS_SUFFIX = ".previous"


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
        if any(folder.iterdir()) and not overwrite:
            return f"{folder} exists and is not an empty folder (use --overwrite to write into it)"
        return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{folder} cannot be created: {parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK) else f"{folder} cannot be created: {parent} is not writable"
