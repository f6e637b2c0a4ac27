"""Files in, one merged LoRA file out: the job the CLI, the tab and the REST API all run."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Optional

from .. import __version__
from ..lora.base import LoraFile, sidecar_path
from ..lora.writer import LORA_SUFFIX, KohyaWriter, check_output_files, sidecar_bytes, write_files
from ..model import ModelAccess
from ..progress import Progress
from ..validation import InputError, Strength, Trigger, checked, text
from .engine import Concept, LoraclrMerge
from .objective import MergeSettings
from .report import format_table


def check_outputs(
    out_path: str, overwrite: bool, report_path: str | None = None, inputs: Sequence[str] = ()
) -> list[str]:
    """Fail before any work when the outputs (LoRA, its sidecar, the report) could not all be written.

    ``inputs`` are the merge's LoRA files: neither they nor their sidecars are ever replaced,
    even with ``overwrite`` (``check_output_files``). Returns the output paths.
    """
    if not out_path.endswith(LORA_SUFFIX):
        raise ValueError(f"output {out_path!r} must end in {LORA_SUFFIX}")
    outputs = {"output": out_path, "sidecar": sidecar_path(out_path)}
    if report_path:
        outputs["report"] = report_path
    check_output_files(outputs, overwrite, [p for source in inputs for p in (source, sidecar_path(source))])
    return list(outputs.values())


def json_safe(value):
    """NaN / Inf floats -> None, so a report is valid JSON (a layer with no effect has no ratios)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def merge_to_file(
    model: ModelAccess,
    concepts: list[Concept],
    settings: MergeSettings,
    out_path: str,
    *,
    overwrite: bool = False,
    report_path: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Merge, write ``out_path`` + its sidecar (+ report JSON) all at once; returns the summary dict."""
    progress = progress or Progress()
    check_outputs(out_path, overwrite, report_path, [c.lora.path for c in concepts])
    started = time.perf_counter()
    progress.update("load", 1, 1, message=f"merging {len(concepts)} LoRAs with {settings.method}")
    merge = LoraclrMerge(model, concepts, settings, progress)
    lossless = settings.method in ("sum", "distill")  # both are exact at the sum of the ranks
    writer = KohyaWriter(
        model.arch,
        rank=settings.rank,
        energy=1.0 if lossless else settings.energy,
        max_rank=sum(max(m.rank for m in c.lora.modules.values()) for c in concepts) if lossless else settings.max_rank,
        clamp_quantile=None if lossless else settings.clamp_quantile,
    )
    result = merge.run(writer)
    writer.seal()
    reports = merge.measure(writer) if settings.report else {}
    end_to_end_figures = merge.end_to_end(writer) if settings.end_to_end else None

    progress.update("write", 0, 2, message="writing the merged LoRA")
    names = [c.lora.name for c in concepts]
    metadata = {
        "loraclr_version": __version__,
        "loraclr_method": settings.method,
        "loraclr_settings": json.dumps(settings.to_dict()),
        "loraclr_inputs": json.dumps([
            {"file": os.path.basename(c.lora.path), "trigger": c.trigger, "weight": c.weight} for c in concepts
        ]),
        "loraclr_arch": model.arch,
        "ss_output_name": os.path.splitext(os.path.basename(out_path))[0],
        "ss_tag_frequency": json.dumps({"loraclr": {c.trigger: 1 for c in concepts}}),
    }
    if reports:
        metadata["loraclr_quality"] = json_safe({m: {n: f["overall"] for n, f in r.items()} for m, r in reports.items()})
    write_started = time.perf_counter()
    lora_bytes, written = writer.encode(out_path, metadata)
    files = {
        out_path: lora_bytes,
        sidecar_path(out_path): sidecar_bytes(", ".join(c.trigger for c in concepts), arch=model.arch,
                                              description=f"LoRACLR merge ({settings.method}) of {', '.join(names)}"),
    }
    summary = {
        "output": out_path,
        "method": settings.method,
        "solver": settings.solver if settings.method == "loraclr" else None,
        "concepts": [{"file": c.lora.path, "trigger": c.trigger, "weight": c.weight} for c in concepts],
        "layers": len(written["ranks"]),
        "ranks": written["ranks"],
        "svd_errors": written["errors"],
        "seconds": {**result.seconds, "write": time.perf_counter() - write_started, "total": time.perf_counter() - started},
        "memory": {"budget_bytes": result.budget_bytes, "passes": result.passes, "batches": result.batches,
                   "peak_statistics_bytes": result.peak_stats_bytes},
        "distill": result.distill,
        "quality": reports,
        "end_to_end": end_to_end_figures,
        "settings": settings.to_dict(),
    }
    if report_path:
        files[report_path] = json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False).encode()
    write_files(files, overwrite)
    progress.update("write", 2, 2, message=f"wrote {out_path}", check=False)
    summary["table"] = format_table(reports, end_to_end_figures)
    return summary


@checked(frozen=True, what="concept")
class ConceptInput:
    """One LoRA to merge as the user gave it: trigger None = read from its sidecar or metadata."""

    path: text(min_length=1, max_length=4096)
    trigger: Optional[Trigger] = None
    weight: Strength = 1.0


def load_concepts(
    paths: Sequence[str], triggers: Sequence[str | None] | None, weights: Sequence[float] | None = None
) -> list[Concept]:
    """Read LoRA files and pair them with triggers (given, or from the file's sidecar/metadata).

    A trigger given as an empty string is an error, never replaced from the file.
    """
    from ..lora.reader import read_lora

    if triggers and len(triggers) != len(paths):
        raise ValueError(f"{len(paths)} LoRAs but {len(triggers)} triggers: give one --trigger per --lora")
    if weights and len(weights) != len(paths):
        raise ValueError(f"{len(paths)} LoRAs but {len(weights)} weights: give one --weight per --lora")
    specs = []
    for index, path in enumerate(paths):
        trigger = triggers[index] if triggers else None
        if isinstance(trigger, str):
            trigger = trigger.strip()
            if not trigger:
                raise ValueError(f"{path}: its trigger words are empty; each LoRA needs the words that call up its concept")
        try:
            specs.append(ConceptInput(path, trigger, weights[index] if weights else 1.0))
        except InputError as error:
            raise error.renamed({}, f"LoRA {index + 1} ({os.path.basename(str(path))})") from None
    concepts = []
    for spec in specs:
        lora: LoraFile = read_lora(spec.path)
        trigger = spec.trigger or ", ".join(lora.triggers[:1])
        if not trigger:
            raise ValueError(f"{spec.path}: no trigger words given and none found in its metadata or sidecar")
        concepts.append(Concept(lora, trigger, spec.weight))
    return concepts
