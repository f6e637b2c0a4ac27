"""Background merge jobs for the WebUI tab and the REST API: start, poll, cancel.

A job runs in a daemon thread; its progress and log are readable at any time. A cancelled
or failed job writes nothing (outputs are written atomically at the very end) and drops its
references to captured features so the memory is freed.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .progress import MergeCancelled, Progress


@dataclass
class JobStatus:
    id: str
    state: str  # "running" | "done" | "failed" | "cancelled"
    stage: str
    layer: str
    percent: float
    message: str
    log: list[str] = field(default_factory=list)
    result: dict | None = None
    error: str | None = None
    started: float = 0.0
    finished: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Job:
    def __init__(self, job_id: str, work, lock: threading.Lock | None):
        self.id = job_id
        self.progress = Progress(listener=self._on_progress)
        self.state = "running"
        self.log: list[str] = []
        self.result = None
        self.error = None
        self.started = time.time()
        self.finished = None
        self._work = work
        self._lock = lock
        self._last_stage = None
        self.thread = threading.Thread(target=self._run, name=f"loraclr-job-{job_id}", daemon=True)

    def _on_progress(self, state):
        if state.stage != self._last_stage or (state.message and not state.layer):
            self._last_stage = state.stage
            self.log.append(f"[{state.stage}] {state.message}".rstrip())

    def _run(self):
        try:
            if self._lock is not None:
                self.log.append("waiting for the model to be free")
                with self._lock:
                    self.result = self._work(self.progress)
            else:
                self.result = self._work(self.progress)
            self.state = "done"
            self.log.append("done")
        except MergeCancelled:
            self.state = "cancelled"
            self.log.append("cancelled: nothing was written")
        except Exception as error:  # reported to the user, never re-raised into the host
            self.state = "failed"
            self.error = f"{type(error).__name__}: {error}"
            self.log.append(f"failed: {self.error}")
            if not isinstance(error, (ValueError, OSError)):  # not about the input: the traceback helps a bug report
                self.log.append(traceback.format_exc(limit=3))
        finally:
            self.finished = time.time()
            self._work = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def cancel(self):
        self.progress.cancel()

    def status(self) -> JobStatus:
        snap = self.progress.snapshot()
        percent = 100.0 if self.state == "done" else round(100.0 * snap.fraction, 1)
        return JobStatus(
            self.id, self.state, snap.stage, snap.layer, percent, snap.message,
            list(self.log), self.result, self.error, self.started, self.finished,
        )


class JobManager:
    """Keeps jobs by id; ``lock`` (e.g. the host's queue lock) serialises jobs with generation."""

    def __init__(self, lock: threading.Lock | None = None):
        self.lock = lock
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self, work) -> str:
        """``work(progress) -> dict`` runs in the background; returns the job id."""
        job = Job(str(next(self._ids)), work, self.lock)
        self.jobs[job.id] = job
        job.thread.start()
        return job.id

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise KeyError(f"no merge job with id {job_id!r}")
        return self.jobs[job_id]

    def status(self, job_id: str) -> JobStatus:
        return self.get(job_id).status()

    def cancel(self, job_id: str) -> JobStatus:
        job = self.get(job_id)
        job.cancel()
        return job.status()

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        self.get(job_id).thread.join(timeout)
        return self.status(job_id)
