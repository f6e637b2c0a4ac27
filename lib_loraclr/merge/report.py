"""Quality report: per concept, how much of its LoRA survives the merge and what leaks in.

On concept i's own captured features X_i, its LoRA adds E_i = X_i Delta_i^T and the merged
file adds M_i = X_i dW^T. Retention is the share of E_i present in M_i (projection
coefficient, 1 = all of it); crosstalk is the part of M_i orthogonal to E_i relative to
|E_i| (other concepts' effects leaking onto concept i; 0 = none); error is |M_i - E_i| / |E_i|,
the distance the merge objective minimises (0 = behaves exactly like the concept's own LoRA).
All come from the Gram matrices, so they cost nothing extra and cover every captured row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stats import LayerStats

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


def quality(
    stats: dict[str, LayerStats],
    stage_of: dict[str, str],
    concept_deltas: dict[str, list[torch.Tensor | None]],
    merged: dict[str, torch.Tensor],
    concept_names: list[str],
) -> dict:
    """{concept: {group or "overall": {"retention", "crosstalk"}}} for one merged delta set."""
    accumulators = {name: {g: Accumulator() for g in (*GROUPS, "overall")} for name in concept_names}
    for target, layer_stats in stats.items():
        if target not in merged:
            continue
        for i, name in enumerate(concept_names):
            gram = layer_stats.gram(i)  # (D_in, D_in) float64
            merged_delta = merged[target].reshape(merged[target].shape[0], -1).to(gram)
            own_delta = concept_deltas[target][i]
            merged_gram = merged_delta @ gram  # (D_out, D_in)
            merged_sq = float((merged_gram * merged_delta).sum())
            if own_delta is None:
                own_sq, overlap = 0.0, 0.0
            else:
                own_delta = own_delta.to(gram)
                own_sq = float(((own_delta @ gram) * own_delta).sum())
                overlap = float((merged_gram * own_delta).sum())
            for group in (stage_of[target], "overall"):
                accumulators[name][group].add(own_sq, overlap, merged_sq)
    return {name: {g: acc.figures() for g, acc in groups.items()} for name, groups in accumulators.items()}


def format_table(reports: dict[str, dict]) -> str:
    """Side-by-side text table: one row per concept and group, one column pair per method."""
    methods = list(reports)
    concepts = list(next(iter(reports.values())))
    figures = ("retention", "crosstalk", "error")
    header = f"{'concept':<20} {'layers':<13}" + "".join(f" {m[:7] + ' ' + f[:5]:>13}" for m in methods for f in figures)
    lines = [header, "-" * len(header)]

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
    return "\n".join(lines)
