"""Quality report: per concept, how much of its LoRA survives the merge and what leaks in.

On concept i's own captured features X_i, its LoRA adds E_i = X_i Delta_i^T and the merged
file adds M_i = X_i dW^T. Retention is the share of E_i present in M_i (projection
coefficient, 1 = all of it); crosstalk is the part of M_i orthogonal to E_i relative to
|E_i| (other concepts' effects leaking onto concept i; 0 = none); error is |M_i - E_i| / |E_i|,
the distance the merge objective minimises (0 = behaves exactly like the concept's own LoRA).
They are measured in a second capture pass over the same (seeded) features, on the merged
deltas as written, streaming: nothing per concept is kept but three numbers per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .capture import LayerHooks

GROUPS = ("text_encoder", "cross_kv", "unet")


@dataclass
class Accumulator:
    own: float = 0.0  # sum |E_i|^2
    overlap: float = 0.0  # sum <M_i, E_i>
    orthogonal: float = 0.0  # sum |M_i - proj_E M_i|^2
    merged: float = 0.0  # sum |M_i|^2

    def add(self, own: float, overlap: float, merged: float):
        self.own += own
        self.overlap += overlap
        self.merged += merged
        self.orthogonal += max(merged - (overlap * overlap / own if own > 0 else 0.0), 0.0)

    def figures(self) -> dict:
        if self.own <= 0:
            return {"retention": None, "crosstalk": None, "error": None}
        return {
            "retention": self.overlap / self.own,
            "crosstalk": math.sqrt(self.orthogonal / self.own),
            "error": math.sqrt(max(self.merged - 2 * self.overlap + self.own, 0.0) / self.own),
        }


class ReportCollector(LayerHooks):
    """Streams, per target and concept, |E_i|^2 and each measured merge's <M_i, E_i> and |M_i|^2.

    ``concept_factors(target)`` gives the concepts' Delta_i factors, ``merges`` maps a method
    name to ``(target, concept factors) -> LowRank | None`` (the merged delta as measured).
    Nothing is kept but the scalars, so one capture pass measures every layer of a stage.
    """

    def __init__(self, targets, concept_factors, merges: dict, n_concepts: int):
        super().__init__(targets, n_concepts)
        self.concept_factors = concept_factors
        self.merges = merges
        self.sums: dict[str, dict[str, torch.Tensor]] = {
            method: {} for method in merges
        }  # method -> target -> (N, 3) float64 [own, overlap, merged]

    def observe(self, name, module, x, output, source):
        """One concept at a time, so the pass holds a few (R, D_out) effects, not N of them."""
        factors = self.concept_factors(name)
        merged = {method: merged_of(name, factors) for method, merged_of in self.merges.items()}
        for method in merged:
            self.sums[method].setdefault(name, torch.zeros(self.n_concepts, 3, dtype=torch.float64, device=x.device))
        for offset, i in enumerate(self.concepts):
            factor, rows = factors[i], x[offset]  # rows (R, D_in)
            own = None if factor is None else _effect(rows, factor)  # (R, D_out) E_i
            for method, delta in merged.items():
                sums = self.sums[method][name]
                effect = None if delta is None else _effect(rows, delta)  # (R, D_out) M_i
                if own is not None:
                    sums[i, 0] += _dot(own, own)
                    if effect is not None:
                        sums[i, 1] += _dot(effect, own)
                if effect is not None:
                    sums[i, 2] += _dot(effect, effect)


def _effect(rows: torch.Tensor, delta) -> torch.Tensor:
    delta = delta.to(rows.device, rows.dtype)
    return (rows @ delta.down.T) @ delta.up.T


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> accumulated in fp32 (blocked, ~1e-6 relative: ample for a report) and returned as float64."""
    return a.flatten().dot(b.flatten()).double()


def quality(collected: dict[str, torch.Tensor], stage_of: dict[str, str], concept_names: list[str]) -> dict:
    """{concept: {group or "overall": figures}} from one method's per-target (N, 3) sums."""
    accumulators = {name: {g: Accumulator() for g in (*GROUPS, "overall")} for name in concept_names}
    for target, sums in collected.items():
        for i, name in enumerate(concept_names):
            own_sq, overlap, merged_sq = (float(v) for v in sums[i])
            for group in (stage_of[target], "overall"):
                accumulators[name][group].add(own_sq, overlap, merged_sq)
    return {name: {g: acc.figures() for g, acc in groups.items()} for name, groups in accumulators.items()}


def format_table(reports: dict[str, dict], end_to_end: dict | None = None) -> str:
    """Side-by-side text table: one row per concept and group, one column pair per method; then
    the end-to-end figure (``end_to_end.py``) of the merged file next to stacking."""
    methods = list(reports)
    concepts = list(next(iter(reports.values()))) if reports else []
    figures = ("retention", "crosstalk", "error")
    header = f"{'concept':<20} {'layers':<13}" + "".join(f" {m[:7] + ' ' + f[:5]:>13}" for m in methods for f in figures)
    lines = [header, "-" * len(header)] if reports else []

    def cell(value):
        return f"{'-':>13}" if value is None else f"{value:>13.3f}"

    for concept in concepts:
        for group in (*GROUPS, "overall"):
            row = [reports[m][concept][group] for m in methods]
            if all(r["retention"] is None for r in row):
                continue
            lines.append(
                f"{concept[:20]:<20} {group:<13}"
                + "".join(f" {cell(r[f])}" for r in row for f in figures)
            )
    if end_to_end:
        height, width = end_to_end["size"]
        lines += [""] * bool(lines) + [
            f"end to end: UNet output kept on fresh latents at {width}x{height} px, timesteps "
            f"{end_to_end['timesteps']} (1 = as the concept's own LoRA, 0 = as the base model)",
            f"{'concept':<20} {'merged':>10} {'stacked':>10}",
        ]
        for concept, value in end_to_end["merged"].items():
            lines.append(f"{concept[:20]:<20} {cell(value)[3:]:>10} {cell(end_to_end['stacked'][concept])[3:]:>10}")
    return "\n".join(lines)
