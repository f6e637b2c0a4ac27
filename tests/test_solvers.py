"""The LoRACLR per-layer objective, its statistics and solvers, on small random problems."""

import pytest
import torch

from lib_loraclr.lora.lowrank import LowRank
from lib_loraclr.merge.objective import MergeSettings, exact_loss, exact_loss_terms, surrogate_terms
from lib_loraclr.merge.solvers import solve_fast, solve_lsq, solve_reference, solve_sum
from lib_loraclr.merge.stats import LayerStats, TargetStats

DTYPE = torch.float64


def make_problem(seed, d_in=24, d_out=16, rows=40, n=3, scale=1.0, delta_scale=0.3, dtype=DTYPE):
    """Base weight, aligned inputs and rank-3 concept factors (``LowRank``; ``dense(f)`` for the matrices)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=gen, dtype=dtype) / d_in ** 0.5
    spectrum = torch.logspace(0, -2, d_in, dtype=dtype)
    inputs = [scale * (torch.randn(rows, d_in, generator=gen, dtype=dtype) * spectrum + 0.3) for _ in range(n)]
    factors = [
        LowRank(delta_scale * torch.randn(d_out, 3, generator=gen, dtype=dtype),
                torch.randn(3, d_in, generator=gen, dtype=dtype) / d_in)
        for _ in range(n)
    ]
    return base, inputs, factors


def dense(factors):
    return [None if f is None else f.dense() for f in factors]


def near_duplicate_problem(seed):
    """Two nearly identical concepts with tiny features: their target blocks are closer than the margin."""
    base, inputs, factors = make_problem(seed, scale=0.01, n=3)
    inputs[1] = inputs[0] + 1e-4 * torch.randn_like(inputs[0])
    factors[1] = LowRank(factors[0].up + 1e-3 * torch.randn_like(factors[0].up), factors[0].down)
    return base, inputs, factors


def loop_loss(dW, base, inputs, deltas, settings):
    """The formula written out concept by concept, as a second implementation."""
    n = len(inputs)
    predictions = [x @ (base + dW).T for x in inputs]
    targets = [x @ (base + d).T for x, d in zip(inputs, deltas)]
    con = 0.0
    for i in range(n):
        dist = [((predictions[i] - targets[j]).pow(2).sum()).clamp_min(1e-12).sqrt() for j in range(n)]
        d_neg = min(dist[j] for j in range(n) if j != i)
        con = con + dist[i] ** 2 + torch.relu(settings.margin - d_neg) ** 2
    con = con / n
    mse = sum((p - t).pow(2).sum() for p, t in zip(predictions, targets)) / (n * predictions[0].numel())
    return settings.lambda_con * con + settings.lambda_mse * mse + settings.lambda_reg * dW.norm()


@pytest.mark.parametrize("problem", ["far", "near"])
def test_exact_loss_matches_loop_value_and_gradient(problem):
    settings = MergeSettings()
    base, inputs, factors = make_problem(1) if problem == "far" else near_duplicate_problem(1)
    deltas = dense(factors)
    dW = (0.01 * torch.randn_like(base)).requires_grad_()
    terms = exact_loss_terms(dW, base, inputs, deltas, settings)
    (grad,) = torch.autograd.grad(terms.total, dW)
    expected = loop_loss(dW, base, inputs, deltas, settings)
    (expected_grad,) = torch.autograd.grad(expected, dW)
    assert torch.allclose(terms.total, expected, rtol=1e-10)
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)
    if problem == "near":
        assert not terms.hinge_certified and float(terms.hinge.detach().max()) > 0
    else:
        assert terms.hinge_certified


@pytest.mark.parametrize("seed", range(6))
def test_surrogate_upper_bounds_exact_and_is_exact_when_certified(seed):
    settings = MergeSettings()
    base, inputs, factors = make_problem(seed) if seed % 2 else near_duplicate_problem(seed)
    factors[2] = None
    deltas = dense(factors)
    stats = LayerStats.from_features(base, inputs, deltas, chunk_rows=16)
    certified_seen = False
    for step_scale in (0.0, 1e-3, 1e-2, 1e-1):
        dW = step_scale * torch.randn_like(base)
        exact = float(exact_loss(dW, base, inputs, deltas, settings))
        surrogate = surrogate_terms(dW, stats, factors, settings)
        assert float(surrogate.total) >= exact * (1 - 1e-10)
        if surrogate.hinge_certified:
            certified_seen = True
            assert float(surrogate.total) == pytest.approx(exact, rel=1e-9)
    assert certified_seen == bool(seed % 2)


@pytest.mark.parametrize("seed", range(4))
def test_fast_loss_not_above_reference(seed):
    settings = MergeSettings(iters=30)
    base, inputs, factors = make_problem(10 + seed, dtype=torch.float32)
    deltas = dense(factors)
    reference_delta, _ = solve_reference(base, inputs, factors, settings)
    reference_loss = float(exact_loss(reference_delta.dense(), base, inputs, deltas, settings))
    for stats in (LayerStats.from_features(base, inputs, deltas), TargetStats.from_features(base, inputs, factors, 7)):
        fast_delta, fast_info = solve_fast(stats, factors, settings)
        fast_loss = float(exact_loss(fast_delta.dense(), base, inputs, deltas, settings))
        assert fast_info["hinge_certified"] and fast_info["globally_optimal"]
        assert fast_loss <= reference_loss * (1 + 1e-5)
        assert fast_info["surrogate_loss"] == pytest.approx(fast_loss, rel=1e-4)


def test_reference_returns_best_snapshot():
    settings = MergeSettings(lr=1e-2, iters=10)  # a large step: the loss oscillates, the last is not the best
    base, inputs, factors = make_problem(3, dtype=torch.float32)
    deltas = dense(factors)
    delta, info = solve_reference(base, inputs, factors, settings)
    history = info["loss_history"]
    assert len(history) == 10
    assert info["best_loss"] == min(history) and history[info["best_iter"]] == min(history)
    assert min(history) < history[0] and history[-1] > min(history)
    assert float(exact_loss(delta.dense(), base, inputs, deltas, settings)) == pytest.approx(info["best_loss"], rel=1e-5)


def test_streaming_chunks_equal_one_shot():
    base, inputs, factors = make_problem(4, rows=50)
    deltas = dense(factors)
    chunked = LayerStats.from_features(base, inputs, deltas, chunk_rows=7)
    whole = LayerStats.from_features(base, inputs, deltas, chunk_rows=50)
    assert chunked.rows == whole.rows == 50
    assert all(torch.allclose(chunked.gram(i), whole.gram(i), rtol=1e-12, atol=1e-12) for i in range(3))
    assert torch.allclose(chunked.target_inner, whole.target_inner, rtol=1e-12)
    assert torch.allclose(whole.gram(1), inputs[1].T @ inputs[1], rtol=1e-12, atol=1e-12)
    targets = [x @ (base + d).T for x, d in zip(inputs, deltas)]
    assert float(whole.target_distances()[0, 2]) == pytest.approx(float((targets[0] - targets[2]).norm()), rel=1e-9)


def assert_stationary(stats, deltas, settings, merged_delta):
    """Zero gradient of the hinge-free loss: 2 dW H - 2 B + lambda_reg dW / ||dW|| = 0."""
    weight = settings.lambda_con / stats.n_concepts + settings.lambda_mse / (
        stats.n_concepts * stats.rows * stats.base_weight.shape[0]
    )
    dW = merged_delta.double()
    grams = [stats.gram(i) for i in range(stats.n_concepts)]
    hessian = weight * sum(grams)
    linear = weight * sum(d @ g for d, g in zip(deltas, grams))
    gradient = 2 * dW @ hessian - 2 * linear + settings.lambda_reg * dW / dW.norm()
    assert float(gradient.norm()) <= 1e-5 * float(linear.norm())


@pytest.mark.parametrize("rows", [6, 200])
def test_fast_is_stationary_and_rank_deficient_solution_lives_in_range(rows):
    settings = MergeSettings()
    base, inputs, factors = make_problem(5, rows=rows, n=2, d_in=32)
    deltas = dense(factors)
    stats = LayerStats.from_features(base, inputs, deltas)
    merged_delta, info = solve_fast(stats, factors, settings)
    merged_delta = merged_delta.dense()
    assert torch.isfinite(merged_delta).all()
    assert info["rank"] == min(2 * rows, 32)
    assert_stationary(stats, deltas, settings, merged_delta)
    stacked = torch.cat(inputs)  # (2 * rows, D_in): the null space of H is orthogonal to these rows
    _, _, right = torch.linalg.svd(stacked)
    null_basis = right[info["rank"]:].T
    assert float((merged_delta.double() @ null_basis).norm()) <= 1e-5 * float(merged_delta.norm()) + 1e-12
    assert info["hinge_certified"]
    reference_delta, _ = solve_reference(base, inputs, factors, settings)
    assert float(exact_loss(merged_delta, base, inputs, deltas, settings)) <= float(
        exact_loss(reference_delta.dense(), base, inputs, deltas, settings)
    ) * (1 + 1e-6)


def test_zero_is_returned_when_optimal_and_not_otherwise():
    base, inputs, factors = make_problem(6, delta_scale=1e-4)
    deltas = dense(factors)
    stats = LayerStats.from_features(base, inputs, deltas)
    settings = MergeSettings()
    weight = settings.lambda_con / 3 + settings.lambda_mse / (3 * stats.rows * base.shape[0])
    threshold = 2 * float((weight * sum(d @ stats.gram(i) for i, d in enumerate(deltas))).norm())
    zero_delta, info = solve_fast(stats, factors, MergeSettings(lambda_reg=threshold * 1.01))
    assert float(zero_delta.dense().abs().max()) == 0.0 and info["hinge_certified"]
    below = MergeSettings(lambda_reg=threshold * 0.9)
    small_delta, _ = solve_fast(stats, factors, below)
    assert float(small_delta.dense().norm()) > 0
    assert_stationary(stats, deltas, below, small_delta.dense())


@pytest.mark.parametrize("rows", [5, 60])
def test_lsq_matches_lstsq_on_concatenated_rows(rows):
    base, inputs, factors = make_problem(7, rows=rows, d_in=24)
    factors[1] = None
    deltas = dense(factors)
    stacked = torch.cat(inputs)  # (N * rows, D_in)
    residual_targets = torch.cat([x @ (torch.zeros_like(base) if d is None else d).T for x, d in zip(inputs, deltas)])
    expected = torch.linalg.lstsq(stacked, residual_targets, driver="gelsd").solution.T  # min-norm when rank-deficient
    for stats in (LayerStats.from_features(base, inputs, deltas), TargetStats.from_features(base, inputs, factors, 9)):
        merged_delta, info = solve_lsq(stats, factors, MergeSettings(method="lsq"))
        assert info["rank"] == min(3 * rows, 24)
        tolerance = 1e-6 if isinstance(stats, LayerStats) else 1e-4  # streamed statistics are fp32
        assert torch.allclose(merged_delta.dense().double(), expected, rtol=1e-3,
                              atol=tolerance * float(expected.abs().max()))


def test_fast_refines_when_hinge_is_active():
    settings = MergeSettings()
    base, inputs, factors = near_duplicate_problem(8)
    deltas = dense(factors)
    stats = LayerStats.from_features(base, inputs, deltas)
    merged_delta, info = solve_fast(stats, factors, settings)
    assert not info["globally_optimal"]
    exact = float(exact_loss(merged_delta.dense(), base, inputs, deltas, settings))
    assert exact <= info["surrogate_loss"] * (1 + 1e-6)
    assert info["loss_lower_bound"] <= exact
    assert info["surrogate_loss"] <= float(surrogate_terms(torch.zeros_like(base), stats, factors, settings).total)
    _, streamed = solve_fast(TargetStats.from_features(base, inputs, factors, 11), factors, settings)
    assert streamed["needs_exact"] and not streamed["hinge_certified"], "an active hinge must never be certified"


def test_sum_and_input_errors():
    base, inputs, factors = make_problem(9)
    deltas = dense(factors)
    merged_delta, _ = solve_sum([factors[0], None, factors[2]])
    assert torch.allclose(merged_delta.dense(), (deltas[0] + deltas[2]).float())
    with pytest.raises(ValueError, match="margin"):
        MergeSettings(margin=-1)
    with pytest.raises(ValueError, match="same R"):
        exact_loss(torch.zeros_like(base), base, [inputs[0], inputs[1][:5], inputs[2]], deltas, MergeSettings())
    stats = LayerStats(base, 3)
    with pytest.raises(ValueError, match="concept 1"):
        stats.add(inputs, [x @ base.T for x in inputs[:1]] + [inputs[1], inputs[2] @ base.T])
    with pytest.raises(ValueError, match="shape"):
        transposed = LowRank(factors[1].down.T, factors[1].up.T)
        solve_fast(LayerStats.from_features(base, inputs, deltas), [factors[0], transposed, None], MergeSettings())


def test_row_and_gram_representations_agree():
    """While few rows are kept, products go through the rows; they must equal the Gram products."""
    generator = torch.Generator().manual_seed(5)
    d_out, d_in = 6, 40
    base = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    few = LayerStats(base, 2)
    for _ in range(3):  # 2 concepts x 3 chunks x 4 rows = 24 rows < 40: rows kept
        inputs = [torch.randn(4, d_in, generator=generator, dtype=torch.float64) for _ in range(2)]
        few.add(inputs, [x @ base.T for x in inputs])
    assert few._rows() is not None and few.grams is None
    kept = few._rows()
    grams = [kept[i].T @ kept[i] for i in range(2)]
    left, right = (torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) for _ in range(2))
    expected = torch.stack([torch.trace(left @ g @ right.T) for g in grams])
    torch.testing.assert_close(few.quadratic_forms(left, right), expected)
    for i in range(2):
        torch.testing.assert_close(few.times_gram(i, left), left @ grams[i])
    values, vectors = few.gram_sum_eigh()
    torch.testing.assert_close((vectors * values) @ vectors.T, grams[0] + grams[1])

    inputs = [torch.randn(20, d_in, generator=generator, dtype=torch.float64) for _ in range(2)]
    few.add(inputs, [x @ base.T for x in inputs])  # now 2 x 32 rows > 40: back to Grams only
    assert few._rows() is None
    grams = [g + x.T @ x for g, x in zip(grams, inputs)]
    torch.testing.assert_close(few.grams, torch.stack(grams))
    expected = torch.stack([torch.trace(left @ g @ right.T) for g in grams])
    torch.testing.assert_close(few.quadratic_forms(left, right), expected)


@pytest.mark.parametrize("seed", range(3))
def test_an_active_hinge_across_micro_batches_is_never_certified_and_the_surrogate_stays_an_upper_bound(seed):
    """The near-duplicate concepts 0 and 1 captured in different batches: only sample bounds link them."""
    settings = MergeSettings()
    base, inputs, factors = near_duplicate_problem(seed)
    deltas = dense(factors)
    batches = [range(0, 1), range(1, 3)]
    _, streamed = solve_fast(TargetStats.from_features(base, inputs, factors, 11, batches=batches), factors, settings)
    assert not streamed["hinge_certified"] and streamed["needs_exact"]
    stats = LayerStats.from_features(base, inputs, deltas, batches=batches)
    assert not bool(stats.pairs.together[0, 1])
    merged_delta, info = solve_fast(stats, factors, settings)
    assert not info["globally_optimal"]
    exact = float(exact_loss(merged_delta.dense(), base, inputs, deltas, settings))
    assert exact <= info["surrogate_loss"] * (1 + 1e-6)
    assert info["loss_lower_bound"] <= exact
    for dW in (torch.zeros_like(base), merged_delta.dense(), deltas[0]):
        surrogate = float(surrogate_terms(dW, stats, factors, settings).total)
        assert float(exact_loss(dW, base, inputs, deltas, settings)) <= surrogate * (1 + 1e-9)
