"""The LoRACLR per-layer objective, exactly as the authors' ``update_contrastive`` computes it.

Per layer: concept i has input rows X_i (R, D_in) and target W_i = W0 + Delta_i, so its target
block is Y_i = X_i W_i^T and the prediction is Yhat_i = X_i (W0 + dW)^T. Each concept's whole
block is one sample: d_p,i = ||Yhat_i - Y_i||, d_n,i = min_{j!=i} ||Yhat_i - Y_j|| (Frobenius,
sqrt of clamp(., 1e-12) as the reference), and

    total = lambda_con * mean_i(d_p,i^2 + relu(margin - d_n,i)^2)
          + lambda_mse * mean over all elements of (Yhat - Y)^2 + lambda_reg * ||dW||_F

(the regulariser is not squared). Layer biases cancel in every difference, so blocks are bias-free.

``exact_loss*`` evaluate this on raw features (differentiable; the reference solver trains on it).
``Surrogate`` / ``surrogate_terms`` evaluate it from ``LayerStats`` only: every term is exact except the hinge,
whose d_n,i is replaced by a certified lower bound, so the surrogate is an upper bound of the
loss that equals it wherever the bound proves the hinge inactive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch

from ..lora.lowrank import LowRank
from ..validation import Seed, StrictBool, checked, integer, real, text
from .stats import LayerStats

DISTANCE_SQ_FLOOR = 1e-12  # the reference's clamp before sqrt
METHODS = ("loraclr", "lsq", "sum", "svd", "distill")
SOLVERS = ("fast", "reference")


# Types and ranges of the merge settings; the upper bounds keep a typo from running for days.
Weight = real(ge=0, le=1e3)
Iterations = integer(ge=1, le=10_000)
Rank = integer(ge=1, le=1024)


class PromptTemplate(text(min_length=2, max_length=200)):
    """Each concept's prompt, ``{}`` where its trigger goes: exactly one slot, since ``str.format`` fills it."""

    @classmethod
    def __get_validators__(cls):
        yield from super().__get_validators__()
        yield cls._one_slot

    @classmethod
    def _one_slot(cls, value: str):
        if value.count("{}") != 1 or any(brace in value.replace("{}", "") for brace in "{}"):
            raise ValueError("must hold {} exactly once (where the trigger goes) and no other braces")
        return value


@checked(what="merge settings", unknown="merge setting")
class MergeSettings:
    """Every knob of a merge, with the LoRACLR paper/code defaults; CLI, tab and API share these names.

    The annotations are the one check of each value (``validation.checked``).
    """

    method: Literal[METHODS] = "loraclr"  # loraclr | lsq (Mix-of-Show) | sum | svd | distill (end to end, ours)
    solver: Literal[SOLVERS] = "fast"  # fast (closed form on statistics) | reference (authors' AdamW loop)
    margin: real(ge=0, le=100) = 0.5
    lambda_con: Weight = 1.0
    lambda_mse: Weight = 0.1
    lambda_reg: Weight = 0.001
    lr: real(ge=0, le=10) = 1e-4  # reference solver only
    weight_decay: real(ge=0, le=10) = 1e-4  # reference solver only (AdamW)
    iters: Iterations = 50  # reference solver only
    refine_iters: integer(ge=0, le=10_000) = 20  # fast solver: L-BFGS iterations when the hinge is not certified inactive
    rank: Optional[Rank] = None  # written LoRA rank; None = smallest rank keeping `energy`
    energy: real(gt=0, le=1) = 0.99
    max_rank: Rank = 128
    clamp_quantile: Optional[real(gt=0, le=1)] = 0.99  # kohya svd_merge_lora's outlier clamp of the written factors
    capture_steps: integer(ge=1, le=200) = 20
    capture_size: Optional[integer(ge=8, le=2048, multiple_of=8)] = None  # None = the model family's native size
    seed: Seed = 0
    report: StrictBool = True  # measure the quality report (a second, streaming capture pass)
    end_to_end: StrictBool = True  # measure the end-to-end figure (3 UNet passes of a batch of 4 per concept)
    max_memory_gb: Optional[real(gt=0, le=1e4)] = None  # budget of the merge's statistics; None = from the machine or GPU
    prompt_template: PromptTemplate = "photo of a {}"  # each concept's prompt; {} = its trigger
    # --method distill only: Adam steps, learning rate of the mixes, draws per step, trajectories per concept,
    # trajectories per concept pair (composed teacher; 0 = none), a pair point's loss weight, and the guidance
    # of the teachers' sampling; the defaults are the toy world's best measured (README, "Merge quality")
    distill_iters: integer(ge=1, le=100_000) = 1800
    distill_lr: real(gt=0, le=1) = 1e-2
    distill_batch: integer(ge=1, le=64) = 4
    distill_trajectories: integer(ge=1, le=64) = 8
    distill_pair_trajectories: integer(ge=0, le=64) = 1
    distill_pair_weight: real(ge=0, le=10) = 0.5
    guidance_scale: real(ge=1, le=30) = 5.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossTerms:
    """The loss and its parts; ``d_neg`` is the true d_n (exact) or its lower bound (surrogate)."""

    total: torch.Tensor
    contrastive: torch.Tensor
    mse: torch.Tensor
    reg: torch.Tensor
    pos_sq: torch.Tensor  # (N,) ||Yhat_i - Y_i||^2, unclamped
    d_neg: torch.Tensor  # (N,)
    hinge: torch.Tensor  # (N,) relu(margin - d_neg)^2
    hinge_certified: bool  # True when every d_neg >= margin, i.e. the hinge is exactly zero

    def smooth_part(self, settings: MergeSettings) -> torch.Tensor:
        """The loss without the hinge: a lower bound of the true loss at any dW."""
        return (
            settings.lambda_con * self.pos_sq.mean()
            + settings.lambda_mse * self.mse
            + settings.lambda_reg * self.reg
        )

    def as_floats(self) -> dict:
        return {
            "total": float(self.total),
            "contrastive": float(self.contrastive),
            "mse": float(self.mse),
            "reg": float(self.reg),
            "hinge_certified": self.hinge_certified,
        }


def check_deltas(deltas: list[torch.Tensor | None], n_concepts: int, weight_shape: tuple[int, int]) -> None:
    if len(deltas) != n_concepts:
        raise ValueError(f"got {len(deltas)} concept deltas for {n_concepts} concepts")
    for i, delta in enumerate(deltas):
        if delta is not None and tuple(delta.shape) != tuple(weight_shape):
            raise ValueError(f"delta of concept {i} has shape {tuple(delta.shape)}, the layer weight is {tuple(weight_shape)}")


def check_factors(factors: list[LowRank | None], n_concepts: int, weight_shape: tuple[int, int]) -> None:
    if len(factors) != n_concepts:
        raise ValueError(f"got {len(factors)} concept factors for {n_concepts} concepts")
    for i, factor in enumerate(factors):
        if factor is not None and factor.shape != tuple(weight_shape):
            raise ValueError(f"delta of concept {i} has shape {factor.shape}, the layer weight is {tuple(weight_shape)}")


def feature_blocks(
    base_weight: torch.Tensor, inputs: list[torch.Tensor], deltas: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack aligned concept inputs (N, R, D_in) and compute their targets Y_i = X_i (W0 + Delta_i)^T (N, R, D_out)."""
    if len(inputs) < 2:
        raise ValueError(f"the LoRACLR loss needs at least two concepts, got {len(inputs)}")
    check_deltas(deltas, len(inputs), tuple(base_weight.shape))
    rows = {tuple(x.shape) for x in inputs}
    if len(rows) != 1 or len(next(iter(rows))) != 2 or next(iter(rows))[1] != base_weight.shape[1]:
        raise ValueError(
            f"concept inputs must all be (R, {base_weight.shape[1]}) with the same R, got {[tuple(x.shape) for x in inputs]}"
        )
    stacked = torch.stack(inputs).to(base_weight)
    targets = torch.stack([
        x @ (base_weight if delta is None else base_weight + delta.to(base_weight)).T for x, delta in zip(stacked, deltas)
    ])
    return stacked, targets


def loss_terms(predictions: torch.Tensor, targets: torch.Tensor, dW: torch.Tensor, settings: MergeSettings) -> LossTerms:
    """The loss on feature blocks, predictions/targets (N, R, D_out); differentiable in predictions and dW.

    Distances are taken from the differences directly (the reference expands
    |a|^2 + |b|^2 - 2ab, which cancels catastrophically for near blocks); the nearest negative
    is picked without grad and re-evaluated with grad, which is the gradient of the min.
    """
    n_concepts = predictions.shape[0]
    pos_sq = (predictions - targets).pow(2).sum((1, 2))  # (N,)
    with torch.no_grad():
        all_sq = torch.stack([(predictions - targets[j]).pow(2).sum((1, 2)) for j in range(n_concepts)], dim=1)
        all_sq.fill_diagonal_(float("inf"))
        nearest = all_sq.argmin(dim=1)  # (N,)
    neg_sq = (predictions - targets[nearest]).pow(2).sum((1, 2))
    d_pos = pos_sq.clamp_min(DISTANCE_SQ_FLOOR).sqrt()
    d_neg = neg_sq.clamp_min(DISTANCE_SQ_FLOOR).sqrt()
    hinge = torch.relu(settings.margin - d_neg).pow(2)
    contrastive = (d_pos.pow(2) + hinge).mean()
    mse = pos_sq.sum() / predictions.numel()
    reg = torch.linalg.vector_norm(dW)
    total = settings.lambda_con * contrastive + settings.lambda_mse * mse + settings.lambda_reg * reg
    return LossTerms(total, contrastive, mse, reg, pos_sq, d_neg, hinge, bool((d_neg >= settings.margin).all()))


def exact_loss_terms(
    dW: torch.Tensor,
    base_weight: torch.Tensor,
    inputs: list[torch.Tensor],
    deltas: list[torch.Tensor | None],
    settings: MergeSettings,
) -> LossTerms:
    """The loss and its parts for merged delta dW (D_out, D_in) on raw aligned inputs X_i (R, D_in)."""
    stacked, targets = feature_blocks(base_weight, inputs, deltas)
    predictions = stacked @ (base_weight + dW.to(base_weight)).T
    return loss_terms(predictions, targets, dW, settings)


def exact_loss(dW, base_weight, inputs, deltas, settings: MergeSettings) -> torch.Tensor:
    """Scalar total loss of ``exact_loss_terms``."""
    return exact_loss_terms(dW, base_weight, inputs, deltas, settings).total


class Surrogate:
    """The loss from exact statistics alone (float64, differentiable in dW), an upper bound of the true loss.

    With E_i = dW - Delta_i: ||Yhat_i - Y_i||^2 = tr(E_i G_i E_i^T) and
    ||Yhat_i||^2 = ||Y_i||^2 + 2 <E_i G_i, W_i> + ||Yhat_i - Y_i||^2 are exact. For the negatives,
    ||Yhat_i - Y_j|| >= max(||Y_i - Y_j|| - d_p,i, | ||Yhat_i|| - ||Y_j|| |) by the triangle
    inequality (and, for pairs a micro-batched capture never saw together, its value on the
    sampled rows); relu(margin - d)^2 decreases in d, so the bound can only overstate the hinge,
    and it is exact whenever the bound reaches the margin (hinge certified zero).

    Each concept enters through its factors Delta_i = U_i D_i and P_i = D_i G_i (r_i, D_in), so
    <Delta_i G_i, M> = <P_i, U_i^T M> never needs a dense per-concept matrix.
    """

    def __init__(self, stats: LayerStats, factors: list[LowRank | None]):
        check_factors(factors, stats.n_concepts, tuple(stats.base_weight.shape))
        if stats.rows == 0:
            raise ValueError("LayerStats holds no rows: nothing was captured for this layer")
        self.stats = stats
        base = stats.base_weight
        self.ups = [None if f is None else f.up.to(base) for f in factors]  # U_i (D_out, r_i)
        self.projections = [None if f is None else stats.times_gram(i, f.down.to(base)) for i, f in enumerate(factors)]  # P_i
        zero = torch.zeros((), dtype=base.dtype, device=base.device)
        self.delta_energy = torch.stack([
            zero if f is None else ((u.T @ u) * (p @ f.down.to(base).T)).sum()
            for f, u, p in zip(factors, self.ups, self.projections)
        ])  # (N,) ||X_i Delta_i^T||^2
        self.delta_base = self.linear(base)  # (N,) <Delta_i G_i, W0>

    def linear(self, matrix: torch.Tensor) -> torch.Tensor:
        """(N,) <Delta_i G_i, matrix> for a (D_out, D_in) matrix."""
        zero = torch.zeros((), dtype=matrix.dtype, device=matrix.device)
        return torch.stack([zero if u is None else (p * (u.T @ matrix)).sum() for u, p in zip(self.ups, self.projections)])

    def terms(self, dW: torch.Tensor, settings: MergeSettings) -> LossTerms:
        stats = self.stats
        n, base = stats.n_concepts, stats.base_weight
        dW = dW.to(base)
        quadratic = stats.quadratic_forms(dW, dW)  # (N,) tr(dW G_i dW^T)
        with_base = stats.quadratic_forms(dW, base)  # (N,) <dW G_i, W0>
        linear = self.linear(dW)  # (N,) <Delta_i G_i, dW>
        pos_sq = (quadratic - 2 * linear + self.delta_energy).clamp_min(0)  # (N,) ||Yhat_i - Y_i||^2
        cross = with_base + linear - self.delta_base - self.delta_energy  # (N,) <Yhat_i - Y_i, Y_i>
        target_sq = stats.target_inner.diagonal()
        prediction_norm = (target_sq + 2 * cross + pos_sq).clamp_min(DISTANCE_SQ_FLOOR).sqrt()
        d_pos = pos_sq.clamp_min(DISTANCE_SQ_FLOOR).sqrt()
        bound = torch.maximum(
            stats.target_distances() - d_pos[:, None],
            (prediction_norm[:, None] - target_sq.sqrt()[None, :]).abs(),
        ).clamp_min(DISTANCE_SQ_FLOOR ** 0.5)  # (N, N) lower bounds of ||Yhat_i - Y_j||
        if stats.pairs.sampled:  # pairs a micro-batched capture never saw together
            bound = torch.maximum(bound, stats.pairs.prediction_bounds(base + dW))
        bound = bound + torch.diag(torch.full_like(d_pos, float("inf")))
        d_neg = bound.min(dim=1).values
        hinge = torch.relu(settings.margin - d_neg).pow(2)
        contrastive = (d_pos.pow(2) + hinge).mean()
        mse = pos_sq.sum() / (n * stats.rows * base.shape[0])
        reg = torch.linalg.vector_norm(dW)
        total = settings.lambda_con * contrastive + settings.lambda_mse * mse + settings.lambda_reg * reg
        return LossTerms(total, contrastive, mse, reg, pos_sq, d_neg, hinge, bool((d_neg >= settings.margin).all()))


def surrogate_terms(
    dW: torch.Tensor, stats: LayerStats, factors: list[LowRank | None], settings: MergeSettings
) -> LossTerms:
    """One-off ``Surrogate(stats, factors).terms(dW, settings)``; build a ``Surrogate`` to evaluate many dW."""
    return Surrogate(stats, factors).terms(dW, settings)
