"""The toy-world quality benchmark: single LoRA vs stacking vs merges vs CLoRA, by concept count.

    python -m bench.toyworld.run [--counts 2,3,4,6,8] [--seeds 2] [--first-seed 0] [--out out/toyworld]
                                 [--methods stack,svd,lsq,loraclr,clora] [--steps 20]
                                 [--prompt "a zorb and a quib" --prompt "a dax and a green circle" ...]

For each count N, the first N concepts of ``world.CONCEPTS`` are loaded together:
- stack: all N LoRAs applied at once (plain stacking; what a WebUI does with N <lora:> tags);
- svd / lsq / loraclr: the N LoRAs merged into one file by ``lib_loraclr.merge.pipeline.merge_to_file``;
- clora: CLoRA composition (``CLoRAPipeline``) with the LoRAs of the concepts the prompt names
  (multi-concept prompts only; with one concept it is that LoRA alone).
Prompts (each with every seed first-seed .. first-seed + S - 1):
- single-concept: "a <t>" and "a <t> and a <plain object>" for each loaded concept; the
  single-LoRA reference is the concept's own LoRA alone on the same prompts and seeds;
- multi-concept: "a <t_i> and a <t_j>" for consecutive pairs of the loaded concepts, or
  the ``--prompt`` texts instead: objects joined by " and ", each "a <trigger>" or
  "a <colour> [striped] <shape>", naming at least two concepts (a prompt is used at each
  count N that loads all its concepts).
Images are judged by ``judge.score``: recall, fidelity, exact, bleeding (wrong attribute
values that belong to another loaded concept), alignment (the prompt's plain object and
the background). Writes table.txt, results.json, plot.png and grid.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import torch

from lib_loraclr.compose.concepts import LoraConcept
from lib_loraclr.compose.pipeline import CLoRAPipeline
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.hosts.diffusers import load_base
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.merge.distill import pair_indices
from lib_loraclr.merge.engine import Concept as MergeConcept
from lib_loraclr.merge.objective import MergeSettings
from lib_loraclr.merge.pipeline import merge_to_file
from lib_loraclr.runtime import LoraRuntime

from .generate import GUIDANCE, STEPS, generate
from .judge import score
from .model import latents_to_images
from .train_base import DEFAULT_OUT as BASE_DIR
from .train_loras import LORA_DIR
from .world import COLOURS, CONCEPTS, SHAPES, SIZE, STYLES, Concept, Style

# compositions: name -> ComposeSettings changes; the last three are CLoRA's diagnosis rows
COMPOSITIONS = {
    "clora": {"method": "clora"},  # CLoRA with one owner per pixel (exclusive masks)
    "masked": {"method": "masked"},  # the single-pass mode
    "clora_paper": {"method": "clora", "exclusive_masks": False},  # the paper's union masks, overlaps averaged
    "clora_masks_only": {"method": "clora", "use_latent_update": False},
    "clora_update_only": {"method": "clora", "use_masks": False},
}
PROMPT_TEMPLATE = "a {}"  # the merges' concept prompts, in the world's caption style ("a quib")
METHODS = ("stack", "svd", "lsq", "loraclr", "distill", "clora", "masked")
ALL_METHODS = METHODS + tuple(m for m in COMPOSITIONS if m not in METHODS)
MERGES = ("svd", "lsq", "loraclr")
METRICS = ("recall", "fidelity", "exact", "bleeding", "bleeding_drawn", "alignment")


def plain_object(concept: Concept) -> dict:
    """A fixed plain object for "a <t> and a <object>" prompts, sharing no attribute with the concept."""
    shape = SHAPES[(SHAPES.index(concept.shape) + 2) % len(SHAPES)]
    colour = list(COLOURS)[(list(COLOURS).index(concept.colour) + 3) % len(COLOURS)]
    pattern = "striped" if concept.pattern == "solid" else "solid"
    return {"shape": shape, "colour": colour, "pattern": pattern}


def phrase(obj: dict) -> str:
    return " ".join([obj["colour"]] + (["striped"] if obj["pattern"] == "striped" else []) + [obj["shape"]])


def single_prompts(index: int) -> list[dict]:
    concept = CONCEPTS[index]
    me = {**concept.attributes(), "concept": True}
    other = plain_object(concept)
    return [
        {"prompt": f"a {concept.trigger}", "concepts": [index], "wanted": [me]},
        {"prompt": f"a {concept.trigger} and a {phrase(other)}", "concepts": [index], "wanted": [me, other]},
    ]


def parse_prompt(text: str) -> dict:
    """A prompt job from free text: "a zorb and a red striped circle" -> concepts + wanted objects."""
    triggers = {c.trigger: k for k, c in enumerate(CONCEPTS)}
    concepts, wanted = [], []
    for part in text.strip().split(" and "):
        words = part.split()
        if words[:1] in (["a"], ["an"]):
            words = words[1:]
        if len(words) == 1 and words[0] in triggers:
            concepts.append(triggers[words[0]])
            wanted.append({**CONCEPTS[triggers[words[0]]].attributes(), "concept": True})
        elif len(words) in (2, 3) and words[0] in COLOURS and words[-1] in SHAPES and words[1:-1] in ([], ["striped"]):
            wanted.append({"shape": words[-1], "colour": words[0], "pattern": "striped" if len(words) == 3 else "solid"})
        else:
            raise ValueError(f"cannot read {part!r} in prompt {text!r}: use 'a <trigger>' "
                             f"({', '.join(triggers)}) or 'a <colour> [striped] <shape>'")
    if len(set(concepts)) < 2:
        raise ValueError(f"prompt {text!r} names fewer than two different concepts")
    return {"prompt": text.strip(), "concepts": list(dict.fromkeys(concepts)), "wanted": wanted}


def pair_prompts(count: int) -> list[dict]:
    """The merge's pair teacher's pairs (each concept with the next), as prompts to judge."""
    return [{"prompt": f"a {CONCEPTS[i].trigger} and a {CONCEPTS[j].trigger}", "concepts": [i, j],
             "wanted": [{**CONCEPTS[i].attributes(), "concept": True}, {**CONCEPTS[j].attributes(), "concept": True}]}
            for i, j in pair_indices(count)]


def judge_all(images, jobs, loaded: list[int]) -> list[dict]:
    rows = []
    for image, job in zip(images, jobs):
        others = [CONCEPTS[k].attributes() for k in loaded if k not in job["concepts"]]
        result = score(image, job["wanted"], other_concepts=others, **job.get("judge", {}))
        rows.append({"prompt": job["prompt"], "seed": job["seed"], **{m: result[m] for m in METRICS},
                     "found": result["found"], "concepts": "+".join(CONCEPTS[k].trigger for k in job["concepts"])})
    return rows


def mean_scores(rows: list[dict]) -> dict:
    """Per-metric means (None where no image has a value: e.g. no prompt at this count)."""
    means = {}
    for metric in METRICS:
        values = [r[metric] for r in rows if r[metric] is not None]
        means[metric] = round(float(np.mean(values)), 4) if values else None
    return means | {"images": len(rows)}


def by_key(rows: list[dict], key) -> dict:
    """``mean_scores`` per group of rows (e.g. per prompt): which pair or concept a mean hides."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {name: mean_scores(group) for name, group in groups.items()}


def with_style(prompts: list[dict], style: Style | None) -> list[dict]:
    """The prompts with ", <style words>" appended and the judge told the style's background and outline."""
    if style is None:
        return prompts
    return [{**p, "prompt": f"{p['prompt']}, {style.trigger}",
             "judge": {"background": style.background, "hollow": style.hollow}} for p in prompts]


def style_file(style: Style) -> str:
    return f"{style.trigger.replace(' ', '_')}.safetensors"


def expand(prompts: list[dict], seeds: int, first_seed: int = 0) -> list[dict]:
    return [{**p, "seed": s} for p in prompts for s in range(first_seed, first_seed + seeds)]


def generate_with(model, loras, jobs, steps):
    if not jobs:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    with LoraRuntime(model.targets(), loras):
        return generate(model, [j["prompt"] for j in jobs], [j["seed"] for j in jobs], steps=steps)


class UnetRows:
    """Counts the batch rows through the UNet (a pass over [uncond, cond] of one image = 2 rows)."""

    def __init__(self, unet):
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def close(self):
        self._handle.remove()


def mask_iou(masks: torch.Tensor, concept_pixels: list) -> list[float]:
    """IoU of each subject's fusion mask (P, 1, 1, h, w: pass g + 1 is subject g) with the pixels of
    the object the judge matched to it (0 when none was found)."""
    ious = []
    for g, pixels in enumerate(concept_pixels):
        owned = masks[g + 1, 0, 0].numpy() > 0
        owned = np.kron(owned, np.ones((SIZE // owned.shape[0], SIZE // owned.shape[1]), bool))
        if pixels is None:
            ious.append(0.0)
            continue
        union = (owned | pixels).sum()
        ious.append(float((owned & pixels).sum() / union) if union else 0.0)
    return ious


def subject_overlap(masks: torch.Tensor) -> float:
    """Mean IoU between the subjects' masks (P, 1, 1, h, w; pass 0 is the base): 0 = separated."""
    owned = [masks[p, 0, 0] > 0 for p in range(1, masks.shape[0])]
    pairs = [(a & b).sum() / (a | b).sum().clamp(min=1) for i, a in enumerate(owned) for b in owned[i + 1:]]
    return float(torch.stack(pairs).mean()) if pairs else 0.0


def composition_images(model, lora_files, jobs, steps, settings, loaded, style_loras=()):
    """Images, judged rows with mask IoU (final step and per step) and the cost of each composition."""
    pipeline = CLoRAPipeline(model)
    images, rows, per_step, seconds = [], [], [], 0.0
    counter = UnetRows(model.unet)
    try:
        for job in jobs:
            concepts = [LoraConcept(CONCEPTS[k].trigger) for k in job["concepts"]]
            t0 = time.perf_counter()
            result = pipeline(job["prompt"], concepts, [lora_files[k] for k in job["concepts"]], steps=steps,
                              seed=job["seed"], height=SIZE, width=SIZE, settings=settings, decode=False,
                              keep_mask_history=True, styles=[(lora, None) for lora in style_loras])
            seconds += time.perf_counter() - t0
            image = latents_to_images(result.latents)[0]
            images.append(image)
            others = [CONCEPTS[k].attributes() for k in loaded if k not in job["concepts"]]
            judged = score(image, job["wanted"], other_concepts=others, **job.get("judge", {}))
            row = {"prompt": job["prompt"], "seed": job["seed"], **{m: judged[m] for m in METRICS},
                   "found": judged["found"], "mask_iou": float(np.mean(mask_iou(result.masks, judged["concept_pixels"])))}
            rows.append(row)
            per_step.append([float(np.mean(mask_iou(m, judged["concept_pixels"]))) for m in result.mask_history])
            updates = [loss for step in result.loss_history for loss in step]
            if updates:  # the contrastive loss before the first and before the last latent update
                row["loss_first"], row["loss_last"] = updates[0], updates[-1]
            row["subject_overlap"] = subject_overlap(result.masks)
    finally:
        counter.close()
    cost = {"unet_rows_per_image": counter.rows / max(len(jobs), 1), "seconds_per_image": seconds / max(len(jobs), 1)}
    return np.stack(images) if images else np.zeros((0, SIZE, SIZE, 3), np.uint8), rows, per_step, cost


def plain_cost(model, jobs, steps) -> dict:
    """Plain sampling of the same prompts, one image at a time as the compositions run: the cost reference."""
    counter, seconds = UnetRows(model.unet), 0.0
    try:
        for job in jobs:
            t0 = time.perf_counter()
            generate(model, [job["prompt"]], [job["seed"]], steps=steps)
            seconds += time.perf_counter() - t0
    finally:
        counter.close()
    return {"unet_rows_per_image": counter.rows / max(len(jobs), 1), "seconds_per_image": seconds / max(len(jobs), 1)}


def run(base: str = BASE_DIR, lora_dir: str = LORA_DIR, counts=(2, 3, 4, 6, 8), seeds: int = 2,
        methods=METHODS, steps: int = STEPS, out: str | None = None, log=print,
        clora_refine_iters: int = 4, capture_steps: int = 20, first_seed: int = 0,
        prompts: list[dict] | None = None, style: Style | None = None, merge_settings: dict | None = None,
        compose_settings: dict | None = None) -> dict:
    started = time.time()
    model = load_base(base)
    needed = max(counts)
    lora_files = [read_lora(os.path.join(lora_dir, f"{c.trigger}.safetensors")) for c in CONCEPTS[:needed]]
    extra = [read_lora(os.path.join(lora_dir, style_file(style)))] if style else []  # a global style on every image
    # maps at 8x8 (the UNet's first level); the paper's 20 refinement iterations cost too much CPU time
    clora_settings = ComposeSettings(**{"attention_res_divisor": SIZE // 8, "guidance_scale": GUIDANCE,
                                        "refinement_iters": clora_refine_iters, **(compose_settings or {})})
    images_for_grid: dict = {}

    # the single-LoRA reference: each concept's LoRA alone on its own prompts
    reference_images = {}
    for k in range(needed):
        jobs = expand(with_style(single_prompts(k), style), seeds, first_seed)
        reference_images[k] = (jobs, generate_with(model, [lora_files[k]] + extra, jobs, steps))
    log(f"single-LoRA references: {time.time() - started:.0f}s")

    results = {"settings": {"counts": list(counts), "seeds": list(range(first_seed, first_seed + seeds)),
                            "methods": list(methods), "steps": steps,
                            "multi_concept_prompts": None if prompts is None else [p["prompt"] for p in prompts],
                            "style": None if style is None else style.trigger, "merge_settings": merge_settings or {},
                            "compose_settings": compose_settings or {},
                            "guidance": GUIDANCE, "clora_refinement_iters": clora_refine_iters, "base": base, "concepts": [c.__dict__ for c in CONCEPTS[:needed]]},
               "by_count": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            loaded = list(range(count))
            single_jobs = [j for k in loaded for j in reference_images[k][0]]
            multi = pair_prompts(count) if prompts is None else [p for p in prompts if max(p["concepts"]) < count]
            pair_jobs = expand(with_style(multi, style), seeds, first_seed)
            entry = {"single": {"single_prompts": mean_scores(judge_all(
                np.concatenate([reference_images[k][1] for k in loaded]), single_jobs, loaded))}}
            grid = {"single": np.concatenate([reference_images[k][1] for k in loaded])}
            stacked_report, plain = None, None
            for method in methods:
                t0 = time.time()
                info = {}
                if method in COMPOSITIONS:
                    single_rows = None
                    plain = plain if plain is not None else plain_cost(model, pair_jobs, steps)
                    pair_images, pair_rows, per_step, cost = composition_images(
                        model, lora_files, pair_jobs, steps, dataclasses.replace(clora_settings, **COMPOSITIONS[method]),
                        loaded, extra)
                    all_images = pair_images
                    info["mask_iou"] = round(float(np.mean([r["mask_iou"] for r in pair_rows])), 4) if pair_rows else None
                    info["mask_iou_by_step"] = [round(float(v), 4) for v in np.mean(per_step, axis=0)] if per_step else []
                    for key in ("loss_first", "loss_last", "subject_overlap"):
                        values = [r[key] for r in pair_rows if key in r]
                        info[key] = round(float(np.mean(values)), 4) if values else None
                    info["cost"] = {key: round(value / plain[key], 2) for key, value in cost.items()}
                else:
                    if method == "stack":
                        loras = lora_files[:count] + extra
                    else:
                        path = os.path.join(scratch, f"{method}_{count}.safetensors")
                        summary = merge_to_file(
                            model, [MergeConcept(lora_files[k], CONCEPTS[k].trigger) for k in loaded],
                            MergeSettings(method=method, capture_size=SIZE, capture_steps=capture_steps,
                                          prompt_template=PROMPT_TEMPLATE, guidance_scale=GUIDANCE,
                                          **(merge_settings or {})), path, overwrite=True)
                        info["merge_seconds"] = round(summary["seconds"]["total"], 1)
                        info["ranks"] = sorted(set(summary["ranks"].values()))
                        info["report"] = report_means(summary, method)
                        stacked_report = report_means(summary, "sum", "stacked")
                        loras = [read_lora(path)] + extra
                    all_images = generate_with(model, loras, single_jobs + pair_jobs, steps)
                    single_rows = judge_all(all_images[:len(single_jobs)], single_jobs, loaded)
                    pair_images = all_images[len(single_jobs):]
                if method not in COMPOSITIONS:
                    pair_rows = judge_all(pair_images, pair_jobs, loaded)
                entry[method] = {**info, "pair_prompts": mean_scores(pair_rows),
                                 "pair_prompts_by_prompt": by_key(pair_rows, lambda row: row["prompt"]),
                                 "seconds": round(time.time() - t0, 1)}
                if single_rows is not None:
                    entry[method]["single_prompts"] = mean_scores(single_rows)
                    entry[method]["single_prompts_by_concept"] = by_key(single_rows, lambda row: row["concepts"])
                grid[method] = (all_images[:len(single_jobs)] if method not in COMPOSITIONS else None, pair_images)
                log(f"N={count} {method}: {time.time() - t0:.0f}s")
            if "stack" in entry and stacked_report is not None:
                entry["stack"]["report"] = stacked_report  # stacking = a lossless sum merge, measured beside each merge
            results["by_count"][str(count)] = entry
            images_for_grid[count] = (single_jobs, pair_jobs, grid)
            if out:  # partial results after every count, so a long run can be read while it goes
                _write(results, out, partial=True)
    results["seconds"] = round(time.time() - started, 1)
    results["table"] = format_table(results)
    if out:
        _write(results, out)
        from .plots import image_grid, score_plot

        score_plot(results, os.path.join(out, "plot.png"))
        last = max(images_for_grid)
        image_grid(*images_for_grid[last], os.path.join(out, "grid.png"), count=last)
    return results


def report_means(summary: dict, method: str, end_to_end_key: str = "merged") -> dict | None:
    """Mean over concepts of the merge report's overall retention / crosstalk and end-to-end figure."""
    quality = (summary.get("quality") or {}).get(method)
    figures = summary.get("end_to_end") or {}
    if not quality:
        return None

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "retention": mean(q["overall"]["retention"] for q in quality.values()),
        "crosstalk": mean(q["overall"]["crosstalk"] for q in quality.values()),
        "end_to_end": mean(figures.get(end_to_end_key, {}).values()),
    }


def _write(results: dict, out: str, partial: bool = False) -> None:
    os.makedirs(out, exist_ok=True)
    table = format_table(results) if partial else results["table"]
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({**results, "partial": partial}, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")


def _cell(reference, value):
    if reference is None or value is None:
        return "-"
    return f"{reference:.2f}->{value:.2f} ({value - reference:+.2f})"


def _number(value):
    return "-" if value is None else f"{value:.2f}"


def _section(title: str, columns: list[str], by_count, cell) -> list[str]:
    """A titled table: one row per N, one ``cell(entry[method])`` per column."""
    lines = ["", title, "| N | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for count, entry in by_count:
        lines.append(f"| {count} | " + " | ".join(cell(entry.get(m, {})) for m in columns) + " |")
    return lines


def format_table(results: dict) -> str:
    methods = list(results["settings"]["methods"])
    merged = [m for m in methods if m not in COMPOSITIONS]  # compositions have no single-concept images of their own
    composed = [m for m in methods if m in COMPOSITIONS]
    by_count = results["by_count"].items()
    lines = []
    for metric, title in (("fidelity", "fidelity (share of the concept's shape/colour/pattern right)"),
                          ("alignment", "alignment (plain object + background)")):
        if not merged:
            break
        lines += [f"Single-concept prompts: {title}, single LoRA -> method (difference)",
                  "| N | " + " | ".join(merged) + " |", "|---|" + "---|" * len(merged)]
        for count, entry in by_count:
            ref = entry["single"]["single_prompts"][metric]
            lines.append(f"| {count} | " + " | ".join(_cell(ref, entry[m]["single_prompts"][metric]) for m in merged) + " |")
        lines.append("")
    custom = results["settings"].get("multi_concept_prompts")
    lines += [("Multi-concept prompts (--prompt)" if custom else "Two-concept prompts \"a <t_i> and a <t_j>\"")
              + ": fidelity / recall / bleeding (single LoRA column: the concepts' own fidelity on their single prompts)",
              "| N | single | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for count, entry in by_count:
        ref = entry["single"]["single_prompts"]["fidelity"]
        cells = [" / ".join(_number(entry[m]["pair_prompts"][k]) for k in ("fidelity", "recall", "bleeding"))
                 for m in methods]
        lines.append(f"| {count} | {_number(ref)} | " + " | ".join(cells) + " |")
    # why stacking's bleeding can be low: it draws few of the objects; per drawn object it is not
    lines += _section("Bleeding per drawn object (over the concepts whose object was found): single LoRA on its "
                      "own single prompts (its error floor), each method on the multi-concept prompts",
                      ["single"] + methods, by_count, lambda info: _number(
                          (info.get("pair_prompts") or info.get("single_prompts") or {}).get("bleeding_drawn")))
    if composed:
        def composition_cell(info):
            steps = info.get("mask_iou_by_step") or []
            marks = [steps[max(0, round(len(steps) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)] if steps else []
            cost = info.get("cost") or {}
            loss = (f"{_number(info.get('loss_first'))}->{_number(info.get('loss_last'))}"
                    if info.get("loss_first") is not None else "-")
            return (f"{_number(info.get('mask_iou'))} ({' '.join(_number(v) for v in marks)}) / "
                    f"{_number(info.get('subject_overlap'))} / {loss} / "
                    f"{_number(cost.get('unet_rows_per_image'))}x rows, {_number(cost.get('seconds_per_image'))}x s")

        lines += _section("Compositions: mask IoU (each subject's final mask vs the judged object; per step at "
                          "25/50/75/100%) / subjects' mask overlap (IoU between subjects' final masks) / "
                          "contrastive loss at the first -> last latent update / cost (UNet rows and seconds per "
                          "image, relative to plain sampling one image at a time)", composed, by_count, composition_cell)
    reported = [m for m in merged if any("report" in entry.get(m, {}) for _, entry in by_count)]
    if reported:
        lines += _section("Merge report (mean over the loaded concepts): retention / crosstalk / end to end "
                          "(the whole UNet's output kept on fresh latents: 1 = the concept's own LoRA, 0 = base)",
                          reported, by_count, lambda info: " / ".join(
                              _number((info.get("report") or {}).get(k)) for k in ("retention", "crosstalk", "end_to_end")))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=BASE_DIR)
    parser.add_argument("--loras", default=LORA_DIR)
    parser.add_argument("--counts", default="2,3,4,6,8")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="a multi-concept prompt to use instead of the built-in pairs (repeatable)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--style", choices=[s.trigger.split()[0] for s in STYLES],
                        help="a global style on every image: its words end every prompt, its LoRA joins every method")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default=os.path.join("out", "toyworld"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clora-refine-iters", type=int, default=4,
                        help="CLoRA refinement iterations at its refinement steps (paper: 20; 4 keeps CPU time sane)")
    parser.add_argument("--merge-setting", action="append", default=[], metavar="NAME=JSON",
                        help="a merge setting for every merge method, e.g. distill_iters=600 (repeatable)")
    parser.add_argument("--compose-setting", action="append", default=[], metavar="NAME=JSON",
                        help="a composition setting for every composition method, e.g. warmup_steps=2 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    merge_settings = _settings(parser, "--merge-setting", args.merge_setting, MergeSettings)
    compose_settings = _settings(parser, "--compose-setting", args.compose_setting, ComposeSettings)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    counts = [int(c) for c in args.counts.split(",")]
    if min(counts) < 2 or max(counts) > len(CONCEPTS):
        parser.error(f"counts must be between 2 and {len(CONCEPTS)}")
    try:
        prompts = None if args.prompts is None else [parse_prompt(p) for p in args.prompts]
    except ValueError as error:
        parser.error(str(error))
    if prompts is not None and not any(max(p["concepts"]) < max(counts) for p in prompts):
        parser.error(f"no --prompt has all its concepts among the first {max(counts)} ({', '.join(c.trigger for c in CONCEPTS[:max(counts)])})")
    results = run(args.base, args.loras, counts, args.seeds, methods, args.steps, args.out,
                  log=lambda m: print(m, flush=True), clora_refine_iters=args.clora_refine_iters,
                  first_seed=args.first_seed, prompts=prompts,
                  style=next((s for s in STYLES if s.trigger.split()[0] == args.style), None),
                  merge_settings=merge_settings, compose_settings=compose_settings)
    print(results["table"])
    print(f"wrote {args.out}/results.json, table.txt, plot.png, grid.png ({results['seconds']:.0f}s)")


def _settings(parser, option: str, values: list[str], settings_type) -> dict:
    """NAME=JSON options -> a dict of settings, checked by the settings type itself."""
    try:
        settings = {name: json.loads(value) for name, value in (v.split("=", 1) for v in values)}
        settings_type(**settings)
    except (ValueError, TypeError) as error:
        parser.error(f"{option}: {error}")
    return settings


if __name__ == "__main__":
    main()
