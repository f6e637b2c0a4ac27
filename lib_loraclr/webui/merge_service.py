"""The merge behind the WebUI tab and the REST API: check a request, run it as a background job.

Everything that can be refused without the model (names, triggers, architectures, the output
name) is refused before the job starts, with a message meant for the tab. The job holds the
host's queue lock for its whole run, so a merge and a generation never use the model at the
same time, and reads the checkpoint's own weights (``WebUIHost.base_model``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import List, Optional

from ..jobs import JobManager, JobStatus
from ..lora.base import sidecar_path
from ..lora.writer import safe_output_path
from ..merge.engine import check_concepts
from ..merge.objective import MergeSettings
from ..merge.pipeline import check_outputs, load_concepts, merge_to_file
from ..validation import LoraName, StrictBool, Strength, Trigger, checked, from_mapping, text
from ..hosts.webui_host import WebUIHost

REPORT_SUFFIX = ".loraclr-report.json"
MAX_MERGE_LORAS = 32


@checked(what="merge request", unknown="merge request key")
class MergeRequest:
    """loras: names from the host's LoRA list; one trigger and weight per LoRA.

    triggers: a LoRA's trigger words, or None to take them from its sidecar or metadata.
    output: file name for the merged LoRA (".safetensors" added), written to the host's
    output folder; settings: ``MergeSettings`` or a dict of the fields to change from the
    defaults. The annotations are the one check of each value (``validation.checked``).
    """

    loras: List[LoraName]
    triggers: List[Optional[Trigger]]
    output: text(max_length=255)
    weights: Optional[List[Strength]] = None
    settings: MergeSettings = field(default_factory=MergeSettings)
    overwrite: StrictBool = False

    def __post_init_post_parse__(self):
        if len(self.loras) > MAX_MERGE_LORAS:
            raise ValueError(f"at most {MAX_MERGE_LORAS} LoRAs can be merged at once, got {len(self.loras)}")

    @classmethod
    def from_dict(cls, values: Mapping) -> "MergeRequest":
        return from_mapping(cls, values)

    def merge_settings(self) -> MergeSettings:
        return self.settings


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

    def start(self, request: MergeRequest) -> str:
        """Check the request and start the job; returns its id. Raises with a user-facing message.

        Everything the job will write (LoRA, sidecar, report) is checked here, before the job
        queues for the model.
        """
        if len(request.loras) < 2:
            raise ValueError("pick at least two LoRAs to merge")
        if len(request.triggers) != len(request.loras):
            raise ValueError(f"{len(request.loras)} LoRAs but {len(request.triggers)} trigger entries")
        settings = request.merge_settings()
        out_path = safe_output_path(self.host.output_dir(), request.output)
        paths = self.resolve(request.loras)
        check_outputs(out_path, request.overwrite, report_path_for(out_path), paths)
        concepts = load_concepts(paths, request.triggers, request.weights)
        check_concepts(concepts)
        host = self.host

        def work(progress) -> dict:
            with host.busy("LoRACLR merge", progress), host.base_model() as model:
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
