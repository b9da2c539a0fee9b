"""The install extras and the offline install (docs/accelerators.md, "Install" and "Air-gapped pods and clusters").

The accelerator extras must pull the jax plugin of exactly the installed jax's version, and the project must
install from a folder of wheels with no index (air-gapped pods and clusters). The offline test builds the
project's wheel, then installs it with `--no-index --find-links` into a new environment whose dependencies are
already there (this environment's packages, seen through a .pth file): nothing may come from an index, and the
CUDA extra must ask for the plugin pinned to jax's version, which the folder lacks.
"""

import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def _requires(distribution: str, extra: str) -> list[str]:
    marker = re.compile(rf"""extra\s*==\s*['"]{re.escape(extra)}['"]""")
    return [r.split(";")[0].strip() for r in importlib.metadata.requires(distribution) or [] if marker.search(r)]


def test_accelerator_extras_pin_the_plugin_to_the_installed_jax():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda12]>=0.10"] and extras["cuda13"] == ["jax[cuda13]>=0.10"]
    assert extras["tpu"] == ["jax[tpu]>=0.10"] and extras["gpu-aot"] == ["jax[cuda12-local]>=0.10"]
    version = jax.__version__
    pinned = f"<={version},>={version}"
    # jax's own extras: the plugin (and jaxlib) at exactly jax's version; libtpu for TPUs.
    assert f"jax-cuda12-plugin[with-cuda]{pinned}" in _requires("jax", "cuda12")
    assert f"jax-cuda13-plugin[with-cuda]{pinned}" in _requires("jax", "cuda13")
    assert f"jaxlib{pinned}" in _requires("jax", "cuda12")
    assert any(r.startswith("libtpu") for r in _requires("jax", "tpu"))
    # Compiling for GPUs without one: the plugin alone, without the CUDA libraries ([with-cuda]).
    assert f"jax-cuda12-plugin{pinned}" in _requires("jax", "cuda12-local")


def _pip_env() -> dict[str, str]:
    """No pip configuration: no index, find-links or constraints but those the command names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _pip(*args: str, python: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", *(["--python", str(python)] if python else []), *args]
    return subprocess.run(command, env=_pip_env(), capture_output=True, text=True, timeout=300)


def test_offline_install_from_a_folder_of_wheels(tmp_path):
    # The project's wheel, built from a copy (a build writes build/ and *.egg-info beside the sources).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("layerdiff_jax", "configs"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source))
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("layerdiff_jax-*.whl")

    # A new environment that has every dependency already (this one's, through a .pth file) but not the project.
    target = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
    python = target / "bin" / "python"
    target_site = Path(subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    deps = tmp_path / "deps"  # this environment's packages less the project's own (editable) install
    deps.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if not re.match(r"(__editable__.*layerdiff_jax|layerdiff_jax)", entry.name):
            (deps / entry.name).symlink_to(entry)
    (target_site / "dependencies.pth").write_text(f"{deps}\n")

    installed = _pip("install", "--no-index", "--find-links", str(wheels), "layerdiff_jax", python=python)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert f"Successfully installed layerdiff_jax-{wheel.name.split('-')[1]}" in installed.stdout
    # The wheel carries the fused CPU kernels' source, which builds at first use, and the studio's page.
    script = "import configs.gpu_h100, layerdiff_jax.bench.check, layerdiff_jax\n" \
        "from layerdiff_jax.models import cpu_kernels\nfrom layerdiff_jax.studio.server import STATIC\n" \
        "assert all((STATIC / f).is_file() for f in ('index.html', 'studio.js', 'studio.css'))\n" \
        "print(cpu_kernels.unavailable(), layerdiff_jax.__file__)"
    imported = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LAYERDIFF_JAX_CACHE": str(tmp_path / "cache")},
    )
    assert imported.returncode == 0, imported.stderr
    kernel, location = imported.stdout.split()
    assert kernel == "None" and location.startswith(str(target_site))
    assert list((tmp_path / "cache" / "cpu_kernels").glob("cpu_kernels-*.so"))

    # The CUDA extra resolves to jax's own plugin at jax's version: absent from the folder, so it is named.
    cuda = _pip("install", "--dry-run", "--no-index", "--find-links", str(wheels), "layerdiff_jax[cuda]", python=python)
    assert cuda.returncode != 0
    assert re.search(rf"jax-cuda12-plugin(\[with-cuda\])?<={re.escape(jax.__version__)},>={re.escape(jax.__version__)}", cuda.stderr), cuda.stderr
