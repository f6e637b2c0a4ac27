"""LoRACLR merge of several concept LoRAs into one delta per layer, in the reference's three stages.

1. text-encoder layers, from inputs captured while encoding each concept's prompts with
   its LoRA applied;
2. UNet cross-attention to_k / to_v, from the merged text encoder's states at the trigger
   tokens and EOS;
3. every other UNet layer, from inputs captured while sampling each concept's prompt with
   its UNet LoRA applied (merged text encoder and merged k/v in place).
Each stage sees the previous stages' merged weights (applied as hooks, never written into
the model). The per-layer problem is solved by ``solvers``; ``sum`` and ``svd`` capture
nothing.

Memory: the LoRAs stay factors; statistics are streamed per distinct layer input, each
layer is solved, handed to the writer and freed; a stage whose statistics exceed the budget
is captured in several seeded passes, one per group of layers, and a UNet batch of every
concept too large for the budget is sampled in micro-batches of concepts (``memory``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..lora.base import LoraFile
from ..lora.lowrank import LowRank, module_factors
from ..lora.modules import LoraUpDown
from ..lora.reader import check_same_arch
from ..lora.writer import KohyaWriter
from ..model import ModelAccess
from ..progress import Progress
from ..prompt import MAX_PROMPT_TOKENS, parse_attention, parse_prompt
from ..runtime import LoraMismatchError, LoraRuntime, check_fits
from ..sampling import initial_noise, sample
from .capture import LayerHooks, StatsCollector, layer_matrix
from .memory import (
    DISTILL_MARGIN,
    GIB,
    InputCost,
    activation_bytes,
    backward_bytes,
    budget_bytes,
    concept_batches,
    distill_size,
    exact_bytes,
    plan_passes,
    stream_costs,
)
from .distill import MixedDeltas, TeacherPool, distill, pair_indices, pair_teacher_pool, teacher_pool
from .end_to_end import end_to_end
from .objective import MergeSettings
from .report import ReportCollector, quality
from .solvers import solve_fast, solve_lsq, solve_reference, solve_sum

WORKING_MARGIN = 3 * GIB // 4  # measured: a 12-LoRA SD1.5 merge holds ~0.9 GiB beyond its statistics and files
STAGES = ("text_encoder", "cross_kv", "unet")


class MergeInputError(ValueError):
    """Inputs that cannot be merged: the message says which file or trigger and why."""


@dataclass
class Concept:
    lora: LoraFile
    trigger: str
    weight: float = 1.0


@dataclass
class MergeResult:
    stage_of: dict[str, str]
    layer_info: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)  # capture passes per stage
    batches: dict[str, int] = field(default_factory=dict)  # concept batches per capture pass
    budget_bytes: int = 0
    peak_stats_bytes: int = 0  # the most the statistics held at once
    distill: dict | None = None  # --method distill: the pool's size and the training loss


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
        try:
            words = plain_trigger(concept)
        except ValueError as error:
            raise MergeInputError(f"{concept.lora.path}: trigger {concept.trigger!r}: {error}") from None
        if not words:
            raise MergeInputError(f"{concept.lora.path}: no trigger words given")
    if len(set(plain_trigger(c).lower() for c in concepts)) < len(concepts):
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
        try:
            check_fits(concept.lora, model_targets)
        except LoraMismatchError as error:
            raise MergeInputError(str(error)) from None
        used.update({target: model_targets[target] for target in concept.lora.modules})
    return dict(sorted(used.items()))


def only_targets(lora: LoraFile, keep) -> LoraFile:
    modules = {t: m for t, m in lora.modules.items() if keep(t)}
    return LoraFile(lora.path, lora.format, lora.arch, modules, lora.metadata, lora.triggers)


def as_lora(name: str, deltas: dict[str, LowRank]) -> LoraFile:
    """Merged factors as an in-memory LoRA (scale 1), so the runtime can apply them as hooks."""
    modules = {
        target: LoraUpDown(target, tensors={
            "lora_up.weight": delta.up, "lora_down.weight": delta.down,
            "alpha": torch.tensor(float(delta.rank)),
        })
        for target, delta in deltas.items()
    }
    return LoraFile(name, "merged", None, modules)


def plain_trigger(concept: Concept) -> str:
    """The trigger as the text encoder reads it: A1111 syntax in it (``miku (vocaloid)``) is
    read as the WebUIs read it, so the capture prompts are plain text on every host."""
    return "".join(fragment.text for fragment in parse_attention(concept.trigger)).strip()


def trigger_rows(model: ModelAccess, prompts: list[str], triggers: list[str]) -> list[list[int]]:
    """Token positions of each prompt's trigger words plus its EOS, by the composition's token
    finder (``prompt.parse_prompt``: A1111 syntax read as the WebUIs read it; BOS at 0)."""
    rows = []
    for prompt, trigger in zip(prompts, triggers):
        try:
            parsed = parse_prompt(prompt, model.tokenizer)
            found = parsed.positions_of(trigger) if trigger.strip() else []
        except ValueError as error:
            raise MergeInputError(f"trigger {trigger!r}: {error}") from None
        if not found or len(parsed.token_ids) > MAX_PROMPT_TOKENS:
            raise MergeInputError(f"trigger {trigger!r} not found in the first 75 tokens of prompt {prompt!r}")
        rows.append(list(found[0]) + [len(parsed.token_ids) + 1])  # ..., EOS right after the last token
    return rows


class RowCounter(LayerHooks):
    """Rows per concept each target sees in one forward (batch of one)."""

    def __init__(self, targets):
        super().__init__(targets, 1)
        self.rows: dict[str, int] = {}

    def observe(self, name, module, x, output, source):
        self.rows[name] = self.rows.get(name, 0) + x.shape[1]


class LoraclrMerge:
    """One merge run: ``run(writer)`` solves every layer into the writer; ``measure(writer)`` reports."""

    def __init__(self, model: ModelAccess, concepts: list[Concept], settings: MergeSettings, progress: Progress | None = None):
        self.model = model
        self.concepts = concepts
        self.settings = settings
        self.progress = progress or Progress()
        self.targets = check_inputs(model, concepts)
        self.n = len(concepts)
        self.device = model.device  # read once: some hosts walk every parameter to answer
        self.merged: dict[str, LowRank] = {}  # solved text-encoder and cross-kv deltas, for later stages
        self.budget = budget_bytes(settings.max_memory_gb, self.device)
        self.result = MergeResult({t: stage_of_target(t) for t in self.targets}, budget_bytes=self.budget)
        self._stats_bytes = 0
        self._probes: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def targets_of(self, stage: str) -> dict[str, torch.nn.Module]:
        return {t: m for t, m in self.targets.items() if stage_of_target(t) == stage}

    def factors(self, target: str) -> list[LowRank | None]:
        """Concept i's Delta_i at ``target`` (weight folded in) as fp32 factors, on the model's device."""
        return [
            module_factors(c.lora.modules[target], c.weight).to(self.device) if target in c.lora.modules else None
            for c in self.concepts
        ]

    # --- solving ----------------------------------------------------------------------------

    def run(self, writer: KohyaWriter) -> MergeResult:
        for stage in STAGES:
            targets = self.targets_of(stage)
            if not targets:
                continue
            started = time.perf_counter()
            if self.settings.method == "distill":
                break
            if self.settings.method in ("sum", "svd"):
                for index, (target, module) in enumerate(targets.items()):
                    self.progress.update(stage, index, len(targets), target, f"stacking {target}")
                    self._hand_over(target, module, *solve_sum(self.factors(target)), writer)
            else:
                self._solve_stage(stage, targets, writer)
            self.result.seconds[stage] = time.perf_counter() - started
        if self.settings.method == "distill":
            self._distill(writer)
        self.result.peak_stats_bytes = self._stats_bytes
        return self.result

    def _distill(self, writer: KohyaWriter):
        """Every layer at once, end to end (``distill.py``): the teacher pool, the training, the layers written.

        Autograd keeps every layer's activations, so the pool and the training run at the
        capture size only if one draw's backward (a cond and an uncond row) fits the budget;
        otherwise at the largest smaller size that does, and the progress says so.
        """
        settings = self.settings
        capture = self.capture_size()
        room = self.budget - DISTILL_MARGIN
        unet_targets, unet_rows = self.targets_of("unet"), self._row_counts("unet")[0]  # per row, at the capture size
        per_draw_at_capture = 2 * backward_bytes(unet_targets, unet_rows)
        size = distill_size(per_draw_at_capture, capture, room)
        per_draw = per_draw_at_capture * (size / capture) ** 2
        if size < capture:
            self.progress.update("teacher", 0, 1, message=(
                f"distill: one training draw at {capture} px needs about {per_draw_at_capture / GIB:.1f} GiB, more than "
                f"the {self.budget / GIB:.1f} GiB budget allows: teacher and training run at {size} px "
                f"(raise --max-memory to train at {capture} px)"))
        # the teacher's forwards (no grad): a cond and an uncond row per trajectory, as the capture's estimate
        per_trajectory = 2 * activation_bytes(unet_targets, unet_rows) * (size / capture) ** 2
        per_forward = max(1, min(settings.distill_trajectories, int(room // max(per_trajectory, 1))))
        started = time.perf_counter()
        loras, weights, prompts = [c.lora for c in self.concepts], [c.weight for c in self.concepts], self.prompts()
        sampling = dict(size=size, steps=settings.capture_steps, per_forward=per_forward,
                        guidance_scale=settings.guidance_scale, seed=settings.seed, progress=self.progress)
        pool = teacher_pool(self.model, loras, weights, prompts, trajectories=settings.distill_trajectories, **sampling)
        pairs = pair_indices(len(self.concepts)) if settings.distill_pair_trajectories else []
        if pairs:
            pair_prompts = [f"{prompts[i]} and {prompts[j]}" for i, j in pairs]
            pool = TeacherPool.cat([pool, pair_teacher_pool(
                self.model, loras, weights, [plain_trigger(c) for c in self.concepts], pair_prompts, pairs,
                first_prompt=len(prompts), trajectories=settings.distill_pair_trajectories, **sampling)])
            prompts = prompts + pair_prompts
        self.result.seconds["teacher"] = time.perf_counter() - started
        started = time.perf_counter()
        student = MixedDeltas(self.targets, {t: self.factors(t) for t in self.targets})
        self._stats_bytes = pool.nbytes() + 3 * student.nbytes()  # the pool, the mixes and Adam's two moments
        # as many draws per forward as their backward fits in what the budget leaves
        draws = max(1, min(settings.distill_batch, int((room - self._stats_bytes) // max(per_draw, 1))))
        run = distill(self.model, student, pool, prompts, iterations=settings.distill_iters,
                      lr=settings.distill_lr, batch=settings.distill_batch, draws_per_forward=draws,
                      guidance_scale=settings.guidance_scale, seed=settings.seed, progress=self.progress,
                      pair_weight=settings.distill_pair_weight)
        history = run.history
        if run.untrained:
            self.progress.update("distill", len(history), len(history), message=(
                f"distill: no gradient reached {len(run.untrained)} of {len(self.targets)} layers (e.g. "
                f"{run.untrained[0]}; a host that encodes prompts without gradients reaches no text-encoder "
                f"layer): they keep the concepts' deltas stacked"))
        self.result.seconds["distill"] = time.perf_counter() - started
        self.result.distill = {"size": size, "capture_size": capture, "pool_samples": len(pool),
                               "pair_samples": int(pool.guided.sum()), "steps": len(history),
                               "draws_per_forward": draws, "backward_bytes_per_draw": int(per_draw), "loss_first": history[0],
                               "loss_last": history[-1], "loss_min": min(history), "untrained_layers": len(run.untrained)}
        for index, (target, module) in enumerate(self.targets.items()):
            self.progress.update("write", index, len(self.targets), target, f"factoring {target}")
            self._hand_over(target, module, student.delta(target), {"solver": "distill"}, writer)

    def _hand_over(self, target, module, delta: LowRank, info: dict, writer: KohyaWriter):
        if stage_of_target(target) != "unet":
            self.merged[target] = delta
        started = time.perf_counter()
        writer.add(target, delta, tuple(module.weight.shape))
        seconds = self.result.seconds
        seconds["solve"] = seconds.get("solve", 0.0) + info.get("seconds", 0.0) + time.perf_counter() - started
        self.result.layer_info[target] = info

    def _row_counts(self, stage: str) -> tuple[dict[str, int], dict[str, int]]:
        """Rows per concept each target sees in one forward, and over the whole capture (one cheap probe)."""
        if stage not in self._probes:
            self._probes[stage] = self._probe(stage, self.targets_of(stage))
        return self._probes[stage]

    def _probe(self, stage: str, targets) -> tuple[dict[str, int], dict[str, int]]:
        if stage == "cross_kv":
            rows = self._cross_kv_rows().shape[1]
            return dict.fromkeys(targets, rows), dict.fromkeys(targets, rows)
        counter = RowCounter(targets)
        prompt = self.prompts()[:1]
        with torch.no_grad(), counter.attached():
            if stage == "text_encoder":
                self.model.encode(prompt)
                return counter.rows, {t: 2 * r for t, r in counter.rows.items()}  # two prompts per concept
            size = self.capture_size() // self.model.vae_scale_factor
            latent = torch.zeros(1, self.model.latent_channels, size, size, device=self.device, dtype=self.model.dtype)
            self.model.unet_eps(latent, torch.tensor([999], device=self.device), self.model.encode(prompt))
        return counter.rows, {t: r * self.settings.capture_steps for t, r in counter.rows.items()}

    def concept_batches(self, stage: str) -> list[range]:
        """The concepts of each forward of a capture: all at once, or UNet micro-batches the budget allows."""
        if stage != "unet":
            return [range(self.n)]
        rows_per_forward, _ = self._row_counts(stage)
        return concept_batches(self.n, activation_bytes(self.targets_of(stage), rows_per_forward), self.budget)

    def _statistics_budget(self, stage: str, targets: dict) -> int:
        """The budget less what a capture pass holds besides statistics (at least 1/4 of it for them).

        Reserved: one batch's activations (``memory.activation_bytes``), the LoRA files as read,
        and a fixed working margin.
        """
        rows_per_forward, _ = self._row_counts(stage)
        batch = max(len(concepts) for concepts in self.concept_batches(stage))
        activations = batch * activation_bytes(targets, rows_per_forward)
        files = sum(t.numel() * t.element_size() for c in self.concepts for m in c.lora.modules.values()
                    for t in getattr(m, "tensors", {}).values())
        return max(self.budget - activations - files - WORKING_MARGIN, self.budget // 4)

    def _solve_stage(self, stage: str, targets: dict, writer: KohyaWriter):
        reference = self.settings.method == "loraclr" and self.settings.solver == "reference"
        self.progress.update(stage, 0, len(targets), message=f"planning the {stage} capture")
        _, rows = self._row_counts(stage)
        ranks = {t: self.rank_bound(t) for t in targets}
        batches = self.concept_batches(stage)
        if reference and len(batches) > 1:
            raise MergeInputError(
                f"the reference solver needs all {self.n} concepts in one batch, which exceeds the "
                f"{budget_text(self.budget)} memory budget: raise --max-memory, lower --capture-size, or use --solver fast")
        budget = self._statistics_budget(stage, targets)
        if reference:  # raw rows per target, kept on the CPU
            costs = [InputCost(t, [t], 4 * self.n * rows.get(t, 0) * m.weight[0].numel(), 0) for t, m in targets.items()]
            passes = plan_passes(costs, budget)
        else:
            passes = plan_passes(stream_costs(targets, ranks, self.n, rows, micro_batched=len(batches) > 1), budget)
        self.result.passes[stage] = len(passes)
        self.result.batches[stage] = len(batches)
        if len(batches) > 1:
            self.progress.update(stage, 0, len(targets), message=(
                f"one batch of {self.n} concepts exceeds the {budget_text(self.budget)} memory budget: "
                f"sampling them in {len(batches)} batches of up to {max(len(b) for b in batches)}"))
        if len(passes) > 1:
            self.progress.update(stage, 0, len(targets), message=(
                f"statistics exceed the {budget_text(self.budget)} memory budget: capturing in {len(passes)} passes"))
        needs_exact: list[str] = []
        done = 0
        for number, names in enumerate(passes, start=1):
            group = {t: targets[t] for t in names}
            factors = {t: self.factors(t) for t in group}
            label = f"pass {number}/{len(passes)}, {len(group)} layers" if len(passes) > 1 else f"{len(group)} layers"
            collector = StatsCollector(group, factors, self.n, mode="raw" if reference else "stream",
                                       device=self.device)
            self.capture(stage, collector, label)
            self._stats_bytes = max(self._stats_bytes, collector.nbytes())
            for target, module in group.items():
                done += 1
                self.progress.update(stage, done, len(targets), target, f"solving {target} ({label})")
                delta, info = self._solve(target, module, collector, factors[target])
                if info.get("needs_exact"):
                    exact = collector.stats[target].exact(factors[target])
                    if exact is None:
                        needs_exact.append(target)
                        collector.close_target(target)
                        continue
                    delta, info = solve_fast(exact, factors[target], self.settings)
                self._hand_over(target, module, delta, info, writer)
                collector.close_target(target)
            del collector, factors
        if needs_exact:
            self._solve_exact(stage, {t: targets[t] for t in needs_exact}, writer)

    def rank_bound(self, target: str) -> int:
        """Sum over concepts of their factors' rank at ``target``, from the files alone (plans the memory)."""
        d_out, d_in = self.targets[target].weight.shape[0], self.targets[target].weight[0].numel()
        total = 0
        for concept in self.concepts:
            module = concept.lora.modules.get(target)
            if module is not None:  # a Hadamard product of two rank-r factors has rank up to r^2
                total += min(module.rank ** 2 if module.kind == "loha" else module.rank, d_out, d_in)
        return total

    def _solve(self, target, module, collector: StatsCollector, factors):
        if self.settings.method == "loraclr" and self.settings.solver == "reference":
            rows = collector.raw(target)  # one concatenated copy of the raw rows, checked and solved
            check_finite(target, rows)
            return solve_reference(layer_matrix(module), rows, factors, self.settings)
        stats = collector.stats[target]
        check_finite(target, [stats.target_inner])
        if self.settings.method == "lsq":
            return solve_lsq(stats, factors, self.settings)
        return solve_fast(stats, factors, self.settings)

    def _solve_exact(self, stage: str, targets: dict, writer: KohyaWriter):
        """Layers whose hinge the streamed statistics could not certify: exact per-concept statistics, refined."""
        passes = plan_passes([InputCost(t, [t], exact_bytes(m, self.n), 0) for t, m in targets.items()], self.budget)
        self.result.passes[stage] += len(passes)
        for number, names in enumerate(passes, start=1):
            group = {t: targets[t] for t in names}
            factors = {t: self.factors(t) for t in group}
            collector = StatsCollector(group, factors, self.n, mode="exact", device=self.device)
            self.capture(stage, collector, f"exact pass {number}/{len(passes)} for {len(group)} layers near the margin")
            for target, module in group.items():
                self.progress.update(stage, 1, 1, target, f"refining {target}")
                check_finite(target, [collector.stats[target].target_inner])
                self._hand_over(target, module, *solve_fast(collector.stats[target], factors[target], self.settings), writer)
                collector.close_target(target)

    # --- the quality report -----------------------------------------------------------------

    def measure(self, writer: KohyaWriter) -> dict:
        """Retention / crosstalk / error of the written file (and of plain stacking), one capture pass per stage."""
        names = [c.lora.name for c in self.concepts]
        merges = {self.settings.method: lambda target, factors: writer.stored(target)}
        if self.settings.method != "sum":
            merges["sum"] = lambda target, factors: solve_sum(factors)[0]
        collected = {method: {} for method in merges}
        started = time.perf_counter()
        for stage in STAGES:
            targets = self.targets_of(stage)
            if not targets:
                continue
            collector = ReportCollector(targets, self.factors, merges, self.n)
            self.capture(stage, collector, f"measuring {len(targets)} layers", progress_stage="report")
            for method in merges:
                collected[method].update(collector.sums[method])
        self.result.seconds["report"] = time.perf_counter() - started
        return {method: quality(sums, self.result.stage_of, names) for method, sums in collected.items()}

    def end_to_end(self, writer: KohyaWriter) -> dict:
        """The written file against each concept's own LoRA through the whole model (``end_to_end.py``)."""
        merged = writer.sealed_lora("merged")
        figures = end_to_end(
            self.model, [c.lora for c in self.concepts], [c.weight for c in self.concepts], self.prompts(), merged,
            [c.lora.name for c in self.concepts], capture_size=self.capture_size(),
            capture_steps=self.settings.capture_steps, seed=self.settings.seed, progress=self.progress,
        )
        self.result.seconds["end_to_end"] = figures.pop("seconds")
        return figures

    # --- capture stages -------------------------------------------------------------------

    def prompts(self) -> list[str]:
        return [self.settings.prompt_template.format(plain_trigger(c)) for c in self.concepts]

    def capture_size(self) -> int:
        if self.settings.capture_size is not None:
            return self.settings.capture_size
        return 1024 if self.model.arch == "sdxl" else 512

    def capture(self, stage: str, hooks: LayerHooks, label: str, progress_stage: str | None = None):
        {"text_encoder": self.capture_text_encoder, "cross_kv": self.capture_cross_kv, "unet": self.capture_unet}[
            stage
        ](hooks, label, progress_stage or stage)

    def _merged_applied(self):
        """Hooks applying the merged text-encoder / cross-kv deltas solved so far (to every batch row)."""
        return LoraRuntime(self.model.targets(), [as_lora("merged", self.merged)] if self.merged else [])

    def capture_text_encoder(self, hooks: LayerHooks, label: str, stage: str):
        """Stage 1: both prompts of every concept, all 77 token rows, each with its own LoRA."""
        loras = [only_targets(c.lora, lambda t: stage_of_target(t) == "text_encoder") for c in self.concepts]
        prompts = []
        for concept in self.concepts:
            prompts += [self.settings.prompt_template.format(plain_trigger(concept)), plain_trigger(concept)]
        self.progress.update(stage, 0, 1, message=f"encoding concept prompts ({label})")
        with LoraRuntime(self.model.targets(), loras, [c.weight for c in self.concepts]) as runtime, hooks.attached():
            runtime.set_rows([frozenset([i]) for i in range(self.n)])
            with torch.no_grad():
                self.model.encode(prompts)

    def _cross_kv_rows(self) -> torch.Tensor:
        """(N, R, C) merged text-encoder states at each concept's trigger tokens + EOS, cycled to one R."""
        prompt_sets = [[prompt, plain_trigger(c)] for prompt, c in zip(self.prompts(), self.concepts)]
        blocks = []
        with torch.no_grad(), self._merged_applied():
            for concept, prompts in zip(self.concepts, prompt_sets):
                context = self.model.encode(prompts).context.float()  # (2, 77, C)
                positions = trigger_rows(self.model, prompts, [plain_trigger(concept)] * len(prompts))
                blocks.append(torch.cat([context[p, rows] for p, rows in enumerate(positions)]))
        common = max(block.shape[0] for block in blocks)
        return torch.stack([block[torch.arange(common) % block.shape[0]] for block in blocks])

    def capture_cross_kv(self, hooks: LayerHooks, label: str, stage: str):
        """Stage 2: the layers' inputs are the text states themselves; outputs computed from the factors."""
        self.progress.update(stage, 0, 1, message=f"encoding trigger tokens ({label})")
        states = self._cross_kv_rows()
        for target, module in hooks.targets.items():
            base = layer_matrix(module)
            x = states.to(base)  # (N, R, C)
            outputs = x @ base.T
            for i, factor in enumerate(self.factors(target)):
                if factor is not None:
                    outputs[i] += (x[i] @ factor.down.T.to(base)) @ factor.up.T.to(base)
            if module.bias is not None:  # as the layer itself would give it
                outputs += module.bias.detach().float()
            hooks.observe(target, module, x, outputs, states)

    def capture_unet(self, hooks: LayerHooks, label: str, stage: str):
        """Stage 3: sample every concept's prompt, its own UNet LoRA on its rows, batch by batch.

        Concept i's noise is row i of one seeded batch of noise, so its features do not depend
        on the batching.
        """
        loras = [only_targets(c.lora, lambda t: stage_of_target(t) == "unet") for c in self.concepts]
        merged = [as_lora("merged", self.merged)] if self.merged else []
        with torch.no_grad(), self._merged_applied():
            cond = self.model.encode(self.prompts())
        size, steps = self.capture_size(), self.settings.capture_steps
        latent = size // self.model.vae_scale_factor
        noise = initial_noise((self.n, self.model.latent_channels, latent, latent), self.settings.seed)
        batches = self.concept_batches("unet")
        try:
            for number, concepts in enumerate(batches):
                where = label if len(batches) == 1 else (
                    f"{label}, concepts {concepts.start + 1}-{concepts.stop} of {self.n}")

                def on_step(step, total, done=number * steps, where=where):
                    self.progress.update(stage if stage == "report" else "sampling", done + step + 1,
                                         steps * len(batches), message=f"sampling step {step + 1}/{total} ({where})")

                members = [loras[i] for i in concepts]
                weights = [self.concepts[i].weight for i in concepts] + [1.0] * len(merged)
                shared = range(len(members), len(members) + len(merged))
                hooks.start_batch(concepts)
                with LoraRuntime(self.model.targets(), members + merged, weights) as runtime, hooks.attached():
                    runtime.set_rows([frozenset([k, *shared]) for k in range(len(members))])
                    with torch.no_grad():
                        sample(
                            self.model,
                            cond.select(slice(concepts.start, concepts.stop)),
                            steps=steps,
                            height=size,
                            width=size,
                            noise=noise[concepts.start:concepts.stop],
                            callback=on_step,
                        )
        finally:
            hooks.start_batch(range(self.n))


def check_finite(target: str, features: list[torch.Tensor]) -> None:
    """Non-finite features (a broken base model or LoRA) would end in a linear-algebra traceback: refuse by name."""
    if not all(bool(torch.isfinite(t).all()) for t in features):
        raise MergeInputError(f"{target}: the captured layer features are not finite (NaN or Inf): "
                              "the base model or a LoRA gives non-finite activations there")


def budget_text(nbytes: int) -> str:
    """Bytes as GiB for messages."""
    return f"{nbytes / GIB:.2f} GiB"
