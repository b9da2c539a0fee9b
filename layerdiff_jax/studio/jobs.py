"""Jobs: requests from every tab, run one at a time by one worker thread.

JAX runs on that thread alone, and a program compiled for one request's shapes serves every later request of
the same shapes; each job reports the seconds XLA spent compiling for it (0 once its shapes are warm). A job's
failure (a request the model cannot serve) is recorded on the job as one line and the worker goes on with the
next.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
_KEPT = 200  # finished jobs kept for the pages polling them
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Job:
    id: str
    kind: str
    run: Callable[[], Any]  # the work; returns what the page gets as the job's result
    state: str = QUEUED
    result: Any = None
    error: str | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    compile_s: float = 0.0  # of the run, spent compiling programs for shapes not seen before

    def describe(self, position: int | None) -> dict:
        now = time.monotonic()
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "queue_position": position,  # jobs ahead of this one, while it waits
            "waited_s": round((self.started or now) - self.submitted, 2),
            "run_s": round((self.finished or now) - self.started, 2) if self.started else None,
            "compile_s": round(self.compile_s, 2),
            "result": self.result,
            "error": self.error,
        }


class JobQueue:
    """Jobs in the order they came, run by one daemon thread; `expected` exceptions fail their job with their
    message, anything else with its type too (and a logged traceback: a bug, not a bad request)."""

    def __init__(self, expected: tuple[type[BaseException], ...]):
        self._expected = expected
        self._jobs: dict[str, Job] = {}
        self._waiting: list[str] = []
        self._queue: queue.Queue[Job] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._running: Job | None = None
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        threading.Thread(target=self._work, name="studio-worker", daemon=True).start()

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == _COMPILE_EVENT and self._running is not None and threading.current_thread().name == "studio-worker":
            self._running.compile_s += duration

    def submit(self, kind: str, run: Callable[[], Any]) -> Job:
        with self._lock:
            job = Job(f"job{next(self._ids):05d}", kind, run)
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            for old in [j for j in self._jobs.values() if j.finished][: max(0, len(self._jobs) - _KEPT)]:
                del self._jobs[old.id]
        self._queue.put(job)
        return job

    def describe(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            position = self._waiting.index(job_id) if job_id in self._waiting else None
        return None if job is None else job.describe(position)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._waiting.remove(job.id)
                job.state, job.started = RUNNING, time.monotonic()
                self._running = job
            try:
                job.result = job.run()
                job.state = DONE
            except self._expected as e:
                job.error, job.state = str(e), FAILED
            except Exception as e:  # noqa: BLE001 -- the server must outlive any one request
                log.exception("studio job %s (%s) failed", job.id, job.kind)
                job.error, job.state = f"{type(e).__name__}: {e}", FAILED
            finally:
                job.finished, self._running = time.monotonic(), None
