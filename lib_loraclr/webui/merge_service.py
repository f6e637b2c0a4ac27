"""The merge behind the WebUI tab and the REST API: check a request, run it as a background job.

Everything that can be refused without the model (names, triggers, architectures, the output
name) is refused before the job starts, with a message meant for the tab. The job holds the
host's queue lock for its whole run, so a merge and a generation never use the model at the
same time, and reads the checkpoint's own weights (``WebUIHost.base_model``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..jobs import JobManager, JobStatus
from ..lora.base import sidecar_path
from ..lora.writer import safe_output_path
from ..merge.engine import check_concepts
from ..merge.objective import MergeSettings
from ..merge.pipeline import check_output, load_concepts, merge_to_file
from .host import WebUIHost

REPORT_SUFFIX = ".loraclr-report.json"


@dataclass
class MergeRequest:
    """loras: names from the host's LoRA list; one trigger and weight per LoRA.

    output: file name for the merged LoRA (".safetensors" added), written to the host's
    output folder; settings: ``MergeSettings`` fields to change from the defaults.
    """

    loras: list[str]
    triggers: list[str]
    output: str
    weights: list[float] | None = None
    settings: dict = field(default_factory=dict)
    overwrite: bool = False

    @classmethod
    def from_dict(cls, values: Mapping) -> "MergeRequest":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown merge request key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def merge_settings(self) -> MergeSettings:
        known = {f.name for f in dataclasses.fields(MergeSettings)}
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise ValueError(f"unknown merge setting(s) {unknown}; known: {sorted(known)}")
        return MergeSettings(**self.settings)


def report_path_for(out_path: str) -> str:
    return out_path[: -len(".safetensors")] + REPORT_SUFFIX


class MergeService:
    """Starts, polls and cancels merges on the host's loaded model."""

    def __init__(self, host: WebUIHost):
        self.host = host
        self.jobs = JobManager(lock=host.queue_lock)

    def resolve(self, names: Sequence[str]) -> list[str]:
        files = self.host.lora_files()
        missing = [name for name in names if name not in files]
        if missing:
            raise FileNotFoundError(f"LoRA(s) {missing} are not in {self.host.lora_dir()} (refresh the list?)")
        return [files[name] for name in names]

    def output_path(self, name: str, overwrite: bool) -> str:
        out_path = safe_output_path(self.host.output_dir(), name)
        check_output(out_path, overwrite)
        report = report_path_for(out_path)
        if os.path.exists(report) and not overwrite:
            raise FileExistsError(f"{report} already exists; choose another name or allow overwriting")
        return out_path

    def start(self, request: MergeRequest) -> str:
        """Check the request and start the job; returns its id. Raises with a user-facing message."""
        if len(request.loras) < 2:
            raise ValueError("pick at least two LoRAs to merge")
        if len(request.triggers) != len(request.loras):
            raise ValueError(f"{len(request.loras)} LoRAs but {len(request.triggers)} trigger entries")
        settings = request.merge_settings()
        out_path = self.output_path(request.output, request.overwrite)
        paths = self.resolve(request.loras)
        concepts = load_concepts(paths, [t.strip() for t in request.triggers], request.weights)
        check_concepts(concepts)
        host = self.host

        def work(progress) -> dict:
            with host.base_model() as model:
                summary = merge_to_file(
                    model, concepts, settings, out_path, overwrite=request.overwrite,
                    report_path=report_path_for(out_path), progress=progress,
                )
            host.refresh_host_loras()
            summary["sidecar"] = sidecar_path(out_path)
            summary["report"] = report_path_for(out_path)
            summary["name"] = os.path.splitext(os.path.basename(out_path))[0]
            return summary

        return self.jobs.start(work)

    def status(self, job_id: str) -> JobStatus:
        return self.jobs.status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        return self.jobs.cancel(job_id)

    def latest(self) -> JobStatus | None:
        """The most recent job, so a reloaded page can show it again."""
        if not self.jobs.jobs:
            return None
        return self.jobs.status(next(reversed(self.jobs.jobs)))
