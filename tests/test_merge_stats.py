"""Streamed merge statistics: fp32 precision against float64, shared inputs, memory that does not grow."""

import pytest
import torch

from lib_loraclr.lora.lowrank import LowRank
from lib_loraclr.merge.objective import MergeSettings, exact_loss
from lib_loraclr.merge.solvers import minimise_quadratic_plus_norm, solve_fast, solve_lsq
from lib_loraclr.merge.stats import InputStats, LayerStats, TargetStats


def ill_conditioned(seed, smallest_singular_value, d_in=64, d_out=48, rows=3000, n=3):
    """Features with singular values from 1 down to ``smallest_singular_value``, rounded to fp32 (as a model's are)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, float(torch.log10(torch.tensor(smallest_singular_value))), d_in, dtype=torch.float64)
    inputs = [((torch.randn(rows, d_in, generator=g, dtype=torch.float64) * spectrum) @ basis.T).float().double()
              for _ in range(n)]
    base = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / 8
    factors = [LowRank(0.1 * torch.randn(d_out, 4, generator=g, dtype=torch.float64),
                       torch.randn(4, d_in, generator=g, dtype=torch.float64)) for _ in range(n)]
    return base, inputs, factors


def naive_fp32_gram_solution(base, inputs, factors, settings):
    """What an fp32 Gram accumulation would give: H and P_i rounded independently in fp32."""
    x32 = [x.float() for x in inputs]
    gram = sum(x.T @ x for x in x32)
    projections = torch.cat([(x @ f.down.float().T).T @ x for x, f in zip(x32, factors)])
    up = torch.cat([f.up.float() for f in factors], 1)
    n, rows = len(inputs), inputs[0].shape[0]
    weight = settings.lambda_con / n + settings.lambda_mse / (n * rows * base.shape[0])
    values, vectors = torch.linalg.eigh(gram.double())
    merged, _, _ = minimise_quadratic_plus_norm(weight * values, vectors, up.double(), weight * projections.double(),
                                                settings.lambda_reg)
    return merged


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("smallest", [1e-4, 1e-6])
def test_fp32_streamed_statistics_match_float64_on_ill_conditioned_features(seed, smallest):
    """cond(X) 1e4 / 1e6 (Gram 1e8 / 1e12): the fp32 TSQR statistics reach the float64 optimum; an fp32 Gram does not."""
    settings = MergeSettings()
    base, inputs, factors = ill_conditioned(seed, smallest)
    deltas = [f.dense() for f in factors]
    exact = LayerStats.from_features(base, inputs, deltas)
    reference, _ = solve_fast(exact, factors, settings)
    streamed = TargetStats.from_features(base.float(), [x.float() for x in inputs], [f.to(torch.float32) for f in factors], 500)
    assert not streamed.inputs.kept, "3 x 3000 rows must have been folded into the fp32 triangular factor"
    ours, info = solve_fast(streamed, factors, settings)

    def loss(delta):
        return float(exact_loss(delta.dense().double(), base, inputs, deltas, settings))

    reference_loss, our_loss = loss(reference), loss(ours)
    assert info["hinge_certified"]
    assert our_loss <= reference_loss * (1 + 1e-5), (our_loss, reference_loss)
    assert loss(naive_fp32_gram_solution(base, inputs, factors, settings)) > reference_loss * (1 + 1e-5), (
        "the test must be able to fail: an fp32 Gram should lose accuracy on these features"
    )


def test_shared_input_equals_separate_statistics():
    """q, k and v registered on one InputStats give the solutions that each alone gives."""
    g = torch.Generator().manual_seed(3)
    d_in, n, rows = 20, 2, 90
    inputs = torch.randn(n, rows, d_in, generator=g)
    bases = [torch.randn(12, d_in, generator=g) for _ in range(3)]
    factors = [[LowRank(torch.randn(12, 2, generator=g), torch.randn(2, d_in, generator=g)) for _ in range(n)]
               for _ in range(3)]
    factors[1][0] = None  # concept 0 has no LoRA on k
    shared = InputStats(d_in, n)
    for name, per_concept in zip("qkv", factors):
        shared.register(name, [None if f is None else f.down for f in per_concept])
    stats = {name: TargetStats(name, base, shared) for name, base in zip("qkv", bases)}
    for start in range(0, rows, 13):
        x = inputs[:, start:start + 13]
        shared.add(x)
        for name, base, per_concept in zip("qkv", bases, factors):
            y = x @ base.T
            for i, f in enumerate(per_concept):
                if f is not None:
                    y[i] += (x[i] @ f.down.T) @ f.up.T
            stats[name].add_targets(y)
    settings = MergeSettings(method="lsq")
    for name, base, per_concept in zip("qkv", bases, factors):
        alone = TargetStats.from_features(base, list(inputs), per_concept, 13)
        together, _ = solve_lsq(stats[name], per_concept, settings)
        separate, _ = solve_lsq(alone, per_concept, settings)
        torch.testing.assert_close(together.dense(), separate.dense(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats[name].target_inner, alone.target_inner)


def test_statistics_memory_does_not_grow_with_rows_and_grows_with_concepts_only_by_their_ranks():
    d_in, rank = 48, 4

    def held(n_concepts, chunks):
        shared = InputStats(d_in, n_concepts)
        shared.register("layer", [torch.randn(rank, d_in) for _ in range(n_concepts)])
        for _ in range(chunks):
            shared.add(torch.randn(n_concepts, 40, d_in))
        return shared.nbytes(), shared.width

    few, width = held(2, 10)
    many, _ = held(2, 200)
    assert many == few <= 4 * (width * width + width * d_in)
    eight, width_eight = held(8, 50)
    assert width_eight == d_in + 8 * rank  # the LoRA columns only: nothing of size D_in^2 per concept
    assert eight <= 4 * (width_eight * width_eight + width_eight * d_in)


BATCHES = [range(0, 2), range(2, 3), range(3, 5)]  # concepts 0-1, 2 and 3-4 never in one batch


def _true_distances(predictions, targets):
    """(N, N) ||P_i - Y_j|| from whole feature blocks (N, R, D_out)."""
    return torch.cdist(predictions.flatten(1), targets.flatten(1))


def test_micro_batched_statistics_equal_one_batch_and_bound_the_pairs_never_batched():
    """Concepts fed in micro-batches: the same factor and in-batch distances, sound bounds across batches."""
    base, inputs, factors = ill_conditioned(7, 1e-2, d_in=24, d_out=16, rows=200, n=5)
    factors = [LowRank(0.3 * f.up, f.down) for f in factors]  # deltas the merge can fit: a certified hinge
    one = TargetStats.from_features(base.float(), inputs, factors, chunk_rows=50)
    batched = TargetStats.from_features(base.float(), inputs, factors, chunk_rows=50, batches=BATCHES)
    assert one.rows == batched.rows == 200
    gram_one, gram_batched = (s.inputs.factor("layer") for s in (one, batched))
    gram_one, gram_batched = gram_one.T @ gram_one, gram_batched.T @ gram_batched
    assert float((gram_batched - gram_one).norm() / gram_one.norm()) < 1e-6

    stacked = torch.stack(inputs)  # (N, R, D_in) float64
    targets = torch.stack([x @ (base + f.dense()).T for x, f in zip(inputs, factors)])
    true = _true_distances(targets, targets)
    together = batched.pairs.together
    assert int(together.sum()) == 4 + 1 + 4
    distances = batched.target_distances()
    torch.testing.assert_close(distances[together], true[together], rtol=1e-5, atol=1e-6)
    across = ~together
    assert bool((distances[across] <= true[across] * (1 + 1e-6)).all())
    assert bool((distances[across] > 0).all()), "the sampled rows give a real bound, not 0"

    # for any merged weight, the sample bounds never exceed the true ||Yhat_i - Y_j||
    g = torch.Generator().manual_seed(3)
    for scale in (0.0, 0.1, 3.0):
        weight = base + scale * torch.randn(base.shape, generator=g, dtype=torch.float64)
        assert batched.pairs.sampled and not one.pairs.sampled
        bounds = batched.pairs.prediction_bounds(weight)
        exact = _true_distances(stacked @ weight.T, targets)
        assert bool((bounds[across] <= exact[across] * (1 + 1e-6)).all())
        assert bool((bounds[together] == 0).all())

    settings = MergeSettings()
    merged_one, info_one = solve_fast(one, factors, settings)
    merged_batched, info_batched = solve_fast(batched, factors, settings)
    assert info_one["hinge_certified"] and info_batched["hinge_certified"]
    deltas = [f.dense() for f in factors]  # the same optimum (flat directions aside: compare the loss)
    loss_one, loss_batched = (float(exact_loss(m.dense().double(), base, inputs, deltas, settings))
                              for m in (merged_one, merged_batched))
    assert abs(loss_batched - loss_one) <= 1e-8 * loss_one


def test_micro_batched_exact_statistics_equal_one_batch_within_batches():
    base, inputs, factors = ill_conditioned(8, 1e-2, d_in=12, d_out=10, rows=60, n=5)
    deltas = [f.dense() for f in factors]
    one = LayerStats.from_features(base, inputs, deltas, chunk_rows=20)
    batched = LayerStats.from_features(base, inputs, deltas, chunk_rows=20, batches=BATCHES)
    assert one.rows == batched.rows == 60
    for i in range(5):
        torch.testing.assert_close(batched.gram(i), one.gram(i), rtol=1e-10, atol=1e-10)
    together = batched.pairs.together
    torch.testing.assert_close(batched.target_inner[together], one.target_inner[together], rtol=1e-10, atol=1e-10)
    assert bool((batched.target_distances()[~together] <= one.target_distances()[~together] * (1 + 1e-9)).all())
