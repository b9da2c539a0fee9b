"""The huge-page malloc re-exec: the restarted process has the tunable, keeps its arguments, and a
GLIBC_TUNABLES the user set is left alone."""

import os
import subprocess
import sys

import pytest

from layerdiff_jax.hostmem import TUNABLE

SCRIPT = "import os, sys; from layerdiff_jax.hostmem import reexec_with_huge_page_malloc; " \
    "print('start', flush=True); reexec_with_huge_page_malloc(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables exist on Linux only")
def test_restarts_once_with_the_tunable_and_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=1", "x"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["start", "start", f"{TUNABLE} ['--flag=1', 'x']"]


def test_a_tunable_the_user_set_is_kept():
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["start", "glibc.malloc.arena_max=2 []"]
