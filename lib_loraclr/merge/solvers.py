"""Per-layer solvers: the authors' AdamW loop, the closed-form fast solver, and the baselines.

Every statistics-based solver has the signature ``fn(stats, deltas, settings) -> (dW, info)``:
``deltas`` are the concepts' Delta_i (D_out, D_in) or None where a LoRA does not touch the
layer, dW is the merged delta (float32, on the statistics' device) and ``info`` a JSON-able
dict for reports. ``solve_reference`` needs the raw aligned inputs instead of statistics.
"""

from __future__ import annotations

import time

import torch

from .objective import MergeSettings, Surrogate, check_deltas, feature_blocks, loss_terms
from .stats import LayerStats


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def solve_reference(
    base_weight: torch.Tensor,
    inputs: list[torch.Tensor],
    deltas: list[torch.Tensor | None],
    settings: MergeSettings,
) -> tuple[torch.Tensor, dict]:
    """The authors' procedure on raw aligned inputs X_i (R, D_in), in fp32 (they used fp16 autocast).

    dW starts at zero; each of ``iters`` AdamW steps first evaluates the loss, snapshots dW if
    that loss is the lowest so far, then steps; the best snapshot is returned.
    """
    base_weight = base_weight.detach().float()
    started = _now(base_weight.device)
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
    return best_delta, info


def minimise_quadratic_plus_norm(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, linear: torch.Tensor, lambda_reg: float
) -> tuple[torch.Tensor, float | None, int]:
    """Global minimiser of tr(dW H dW^T) - 2 <dW, B> + lambda_reg * ||dW||_F, H = V diag(s) V^T PSD.

    Stationarity gives dW(mu) = B (H + mu I)^-1 with mu = lambda_reg / (2 ||dW||). In the
    eigenbasis, with P = B V, mu * ||dW(mu)|| = sqrt(sum_k |P_k|^2 mu^2 / (s_k + mu)^2) rises
    from 0 to ||P||, so the fixed point exists iff ||P|| > lambda_reg / 2 (else dW = 0 is
    optimal: the zero subgradient condition) and is found by bisection on log mu. B's rows lie
    in range(H) (B is a combination of Delta_i G_i), so null directions of H are dropped: the
    solution is the minimum-norm one, leaving W0 alone where no feature reaches.
    Returns (dW, mu or None when dW = 0 is optimal, rank of H).
    """
    if eigenvalues.numel() == 0 or eigenvalues.max() <= 0:
        return torch.zeros_like(linear), None, 0
    tolerance = eigenvalues.max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    kept = eigenvalues > tolerance
    values, vectors = eigenvalues[kept], eigenvectors[:, kept]  # (k,), (D_in, k)
    projected = linear @ vectors  # (D_out, k)
    if lambda_reg == 0:
        return (projected / values) @ vectors.T, 0.0, int(kept.sum())
    weight_sq = projected.pow(2).sum(0).cpu()  # (k,) |P_k|^2
    half_reg = lambda_reg / 2
    norm = float(weight_sq.sum().sqrt())
    if norm <= half_reg * (1 + 1e-12):
        return torch.zeros_like(linear), None, int(kept.sum())
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
    return (projected / (values + mu)) @ vectors.T, mu, int(kept.sum())


def _concept_weight(stats: LayerStats, settings: MergeSettings) -> float:
    """c in sum_i c ||X_i (dW - Delta_i)^T||^2: the contrastive positives plus the mse share."""
    n = stats.n_concepts
    return settings.lambda_con / n + settings.lambda_mse / (n * stats.rows * stats.base_weight.shape[0])


def solve_fast(stats: LayerStats, deltas: list[torch.Tensor | None], settings: MergeSettings) -> tuple[torch.Tensor, dict]:
    """The LoRACLR objective from statistics: one eigh, a scalar root find, a certificate.

    All concepts share one weight c (aligned rows), so the hinge-free loss is
    c * sum_i tr((dW - Delta_i) G_i (dW - Delta_i)^T) + lambda_reg ||dW||, minimised globally by
    ``minimise_quadratic_plus_norm`` with H = c sum G_i, B = c sum Delta_i G_i. That value is a
    lower bound of the true loss anywhere; if the surrogate certifies the hinge inactive there,
    the point is the global minimiser of the true loss. Otherwise the surrogate (an upper bound)
    is refined by L-BFGS from there and the best of {closed form, refined, zero} is kept.
    """
    started = _now(stats.device)
    surrogate = Surrogate(stats, deltas)
    weight = _concept_weight(stats, settings)
    eigenvalues, eigenvectors = stats.gram_sum_eigh()
    merged_delta, mu, rank = minimise_quadratic_plus_norm(
        weight * eigenvalues, eigenvectors, weight * surrogate.linear_sum(), settings.lambda_reg
    )
    with torch.no_grad():
        terms = surrogate.terms(merged_delta, settings)
    lower_bound = float(terms.smooth_part(settings))
    certified = terms.hinge_certified
    best_loss, refined = float(terms.total), False
    if not certified:
        merged_delta, best_loss, refined, certified = _refine(merged_delta, best_loss, surrogate, settings)
    info = {
        "solver": "fast",
        "seconds": _now(stats.device) - started,
        "surrogate_loss": best_loss,
        "loss_lower_bound": lower_bound,
        "hinge_certified": certified,
        "globally_optimal": terms.hinge_certified,
        "refined": refined,
        "mu": mu,
        "rank": rank,
    }
    return merged_delta.float(), info


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


def solve_lsq(stats: LayerStats, deltas: list[torch.Tensor | None], settings: MergeSettings) -> tuple[torch.Tensor, dict]:
    """Mix-of-Show gradient fusion: min_W mean ||X W^T - Y||^2 over all concepts' rows, closed form.

    Normal equations dW (sum G_i) = sum Delta_i G_i, solved on range(sum G_i): the minimum-norm
    dW, which is where their L-BFGS from W0 converges (its gradients never leave that range).
    """
    started = _now(stats.device)
    check_deltas(deltas, stats.n_concepts, tuple(stats.base_weight.shape))
    if stats.rows == 0:
        raise ValueError("LayerStats holds no rows: nothing was captured for this layer")
    linear = torch.zeros_like(stats.base_weight)  # sum_i Delta_i G_i
    for i, delta in enumerate(deltas):
        if delta is not None:
            linear += stats.times_gram(i, delta.to(linear))
    eigenvalues, eigenvectors = stats.gram_sum_eigh()
    merged_delta, _, rank = minimise_quadratic_plus_norm(eigenvalues, eigenvectors, linear, 0.0)
    return merged_delta.float(), {"solver": "lsq", "seconds": _now(stats.device) - started, "rank": rank}


def solve_sum(stats: LayerStats | None, deltas: list[torch.Tensor | None], settings: MergeSettings | None = None):
    """Plain stacking, dW = sum_i Delta_i; needs no statistics (``stats`` may be None)."""
    present = [delta for delta in deltas if delta is not None]
    if not present:
        raise ValueError("solve_sum got no concept delta for this layer (all None)")
    started = time.perf_counter()
    merged_delta = torch.stack([delta.float() for delta in present]).sum(0)
    return merged_delta, {"solver": "sum", "seconds": time.perf_counter() - started}
