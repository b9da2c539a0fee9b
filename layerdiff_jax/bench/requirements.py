"""What a benchmark run needs installed, said before anything heavy is imported.

An accelerator machine often has its own jax, flax and a CUDA torch but not every pure-Python package the
project declares, and cannot reach a package index. Rather than failing on the first missing import deep in
the model code, the benchmark imports what it needs here and, if something is missing, names every declared
distribution that is not installed and the offline command that installs them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: tuple[str, ...] = ("torch",)) -> list[str]:
    """Distribution names the project declares: its dependencies and those of `extras` (from pyproject.toml in a
    source checkout, else from the installed package's metadata)."""
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        optional = project.get("optional-dependencies", {})
        requirements = list(project["dependencies"]) + [r for extra in extras for r in optional.get(extra, [])]
    else:
        requirements = []
        for requirement in importlib.metadata.requires("layerdiff_jax") or []:
            marker = _EXTRA_MARKER.search(requirement)
            if marker is None or marker.group(1) in extras:
                requirements.append(requirement)
    names = [_NAME.match(r.strip()).group(0) for r in requirements]
    return [n for n in dict.fromkeys(names) if _normalise(n) != "layerdiff-jax"]


def missing(names: list[str]) -> list[str]:
    """The distributions in `names` that are not installed."""
    absent = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    return absent


def import_problem(modules: tuple[str, ...], extras: tuple[str, ...] = ("torch",)) -> str | None:
    """None if every module imports; else what failed, every declared distribution that is missing, and how to
    install them from a folder of wheels."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            absent = missing(declared(extras))
            lines = [f"cannot import {module}: {error}"]
            if absent:
                lines += [
                    f"not installed, of what layerdiff_jax declares (with extras {', '.join(extras) or 'none'}): {' '.join(absent)}",
                    f"install them, e.g. from a folder of wheels: pip install --no-index --find-links WHEELS {' '.join(absent)}",
                    "(docs/accelerators.md, 'Air-gapped pods and clusters': how to fill WHEELS on a connected machine)",
                ]
            return "\n".join(lines)
    return None
