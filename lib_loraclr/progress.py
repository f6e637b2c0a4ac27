"""Progress reporting and cancellation: the one mechanism of the merge, the standalone composition,
the CLI bar, background jobs, the WebUI tab and the WebUI's own progress (``WebUIHost.busy``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class MergeCancelled(Exception):
    """Raised inside the engine when the user cancelled; callers clean up and write nothing."""


@dataclass
class ProgressState:
    stage: str = "queued"
    layer: str = ""
    fraction: float = 0.0  # overall, 0..1
    message: str = ""


# Rough share of the run each stage takes, so one bar can move smoothly across stages.
STAGE_SPAN = {
    "load": (0.0, 0.03),
    "text_encoder": (0.03, 0.15),
    "cross_kv": (0.15, 0.2),
    "sampling": (0.2, 0.6),
    "teacher": (0.03, 0.2),  # --method distill: the concepts' own trajectories
    "distill": (0.2, 0.75),
    "unet": (0.6, 0.75),
    "report": (0.75, 0.95),
    "write": (0.95, 1.0),
    "compose": (0.0, 1.0),  # standalone composition: its sampling steps
}


class Progress:
    """Thread-safe progress sink with a cancel flag; every listener sees every update."""

    def __init__(self, listener=None):
        self.state = ProgressState()
        self.listeners = [listener] if listener is not None else []
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def update(self, stage: str, done: int = 0, total: int = 1, layer: str = "", message: str = "", check: bool = True):
        """Record progress; raises ``MergeCancelled`` here if the user cancelled (unless ``check`` is False).

        The overall fraction never goes back (a stage that runs again, e.g. a second capture
        pass, holds the bar where it was), so progress bars only move forward.
        """
        start, end = STAGE_SPAN.get(stage, (0.0, 1.0))
        fraction = min(max(start + (end - start) * (done / max(total, 1)), 0.0), 1.0)
        with self._lock:
            self.state = ProgressState(stage, layer, max(fraction, self.state.fraction), message)
        for listener in list(self.listeners):
            listener(self.state)
        if check:
            self.check()

    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self):
        if self._cancel.is_set():
            raise MergeCancelled("merge cancelled by the user")

    def snapshot(self) -> ProgressState:
        with self._lock:
            return ProgressState(**vars(self.state))
