"""Per-layer solvers: the authors' AdamW loop, the closed-form fast solver, and the baselines.

Every statistics-based solver has the signature ``fn(stats, factors, settings) -> (dW, info)``:
``factors`` are the concepts' Delta_i = U_i D_i as ``LowRank`` (matrix form) or None where a
LoRA does not touch the layer; ``stats`` streamed ``TargetStats`` or exact ``LayerStats``; dW
is the merged delta as fp32 factors and ``info`` a JSON-able dict for reports.
``solve_reference`` needs the raw aligned inputs instead of statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..lora.lowrank import LowRank
from .objective import MergeSettings, Surrogate, check_factors, feature_blocks, loss_terms
from .stats import LayerStats, TargetStats


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def solve_reference(
    base_weight: torch.Tensor,
    inputs: list[torch.Tensor],
    factors: list[LowRank | None],
    settings: MergeSettings,
) -> tuple[LowRank, dict]:
    """The authors' procedure on raw aligned inputs X_i (R, D_in), in fp32 (they used fp16 autocast).

    dW starts at zero; each of ``iters`` AdamW steps first evaluates the loss, snapshots dW if
    that loss is the lowest so far, then steps; the best snapshot is returned.
    """
    base_weight = base_weight.detach().float()
    started = _now(base_weight.device)
    deltas = [None if f is None else f.to(base_weight).dense() for f in factors]
    stacked, targets = feature_blocks(base_weight, inputs, deltas)  # (N, R, D_in), (N, R, D_out)
    merged_delta = torch.nn.Parameter(torch.zeros_like(base_weight))
    optimizer = torch.optim.AdamW([merged_delta], lr=settings.lr, weight_decay=settings.weight_decay)
    history, best_loss, best_iter, best_delta = [], float("inf"), -1, merged_delta.detach().clone()
    for iteration in range(settings.iters):
        optimizer.zero_grad(set_to_none=True)
        predictions = stacked @ (base_weight + merged_delta).T
        total = loss_terms(predictions, targets, merged_delta, settings).total
        value = total.item()
        history.append(value)
        if value < best_loss:
            best_loss, best_iter, best_delta = value, iteration, merged_delta.detach().clone()
        total.backward()
        optimizer.step()
    info = {
        "solver": "reference",
        "seconds": _now(base_weight.device) - started,
        "best_loss": best_loss,
        "best_iter": best_iter,
        "loss_history": history,
    }
    return dense_factors(best_delta), info


def dense_factors(matrix: torch.Tensor) -> LowRank:
    """An exact (thin SVD) factor pair of a dense (D_out, D_in) delta, for the writer and the runtime."""
    u, s, vh = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    return LowRank((u * s).contiguous(), vh.contiguous())


def minimise_quadratic_plus_norm(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    up: torch.Tensor,
    projections: torch.Tensor,
    lambda_reg: float,
) -> tuple[LowRank, float | None, int]:
    """Global minimiser of tr(dW H dW^T) - 2 <dW, B> + lambda_reg * ||dW||_F, H = V diag(s) V^T PSD, B = up @ projections.

    Stationarity gives dW(mu) = B (H + mu I)^-1 with mu = lambda_reg / (2 ||dW||). In the
    eigenbasis, with P = B V, mu * ||dW(mu)|| = sqrt(sum_k |P_k|^2 mu^2 / (s_k + mu)^2) rises
    from 0 to ||P||, so the fixed point exists iff ||P|| > lambda_reg / 2 (else dW = 0 is
    optimal: the zero subgradient condition) and is found by bisection on log mu. B's rows lie
    in range(H) (B is a combination of Delta_i G_i), so null directions of H are dropped: the
    solution is the minimum-norm one, leaving W0 alone where no feature reaches.
    B = up (D_out, K) @ projections (K, D_in) stays factored, and so does the result:
    dW = up @ coefficients, (K, D_in). Returns (dW, mu or None when dW = 0 is optimal, rank of H).
    """
    d_in = eigenvectors.shape[0]
    zero = LowRank(up, projections.new_zeros(up.shape[1], d_in))
    if eigenvalues.numel() == 0 or eigenvalues.max() <= 0:
        return zero, None, 0
    tolerance = eigenvalues.max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    kept = eigenvalues > tolerance
    values, vectors = eigenvalues[kept], eigenvectors[:, kept]  # (k,), (D_in, k)
    projected = projections @ vectors  # (K, k): B V = up @ projected
    if lambda_reg == 0:
        return LowRank(up, (projected / values) @ vectors.T), 0.0, int(kept.sum())
    weight_sq = ((up.T @ up) @ projected * projected).sum(0).clamp_min(0).cpu()  # (k,) |B v_k|^2
    half_reg = lambda_reg / 2
    norm = float(weight_sq.sum().sqrt())
    if norm <= half_reg * (1 + 1e-12):
        return zero, None, int(kept.sum())
    values_cpu = values.cpu()
    ratio = half_reg / norm
    low = float(values_cpu.min()) * ratio / (1 - ratio)  # the root lies in [low, high]
    high = float(values_cpu.max()) * ratio / (1 - ratio)
    while high > low * (1 + 1e-13):
        mu = (low * high) ** 0.5
        reach = float((weight_sq * (mu / (values_cpu + mu)).pow(2)).sum().sqrt())
        if reach < half_reg:
            low = mu
        else:
            high = mu
    mu = (low * high) ** 0.5
    return LowRank(up, (projected / (values + mu)) @ vectors.T), mu, int(kept.sum())


def _concept_weight(stats, settings: MergeSettings) -> float:
    """c in sum_i c ||X_i (dW - Delta_i)^T||^2: the contrastive positives plus the mse share."""
    n = stats.n_concepts
    return settings.lambda_con / n + settings.lambda_mse / (n * stats.rows * stats.d_out)


# Relative slack on the streamed statistics' norms: fp32 QR rounding is ~1e-7 of them.
_STREAM_SLACK = 1e-4


@dataclass
class _System:
    """The per-layer least-squares system in factored form, from either kind of statistics."""

    eigenvalues: torch.Tensor  # (D_in,) or (m,) spectrum of H = sum_i G_i, float64
    eigenvectors: torch.Tensor  # (D_in, k)
    up: torch.Tensor  # (D_out, K) [U_1 .. U_N] of the present concepts
    projections: torch.Tensor  # (K, D_in) [P_1; ..; P_N], P_i = D_i G_i
    residual: object = None  # coefficients (K, D_in) -> sum_i ||X_i (up @ coef - Delta_i)^T||^2, streamed only


def _gram_eigh(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of rows^T rows (D_in, D_in) for float64 rows (m, D_in), via the smaller of the two Grams."""
    m, d_in = rows.shape
    if m >= d_in:
        return torch.linalg.eigh(rows.T @ rows)
    values, left = torch.linalg.eigh(rows @ rows.T)  # (m,), (m, m): rows^T u / sqrt(s) are the eigenvectors
    kept = values > values.max().clamp_min(0) * m * torch.finfo(values.dtype).eps
    values, left = values[kept], left[:, kept]
    return values, (rows.T @ left) / values.sqrt()


def _system(stats: TargetStats | LayerStats, factors: list[LowRank | None]) -> _System:
    up = LowRank.cat([f for f in factors if f is not None]).up.double()  # (D_out, K) [U_1 .. U_N]
    if isinstance(stats, LayerStats):
        base = stats.base_weight
        projections = torch.cat([stats.times_gram(i, f.down.to(base)) for i, f in enumerate(factors) if f is not None])
        values, vectors = stats.gram_sum_eigh()
        return _System(values, vectors, up.to(base), projections)
    triangle = stats.inputs.factor(stats.target)  # (m, D_in + K): T^T T = [X | C]^T [X | C]
    d_in = stats.inputs.d_in
    inputs_part, coefficients_part = triangle[:, :d_in], triangle[:, d_in:]
    values, vectors = _gram_eigh(inputs_part)
    up = up.to(triangle)
    up_gram = up.T @ up

    def residual(coefficients: torch.Tensor) -> float:
        error = inputs_part @ coefficients.T - coefficients_part  # (m, K): T ([coef; -I] applied)
        return float(((error.T @ error) * up_gram).sum())

    return _System(values, vectors, up, coefficients_part.T @ inputs_part, residual)


def solve_fast(
    stats: TargetStats | LayerStats, factors: list[LowRank | None], settings: MergeSettings
) -> tuple[LowRank, dict]:
    """The LoRACLR objective from statistics: one eigh, a scalar root find, a certificate.

    All concepts share one weight c (aligned rows), so the hinge-free loss is
    c * sum_i tr((dW - Delta_i) G_i (dW - Delta_i)^T) + lambda_reg ||dW||, minimised globally by
    ``minimise_quadratic_plus_norm`` with H = c sum G_i, B = c sum Delta_i G_i. That value is a
    lower bound of the true loss anywhere; if the hinge is certified inactive there, the point
    is the global minimiser of the true loss. Exact statistics certify with the ``Surrogate``
    and otherwise refine it by L-BFGS from there (best of {closed form, refined, zero}).
    Streamed statistics certify with the bound ||Yhat_i - Y_j|| >= ||Y_i - Y_j|| - d_p,i,
    d_p,i^2 <= sum_k d_p,k^2; when that fails, info["needs_exact"] asks the caller for
    ``LayerStats`` of this layer and a second call.
    """
    started = _now(stats.base_weight.device)
    check_factors(factors, stats.n_concepts, tuple(stats.base_weight.shape))
    if stats.rows == 0:
        raise ValueError("no rows were captured for this layer")
    weight = _concept_weight(stats, settings)
    system = _system(stats, factors)
    merged, mu, rank = minimise_quadratic_plus_norm(
        weight * system.eigenvalues, system.eigenvectors, system.up, weight * system.projections,
        settings.lambda_reg,
    )
    info = {"solver": "fast", "mu": mu, "rank": rank, "refined": False}
    if system.residual is not None:
        certified, loss = _certify_streamed(stats, merged, system, weight, settings)
        info.update(surrogate_loss=loss, loss_lower_bound=loss, hinge_certified=certified,
                    globally_optimal=certified, needs_exact=not certified)
    else:
        surrogate = Surrogate(stats, factors)
        with torch.no_grad():
            terms = surrogate.terms(merged.dense(), settings)
        best_loss, certified, refined = float(terms.total), terms.hinge_certified, False
        if not certified:
            start = merged.dense()
            dense, best_loss, refined, certified = _refine(start, best_loss, surrogate, settings)
            merged = merged if dense is start else dense_factors(dense)
        info.update(surrogate_loss=best_loss, loss_lower_bound=float(terms.smooth_part(settings)),
                    hinge_certified=certified, globally_optimal=terms.hinge_certified, refined=refined)
    info["seconds"] = _now(stats.base_weight.device) - started
    return merged.to(torch.float32), info


def _certify_streamed(stats: TargetStats, merged: LowRank, system: _System, weight: float, settings: MergeSettings):
    """(hinge certified inactive, loss there) from the streamed statistics; the loss is exact when certified."""
    residual = max(system.residual(merged.down), 0.0)  # sum_i d_p,i^2
    up_gram = merged.up.T @ merged.up
    norm = float(((up_gram @ merged.down) * merged.down).sum().clamp_min(0).sqrt())
    own = max(system.residual(torch.zeros_like(merged.down)), 0.0)
    d_pos_bound = (residual * (1 + _STREAM_SLACK) + _STREAM_SLACK * own) ** 0.5
    bounds = stats.target_distances() * (1 - _STREAM_SLACK) - d_pos_bound  # (N, N) of ||Yhat_i - Y_j||
    if stats.pairs.sampled:  # pairs a micro-batched capture never saw together
        sampled = stats.pairs.prediction_bounds(stats.base_weight.double() + merged.dense())
        bounds = torch.maximum(bounds, sampled * (1 - _STREAM_SLACK))
    bounds.fill_diagonal_(float("inf"))
    certified = bool((bounds.min(dim=1).values >= settings.margin).all())
    return certified, weight * residual + settings.lambda_reg * norm


def _refine(start: torch.Tensor, start_loss: float, surrogate: Surrogate, settings: MergeSettings):
    """L-BFGS on the surrogate from the closed-form point; best of every evaluated point and dW = 0."""
    with torch.no_grad():
        zero_terms = surrogate.terms(torch.zeros_like(start), settings)
    best = {"loss": start_loss, "delta": start, "certified": False, "refined": False}
    if float(zero_terms.total) < best["loss"]:
        best.update(loss=float(zero_terms.total), delta=torch.zeros_like(start), certified=zero_terms.hinge_certified)
    if settings.refine_iters == 0:
        return best["delta"], best["loss"], best["refined"], best["certified"]
    variable = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.LBFGS([variable], max_iter=settings.refine_iters, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        terms = surrogate.terms(variable, settings)
        value = float(terms.total.detach())
        if value < best["loss"]:
            best.update(loss=value, delta=variable.detach().clone(), certified=terms.hinge_certified, refined=True)
        terms.total.backward()
        return terms.total

    optimizer.step(closure)
    return best["delta"], best["loss"], best["refined"], best["certified"]


def solve_lsq(
    stats: TargetStats | LayerStats, factors: list[LowRank | None], settings: MergeSettings
) -> tuple[LowRank, dict]:
    """Mix-of-Show gradient fusion: min_W mean ||X W^T - Y||^2 over all concepts' rows, closed form.

    Normal equations dW (sum G_i) = sum Delta_i G_i, solved on range(sum G_i): the minimum-norm
    dW, which is where their L-BFGS from W0 converges (its gradients never leave that range).
    """
    started = _now(stats.base_weight.device)
    check_factors(factors, stats.n_concepts, tuple(stats.base_weight.shape))
    if stats.rows == 0:
        raise ValueError("no rows were captured for this layer")
    system = _system(stats, factors)
    merged, _, rank = minimise_quadratic_plus_norm(
        system.eigenvalues, system.eigenvectors, system.up, system.projections, 0.0
    )
    return merged.to(torch.float32), {"solver": "lsq", "seconds": _now(stats.base_weight.device) - started, "rank": rank}


def solve_sum(factors: list[LowRank | None]) -> tuple[LowRank, dict]:
    """Plain stacking, dW = sum_i Delta_i, kept as the concatenated factors; needs no statistics."""
    present = [factor for factor in factors if factor is not None]
    if not present:
        raise ValueError("solve_sum got no concept delta for this layer (all None)")
    return LowRank.cat([factor.to(torch.float32) for factor in present]), {"solver": "sum", "seconds": 0.0}
