"""LoRACLR merge of several concept LoRAs into one delta per layer, in the reference's three stages.

1. text-encoder layers, from inputs captured while encoding each concept's prompts with
   its LoRA applied;
2. UNet cross-attention to_k / to_v, from the merged text encoder's states at the trigger
   tokens and EOS;
3. every other UNet layer, from inputs captured while sampling each concept's prompt with
   its UNet LoRA applied (merged text encoder and merged k/v in place).
Each stage sees the previous stages' merged weights. The per-layer problem is solved by
``solvers``; ``sum`` and ``svd`` need no features but still capture them for the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..lora.base import LoraFile
from ..lora.reader import check_same_arch
from ..model import ModelAccess
from ..runtime import LoraRuntime, shapes_fit
from ..sampling import sample
from .capture import FeatureCollector, layer_matrix, weights_added
from .objective import MergeSettings
from .progress import Progress
from .solvers import solve_fast, solve_lsq, solve_reference, solve_sum
from .stats import LayerStats

PROMPT_TEMPLATE = "photo of a {}"


class MergeInputError(ValueError):
    """Inputs that cannot be merged: the message says which file or trigger and why."""


@dataclass
class Concept:
    lora: LoraFile
    trigger: str
    weight: float = 1.0


@dataclass
class MergeResult:
    deltas: dict[str, torch.Tensor]  # target -> merged delta W* - W0, base weight shape
    concept_deltas: dict[str, list[torch.Tensor | None]]  # target -> per-concept Delta_i (matrix form)
    stats: dict[str, LayerStats]  # target -> captured statistics (empty when not captured)
    stage_of: dict[str, str]
    layer_info: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def stage_of_target(target: str) -> str:
    if not target.startswith("unet."):
        return "text_encoder"
    if target.endswith(("attn2.to_k", "attn2.to_v")):
        return "cross_kv"
    return "unet"


def check_concepts(concepts: list[Concept]):
    """What can be refused before any model is loaded: count, triggers, mixed architectures."""
    if len(concepts) < 2:
        raise MergeInputError("a merge needs at least two LoRAs")
    for concept in concepts:
        if not concept.trigger.strip():
            raise MergeInputError(f"{concept.lora.path}: no trigger words given")
    if len(set(c.trigger.strip().lower() for c in concepts)) < len(concepts):
        names = [c.lora.name for c in concepts]
        raise MergeInputError(f"each LoRA needs its own trigger words; got {[c.trigger for c in concepts]} for {names}")
    check_same_arch([c.lora for c in concepts])


def check_inputs(model: ModelAccess, concepts: list[Concept]) -> dict[str, torch.nn.Module]:
    """Every LoRA must fit this model; returns the targets the merge touches."""
    check_concepts(concepts)
    for concept in concepts:
        if concept.lora.arch and concept.lora.arch != model.arch:
            raise MergeInputError(
                f"{concept.lora.path} is a {concept.lora.arch} LoRA but the base model is {model.arch}"
            )
    model_targets = model.targets()
    used = {}
    for concept in concepts:
        for target, module in concept.lora.modules.items():
            if target not in model_targets:
                raise MergeInputError(f"{concept.lora.path}: layer {target} does not exist in the base model")
            base_shape = tuple(model_targets[target].weight.shape)
            if not shapes_fit(base_shape, tuple(module.weight_shape)):
                raise MergeInputError(
                    f"{concept.lora.path}: layer {target} has shape {tuple(module.weight_shape)}, "
                    f"the base model's is {base_shape} (wrong architecture?)"
                )
            used[target] = model_targets[target]
    return dict(sorted(used.items()))


def only_targets(lora: LoraFile, keep) -> LoraFile:
    modules = {t: m for t, m in lora.modules.items() if keep(t)}
    return LoraFile(lora.path, lora.format, lora.arch, modules, lora.metadata, lora.triggers)


def trigger_rows(model: ModelAccess, prompts: list[str], triggers: list[str]) -> list[list[int]]:
    """Token positions of each prompt's trigger words plus its EOS, found by the tokenizer."""
    token_ids = model.tokenize(prompts)  # (B, 77)
    eos_id = model.tokenizer.eos_token_id
    rows = []
    for prompt, trigger, ids in zip(prompts, triggers, token_ids.tolist()):
        trigger_ids = model.tokenizer(trigger, add_special_tokens=False).input_ids
        start = next(
            (i for i in range(len(ids) - len(trigger_ids) + 1) if ids[i:i + len(trigger_ids)] == trigger_ids),
            None,
        )
        if start is None or not trigger_ids:
            raise MergeInputError(f"trigger {trigger!r} not found in tokenized prompt {prompt!r}")
        eos = ids.index(eos_id, start + len(trigger_ids))
        rows.append(list(range(start, start + len(trigger_ids))) + [eos])
    return rows


class LoraclrMerge:
    """One merge run; ``run()`` returns the merged deltas and the captured statistics."""

    def __init__(self, model: ModelAccess, concepts: list[Concept], settings: MergeSettings, progress: Progress | None = None):
        self.model = model
        self.concepts = concepts
        self.settings = settings
        self.progress = progress or Progress()
        self.targets = check_inputs(model, concepts)
        self.concept_deltas = {
            target: [
                c.lora.modules[target].delta_weight().reshape(module.weight.shape[0], -1).float() * c.weight
                if target in c.lora.modules else None
                for c in concepts
            ]
            for target, module in self.targets.items()
        }
        self.capture_features = settings.method in ("loraclr", "lsq") or settings.report

    def targets_of(self, stage: str) -> dict[str, torch.nn.Module]:
        return {t: m for t, m in self.targets.items() if stage_of_target(t) == stage}

    def run(self) -> MergeResult:
        stage_of = {t: stage_of_target(t) for t in self.targets}
        result = MergeResult({}, self.concept_deltas, {}, stage_of)
        stage_runs = (
            ("text_encoder", self.capture_text_encoder),
            ("cross_kv", self.capture_cross_kv),
            ("unet", self.capture_unet),
        )
        for stage, capture in stage_runs:
            targets = self.targets_of(stage)
            if not targets:
                continue
            started = time.perf_counter()
            if self.capture_features:
                with weights_added(self.targets, result.deltas):
                    collector = capture(targets)
                result.stats.update(collector.stats)
            else:
                collector = None
            self.solve_stage(stage, targets, collector, result)
            result.seconds[stage] = time.perf_counter() - started
        return result

    def solve_stage(self, stage: str, targets, collector: FeatureCollector | None, result: MergeResult):
        for index, (target, module) in enumerate(targets.items()):
            self.progress.update(stage, index, len(targets), target, f"solving {target}")
            deltas = self.concept_deltas[target]
            stats = collector.stats.get(target) if collector else None
            method = self.settings.method
            if method in ("sum", "svd"):
                delta, info = solve_sum(None, deltas)
            elif stats is None:
                raise RuntimeError(f"no features were captured for {target}; the model never ran that layer")
            elif method == "lsq":
                delta, info = solve_lsq(stats, deltas, self.settings)
            elif self.settings.solver == "reference":
                delta, info = solve_reference(layer_matrix(module), collector.raw(target), deltas, self.settings)
            else:
                delta, info = solve_fast(stats, deltas, self.settings)
            result.deltas[target] = delta.reshape(module.weight.shape).cpu()
            result.layer_info[target] = info
        self.progress.update(stage, len(targets), len(targets), "", f"{stage} done")

    # --- capture stages -------------------------------------------------------------------

    def prompts(self) -> list[str]:
        return [PROMPT_TEMPLATE.format(c.trigger.strip()) for c in self.concepts]

    def collector(self, targets) -> FeatureCollector:
        keep_raw = self.settings.method == "loraclr" and self.settings.solver == "reference"
        return FeatureCollector(targets, len(self.concepts), keep_raw=keep_raw)

    def capture_text_encoder(self, targets) -> FeatureCollector:
        """Stage 1: both prompts of every concept, all 77 token rows, each with its own LoRA."""
        loras = [only_targets(c.lora, lambda t: stage_of_target(t) == "text_encoder") for c in self.concepts]
        prompts = []
        for concept in self.concepts:
            prompts += [PROMPT_TEMPLATE.format(concept.trigger.strip()), concept.trigger.strip()]
        collector = self.collector(targets)
        self.progress.update("text_encoder", 0, 1, message="encoding concept prompts")
        with LoraRuntime(self.model.targets(), loras, [c.weight for c in self.concepts]) as runtime, collector.attached():
            runtime.set_rows([frozenset([i]) for i in range(len(self.concepts))])
            with torch.no_grad():
                self.model.encode(prompts)
        return collector

    def capture_cross_kv(self, targets) -> FeatureCollector:
        """Stage 2: merged text encoder states at trigger tokens + EOS, rows cycled to a common count."""
        collector = self.collector(targets)
        prompt_sets = [[PROMPT_TEMPLATE.format(c.trigger.strip()), c.trigger.strip()] for c in self.concepts]
        blocks = []
        with torch.no_grad():
            for concept, prompts in zip(self.concepts, prompt_sets):
                context = self.model.encode(prompts).context.float()  # (2, 77, C)
                positions = trigger_rows(self.model, prompts, [concept.trigger.strip()] * len(prompts))
                blocks.append(torch.cat([context[p, rows] for p, rows in enumerate(positions)]))
        common = max(block.shape[0] for block in blocks)
        aligned = [block[torch.arange(common) % block.shape[0]] for block in blocks]
        for target, module in targets.items():
            base = layer_matrix(module)
            aligned_here = [x.to(base) for x in aligned]
            outputs = [
                x @ (base if delta is None else base + delta.to(base)).T
                for x, delta in zip(aligned_here, self.concept_deltas[target])
            ]
            collector.add(target, module, aligned_here, outputs)
        return collector

    def capture_unet(self, targets) -> FeatureCollector:
        """Stage 3: sample every concept's prompt in one batch, its own UNet LoRA on its rows."""
        loras = [only_targets(c.lora, lambda t: stage_of_target(t) == "unet") for c in self.concepts]
        collector = self.collector(targets)
        cond = self.model.encode(self.prompts())
        steps = self.settings.capture_steps
        size = self.settings.capture_size or (1024 if self.model.arch == "sdxl" else 512)

        def on_step(step, total):
            self.progress.update("sampling", step + 1, total, message=f"sampling step {step + 1}/{total}")

        with LoraRuntime(self.model.targets(), loras, [c.weight for c in self.concepts]) as runtime, collector.attached():
            runtime.set_rows([frozenset([i]) for i in range(len(self.concepts))])
            with torch.no_grad():
                sample(
                    self.model,
                    cond,
                    steps=steps,
                    height=size,
                    width=size,
                    seed=self.settings.seed,
                    callback=on_step,
                )
        return collector
