"""Host memory: glibc malloc backed by transparent huge pages, for XLA on CPU.

XLA allocates each step's buffers afresh, and with 4 KiB pages a CPU training step spends much of its time in
the kernel on minor page faults. Raising malloc's mmap threshold does not help; with `glibc.malloc.hugetlb=1`
malloc asks for transparent huge pages (madvise) and the faults all but vanish (docs/experiments.md has the
numbers). glibc reads the tunable only at process start, hence the re-exec.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_huge_page_malloc() -> None:
    """Restarts this process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on Linux; a no-op if GLIBC_TUNABLES
    is already set (the user's choice, or the restarted process) or on other platforms. Call it first thing in a script:
    the process restarts with the same interpreter and arguments."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
