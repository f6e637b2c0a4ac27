"""Files in, one merged LoRA file out: the job the CLI, the tab and the REST API all run."""

from __future__ import annotations

import json
import os
import time

from .. import __version__
from ..lora.base import LoraFile, sidecar_path
from ..lora.writer import KohyaWriter, atomic_write, write_sidecar
from ..model import ModelAccess
from .engine import Concept, LoraclrMerge
from .objective import MergeSettings
from .progress import Progress
from .report import format_table


def check_output(out_path: str, overwrite: bool):
    """Fail before any work when the output would clobber a file the user did not offer."""
    if not out_path.endswith(".safetensors"):
        raise ValueError(f"output {out_path!r} must end in .safetensors")
    for path in (out_path, sidecar_path(out_path)):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")


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
    """Merge, write ``out_path`` + its sidecar (+ report JSON); returns the summary dict."""
    progress = progress or Progress()
    check_output(out_path, overwrite)
    if report_path and os.path.exists(report_path) and not overwrite:
        raise FileExistsError(f"{report_path} already exists; choose another name or allow overwriting")
    started = time.perf_counter()
    progress.update("load", 1, 1, message=f"merging {len(concepts)} LoRAs with {settings.method}")
    merge = LoraclrMerge(model, concepts, settings, progress)
    lossless = settings.method == "sum"
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
        metadata["loraclr_quality"] = {m: {n: f["overall"] for n, f in r.items()} for m, r in reports.items()}
    write_started = time.perf_counter()
    written = writer.save(out_path, metadata, overwrite)
    write_sidecar(out_path, ", ".join(c.trigger for c in concepts), overwrite=overwrite, arch=model.arch,
                  description=f"LoRACLR merge ({settings.method}) of {', '.join(names)}")
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
        "quality": reports,
        "settings": settings.to_dict(),
    }
    if report_path:
        atomic_write(report_path, json.dumps(summary, indent=1, default=str).encode(), overwrite)
    progress.update("write", 2, 2, message=f"wrote {out_path}", check=False)
    summary["table"] = format_table(reports) if reports else ""
    return summary


def load_concepts(paths: list[str], triggers: list[str | None], weights: list[float] | None = None) -> list[Concept]:
    """Read LoRA files and pair them with triggers (given, or from the file's sidecar/metadata)."""
    from ..lora.reader import read_lora

    if triggers and len(triggers) != len(paths):
        raise ValueError(f"{len(paths)} LoRAs but {len(triggers)} triggers: give one --trigger per --lora")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"{len(paths)} LoRAs but {len(weights)} weights")
    concepts = []
    for index, path in enumerate(paths):
        lora: LoraFile = read_lora(path)
        trigger = (triggers[index] if triggers else None) or ", ".join(lora.triggers[:1])
        if not trigger:
            raise ValueError(f"{path}: no trigger words given and none found in its metadata or sidecar")
        concepts.append(Concept(lora, trigger, weights[index]))
    return concepts
