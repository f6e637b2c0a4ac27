"""``--method distill``: the student's layer maths, the training against a known optimum, hygiene, refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lib_loraclr.cli import main
from lib_loraclr.demo import concept_deltas
from lib_loraclr.lora.lowrank import LowRank
from lib_loraclr.lora.writer import write_kohya_lora, write_sidecar
from lib_loraclr.compose.attention import cross_attention_modules, map_divisor
from lib_loraclr.merge.distill import (
    DistillError,
    MixedDeltas,
    TeacherPool,
    distill,
    pair_indices,
    pair_teacher_pool,
    teacher_pool,
)
from lib_loraclr.merge.memory import distill_size
from lib_loraclr.merge.objective import MergeSettings
from lib_loraclr.merge.pipeline import load_concepts, merge_to_file
from lib_loraclr.progress import Progress
from lib_loraclr.validation import InputError

SIZE = 64


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def random_factors(d_out, d_in, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(d_out, rank, generator=generator), torch.randn(rank, d_in, generator=generator) * 0.1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_student_starts_as_stacking_and_applies_its_mix(kind):
    """At M = I the hooked layer adds sum_i U_i D_i x; with any M it adds U M D x. The known answer
    is the dense delta applied by the layer's own op (F.linear / F.conv2d with its stride and padding)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(4, 6, 3, stride=2, padding=1)
    d_in = layer.weight[0].numel()
    factors = [random_factors(6, d_in, 2, 1), None, random_factors(6, d_in, 3, 2)]
    student = MixedDeltas({"unet.layer": layer}, {"unet.layer": factors})
    x = torch.randn(2, 5, 8) if kind == "linear" else torch.randn(2, 4, 9, 9)

    def with_delta(delta):
        weight = layer.weight + delta.reshape(layer.weight.shape)
        if kind == "linear":
            return F.linear(x, weight, layer.bias)
        return F.conv2d(x, weight, layer.bias, stride=2, padding=1)

    stacked = factors[0].dense() + factors[2].dense()
    with torch.no_grad(), student.attached():
        assert torch.allclose(layer(x), with_delta(stacked), atol=1e-5)
        mix = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
        student.layers["unet.layer"].mix.copy_(mix)
        up = torch.cat([factors[0].up, factors[2].up], dim=1)
        down = torch.cat([factors[0].down, factors[2].down])
        assert torch.allclose(layer(x), with_delta(up @ mix @ down), atol=1e-4)
        assert torch.allclose(student.delta("unet.layer").dense(), up @ mix @ down, atol=1e-5)
    assert no_hooks(layer)


@pytest.fixture(scope="module")
def twin_loras(tiny_sd1, tmp_path_factory):
    """The same LoRA under two triggers: each teacher is that LoRA, so the best merge is the LoRA
    itself (stacking doubles it). A known optimum the training must find."""
    folder = tmp_path_factory.mktemp("twins")
    deltas = concept_deltas(tiny_sd1, 1)
    paths = []
    for name, trigger in (("first", "zqx fox"), ("second", "vbk robot")):
        path = str(folder / f"{name}.safetensors")
        write_kohya_lora(path, deltas, tiny_sd1.arch, rank=4)
        write_sidecar(path, trigger)
        paths.append(path)
    return paths


def test_distill_finds_the_known_optimum_and_leaves_the_model_alone(tiny_sd1, twin_loras, tmp_path):
    paths = twin_loras
    probe = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    cond = tiny_sd1.encode(["a photo of a cat"])
    with torch.no_grad():
        before = tiny_sd1.unet_eps(probe, torch.tensor([400]), cond)
    out = str(tmp_path / "distilled.safetensors")
    settings = MergeSettings(method="distill", capture_size=SIZE, capture_steps=4, distill_iters=150,
                             distill_trajectories=2, distill_pair_trajectories=0, report=False)
    summary = merge_to_file(tiny_sd1, load_concepts(paths, None), settings, out)

    # end to end on fresh latents at another resolution: as close as the concept's own LoRA; stacking is not
    for name, kept in summary["end_to_end"]["merged"].items():
        assert kept > 0.8, (name, kept)
        assert summary["end_to_end"]["stacked"][name] < 0.5
    assert summary["distill"]["loss_last"] < summary["distill"]["loss_first"]
    assert summary["distill"]["untrained_layers"] == 0, "diffusers encodes with gradients: every layer trains"
    assert max(summary["ranks"].values()) <= 8, "exact within the sum of the ranks"

    assert no_hooks(tiny_sd1.unet) and no_hooks(tiny_sd1.text_encoder)
    with torch.no_grad():
        assert torch.equal(tiny_sd1.unet_eps(probe, torch.tensor([400]), cond), before)


def test_divergence_is_one_clear_error_and_removes_the_hooks(tiny_sd1):
    layer_name, module = next(iter(tiny_sd1.targets().items()))
    d_in = module.weight[0].numel()
    student = MixedDeltas({layer_name: module}, {layer_name: [random_factors(module.weight.shape[0], d_in, 2, 1)]})
    latent = torch.zeros(2, 4, SIZE // 8, SIZE // 8)
    bad = latent.clone()
    bad[0, 0, 0, 0] = float("nan")
    pool = TeacherPool(latent, torch.tensor([500, 300]), torch.tensor([0, 0]), bad, latent.clone(),
                       torch.tensor([False, False]))
    with pytest.raises(DistillError, match="diverged at step 1"):
        distill(tiny_sd1, student, pool, ["a photo of a zqx"], iterations=3, lr=1e-2, batch=2, draws_per_forward=2,
                guidance_scale=4.0, seed=0, progress=Progress(), pair_weight=1.0)
    assert no_hooks(tiny_sd1.unet) and no_hooks(tiny_sd1.text_encoder)


def random_pool(count: int = 6) -> TeacherPool:
    generator = torch.Generator().manual_seed(1)
    shape = (count, 4, SIZE // 8, SIZE // 8)
    return TeacherPool(torch.randn(shape, generator=generator), torch.linspace(900, 100, count).long(),
                       torch.arange(count) * 2 // count, torch.randn(shape, generator=generator),
                       torch.randn(shape, generator=generator), torch.tensor([False, True] * (count // 2)))


def test_forwards_of_fewer_draws_train_exactly_as_the_whole_batch(tiny_sd1):
    """The memory plan only splits a step's draws into forwards: the summed gradient is the batch's
    gradient, so the losses and the trained mixes match one forward of the whole batch."""
    chosen = dict(list(tiny_sd1.targets().items())[-3:])
    factors = {t: [random_factors(m.weight.shape[0], m.weight[0].numel(), 2, i)] for i, (t, m) in enumerate(chosen.items())}
    pool = random_pool()
    results = []
    for draws in (4, 1, 3):
        student = MixedDeltas(chosen, factors)
        run = distill(tiny_sd1, student, pool, ["a zqx", "a vbk"], iterations=3, lr=5e-2, batch=4,
                      draws_per_forward=draws, guidance_scale=4.0, seed=0, progress=Progress(), pair_weight=0.5)
        assert run.untrained == []
        results.append((run.history, [m.detach().clone() for m in student.parameters()]))
    (whole, whole_mixes), *split = results
    assert whole[-1] != whole[0], "the mixes trained"
    for history, mixes in split:
        assert history == pytest.approx(whole, rel=1e-4)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(mixes, whole_mixes))


def test_a_layer_no_gradient_reaches_stays_stacked_and_is_named(tiny_sd1):
    """As a host's text encoder run without gradients (Forge, SDXL's conditioner): a target the
    model's forward never differentiates trains nothing, its mix stays exactly the identity, the
    others train, and the run names it."""
    name, module = list(tiny_sd1.targets().items())[-1]
    unreached = nn.Linear(8, 8)  # never called by the model
    chosen = {name: module, "text_encoder.unreached": unreached}
    factors = {name: [random_factors(module.weight.shape[0], module.weight[0].numel(), 2, 0)],
               "text_encoder.unreached": [random_factors(8, 8, 2, 1)]}
    student = MixedDeltas(chosen, factors)
    run = distill(tiny_sd1, student, random_pool(), ["a zqx", "a vbk"], iterations=3, lr=5e-2, batch=4,
                  draws_per_forward=4, guidance_scale=4.0, seed=0, progress=Progress(), pair_weight=0.5)
    assert run.untrained == ["text_encoder.unreached"]
    trained, kept = student.parameters()
    assert torch.equal(kept.detach(), torch.eye(2)) and not torch.equal(trained.detach(), torch.eye(2))


@pytest.mark.parametrize("template", ["photo of a", "{} and {}", "a {0}", "{}}"])
def test_prompt_template_needs_exactly_one_slot(template):
    with pytest.raises(InputError, match="prompt_template"):
        MergeSettings(prompt_template=template)


@pytest.mark.parametrize("option,value", [("--distill-iters", "0"), ("--distill-lr", "nan"),
                                          ("--distill-batch", "65"), ("--guidance-scale", "0.5"),
                                          ("--prompt-template", "photo of a")])
def test_cli_refuses_bad_distill_options_in_one_line(twin_loras, tiny_sd1_folder, tmp_path, capsys, option, value):
    paths = twin_loras
    out = tmp_path / "never.safetensors"
    code = main(["merge", "--base", tiny_sd1_folder, "--lora", paths[0], "--lora", paths[1], "--method", "distill",
                 option, value, "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code != 0 and option in error and len(error.splitlines()) == 1, error
    assert not out.exists()


def test_distill_size_is_the_largest_multiple_of_64_whose_backward_fits():
    gib = 2**30
    assert distill_size(per_draw=2 * gib, size=512, room=3 * gib) == 512  # fits: the capture size
    assert distill_size(per_draw=4 * gib, size=512, room=1 * gib) == 256  # a quarter of the pixels
    assert distill_size(per_draw=4 * gib, size=512, room=2 * gib) == 320  # 512 / sqrt(2) = 362 -> 320
    assert distill_size(per_draw=100 * gib, size=512, room=1 * gib) == 64  # never below one multiple
    assert distill_size(per_draw=100 * gib, size=32, room=1 * gib) == 32  # a smaller capture stays
    assert distill_size(per_draw=gib, size=512, room=-gib) == 64  # a budget below the margin


def test_distill_over_budget_trains_at_a_smaller_size_and_says_so(tiny_sd1, twin_loras, tmp_path):
    messages = []
    settings = MergeSettings(method="distill", capture_size=512, capture_steps=2, distill_iters=2,
                             distill_trajectories=1, report=False, end_to_end=False, max_memory_gb=0.76)
    summary = merge_to_file(tiny_sd1, load_concepts(twin_loras, None), settings, str(tmp_path / "small.safetensors"),
                            progress=Progress(lambda event: messages.append(event.message)))
    info = summary["distill"]
    assert info["size"] < 512 and info["size"] % 64 == 0
    assert info["pool_samples"] == 2 * 1 * 2 + 1 * 1 * 2  # concepts x trajectories x steps, then the default pair's
    assert info["pair_samples"] == 1 * 1 * 2
    assert any(f"teacher and training run at {info['size']} px" in m for m in messages if m)


def test_cli_says_when_distill_trained_below_the_capture_size(twin_loras, tiny_sd1_folder, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code = main(["merge", "--base", tiny_sd1_folder, "--lora", twin_loras[0], "--lora", twin_loras[1],
                 "--method", "distill", "--capture-size", "512", "--capture-steps", "2", "--distill-iters", "2",
                 "--distill-trajectories", "1", "--no-report", "--no-end-to-end", "--max-memory", "0.76",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "not 512 px: raise --max-memory to train at 512 px" in printed and "2 steps, loss" in printed, printed


def test_teacher_in_smaller_forwards_samples_the_same_pool(tiny_sd1, twin_loras):
    """Each trajectory keeps its row of one seeded noise and the UNet's rows are independent, so the
    memory plan's forwards of fewer trajectories record the same points as one forward of all."""
    concepts = load_concepts(twin_loras, None)
    pools = [teacher_pool(tiny_sd1, [c.lora for c in concepts], [1.0, 1.0], ["a zqx fox", "a vbk robot"], size=SIZE,
                          steps=3, trajectories=3, per_forward=per_forward, guidance_scale=4.0, seed=2,
                          progress=Progress())
             for per_forward in (3, 1, 2)]
    whole, *split = pools
    assert len(whole) == 2 * 3 * 3
    for pool in split:
        order_whole = sorted(range(len(whole)), key=lambda k: (int(whole.prompts[k]), -int(whole.timesteps[k]),
                                                                 float(whole.inputs[k].sum())))
        order = sorted(range(len(pool)), key=lambda k: (int(pool.prompts[k]), -int(pool.timesteps[k]),
                                                          float(pool.inputs[k].sum())))
        assert torch.allclose(pool.inputs[order], whole.inputs[order_whole], rtol=1e-4, atol=1e-4)
        assert torch.allclose(pool.eps_cond[order], whole.eps_cond[order_whole], rtol=1e-4, atol=1e-4)
        assert torch.allclose(pool.eps_uncond[order], whole.eps_uncond[order_whole], rtol=1e-4, atol=1e-4)


def test_pairs_chain_every_concept_twice_and_grow_with_n():
    assert pair_indices(1) == []
    assert pair_indices(2) == [(0, 1)]
    assert pair_indices(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]


@pytest.mark.parametrize("latent_side,preferred,expected", [(8, 16, 8), (8, 2, 32), (40, 16, 16), (40, 5, 64)])
def test_map_divisor_reads_the_resolutions_the_unet_has(tiny_sd1, latent_side, preferred, expected):
    """tiny SD1: cross-attention at levels 0-2 and the mid block (level 3): sides L, L/2, L/4, L/8."""
    def run():
        latent = torch.zeros(1, 4, latent_side, latent_side)
        tiny_sd1.unet_eps(latent, torch.tensor([500]), tiny_sd1.encode([""]))

    with torch.no_grad():
        assert map_divisor(cross_attention_modules(tiny_sd1.unet), run, latent_side, 8, preferred) == expected
    assert no_hooks(tiny_sd1.unet)


@pytest.mark.parametrize("pair_weight", [1.0, 0.25])
def test_pair_points_train_on_the_guided_noise(tiny_sd1, pair_weight):
    """The loss per draw, against a known answer: the base model (a student whose LoRAs add nothing)
    misses a single point's targets by a and b and a pair point's guided target by c, so the first
    loss is (mean a^2 + mean b^2 + w mean c^2 / g^2) / 2 at pair weight w."""
    target, module = next(iter(tiny_sd1.targets().items()))
    silent = LowRank(torch.zeros(module.weight.shape[0], 2), torch.randn(2, module.weight[0].numel()))
    student = MixedDeltas({target: module}, {target: [silent]})
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    timesteps, prompts, guidance = torch.tensor([700, 300]), ["a zqx fox", "a zqx fox and a vbk robot"], 4.0
    with torch.no_grad():
        cond = tiny_sd1.encode(prompts + ["", ""])
        eps_cond, eps_uncond = tiny_sd1.unet_eps(torch.cat([inputs, inputs]), timesteps.repeat(2), cond).chunk(2)
    a, b, c = (torch.randn(inputs[:1].shape, generator=generator) for _ in range(3))
    guided = eps_uncond[1:] + guidance * (eps_cond[1:] - eps_uncond[1:])
    pool = TeacherPool(inputs, timesteps, torch.tensor([0, 1]), torch.cat([eps_cond[:1] + a, guided + c]),
                       torch.cat([eps_uncond[:1] + b, torch.zeros_like(b)]), torch.tensor([False, True]))
    history = distill(tiny_sd1, student, pool, prompts, iterations=1, lr=1e-3, batch=2, draws_per_forward=1,
                      guidance_scale=guidance, seed=0, progress=Progress(), pair_weight=pair_weight).history
    expected = (a.square().mean() + b.square().mean() + pair_weight * c.square().mean() / guidance**2) / 2
    assert history[0] == pytest.approx(float(expected), rel=1e-4)


def test_pair_teacher_with_silent_loras_is_guided_base_sampling(tiny_sd1, twin_loras):
    """At weight 0 both LoRAs add nothing, so the composition is the base model: every recorded
    point's guided noise must be the base's uncond + g (cond - uncond) at that point's input."""
    concepts = load_concepts(twin_loras, None)
    prompt, guidance = "a zqx fox and a vbk robot", 3.0
    pool = pair_teacher_pool(tiny_sd1, [c.lora for c in concepts], [0.0, 0.0], ["zqx fox", "vbk robot"], [prompt],
                             [(0, 1)], first_prompt=2, size=SIZE, steps=3, trajectories=2, per_forward=2,
                             guidance_scale=guidance, seed=1, progress=Progress())
    assert len(pool) == 1 * 2 * 3 and bool(pool.guided.all()) and pool.prompts.tolist() == [2] * 6
    with torch.no_grad():
        cond = tiny_sd1.encode([prompt] * len(pool) + [""] * len(pool))
        eps_cond, eps_uncond = tiny_sd1.unet_eps(torch.cat([pool.inputs] * 2), pool.timesteps.repeat(2), cond).chunk(2)
    assert torch.allclose(pool.eps_cond, eps_uncond + guidance * (eps_cond - eps_uncond), atol=1e-4)
    assert no_hooks(tiny_sd1.unet) and no_hooks(tiny_sd1.text_encoder)


def test_cli_distill_with_pairs_puts_them_in_the_pool(tiny_sd1_folder, twin_loras, tmp_path, capsys):
    out = tmp_path / "pairs.safetensors"
    code = main(["merge", "--base", tiny_sd1_folder, "--lora", twin_loras[0], "--lora", twin_loras[1],
                 "--method", "distill", "--capture-size", str(SIZE), "--capture-steps", "2", "--distill-iters", "2",
                 "--distill-trajectories", "1", "--distill-pair-trajectories", "2", "--distill-pair-weight", "0.5",
                 "--no-report", "--no-end-to-end", "--out", str(out)])
    printed = capsys.readouterr().out
    # concepts x trajectories x steps, then pairs x pair trajectories x steps
    assert code == 0 and out.exists()
    assert json.loads(safe_open(str(out), "pt").metadata()["loraclr_settings"])["distill_pair_weight"] == 0.5
    assert f"pool of {2 * 1 * 2 + 1 * 2 * 2} points ({1 * 2 * 2} of them composed pairs)" in printed, printed
