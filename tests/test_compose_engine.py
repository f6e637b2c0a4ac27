"""The CLoRA step engine, attention capture and standalone pipeline on the tiny SD1 model."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

from lib_loraclr.compose.attention import cross_attention_modules
from lib_loraclr.compose.concepts import LoraConcept, plan_concepts
from lib_loraclr.compose.engine import ComposeEngine, encode_passes
from lib_loraclr.compose.fusion import cfg_combine, pass_lora_sets
from lib_loraclr.compose.pipeline import CLoRAPipeline, add_compose_command
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.hosts.diffusers import load_base
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.lora.writer import write_kohya_lora
from lib_loraclr.runtime import LoraRuntime

PROMPT = "a cat and a dog"
CONCEPTS = [LoraConcept("cat", "sks"), LoraConcept("dog", "zqx")]
# 4x4 attention maps at 64 px (down_blocks.1 / up_blocks.2 of the tiny model)
SETTINGS = ComposeSettings(method="clora", attention_res_divisor=16, refinement_iters=1, step_size=20.0)
TIMESTEP = torch.tensor(601)


def attention_deltas(model, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Random rank-``rank`` deltas at 30% of the weight norm on every attention Linear."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for target, module in model.targets().items():
        if any(part in target for part in (".attn1.", ".attn2.", ".self_attn.")) and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            delta = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
            deltas[target] = delta * (0.3 * module.weight.detach().norm() / delta.norm())
    return deltas


@pytest.fixture(scope="module")
def lora_paths(tiny_sd1, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("compose_loras")
    paths = []
    for seed, name in ((1, "cat_lora"), (2, "dog_lora")):
        path = str(folder / f"{name}.safetensors")
        write_kohya_lora(path, attention_deltas(tiny_sd1, seed), "sd1", rank=4)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def loras(lora_paths):
    return [read_lora(path) for path in lora_paths]


@pytest.fixture(scope="module")
def plan(tiny_sd1):
    return plan_concepts(PROMPT, CONCEPTS, tiny_sd1.tokenizer)


def make_engine(model, plan, runtime, settings=SETTINGS, mode="fast", num_steps=10):
    lora_sets = pass_lora_sets(plan)
    return ComposeEngine(plan, settings, runtime, lora_sets, cross_attention_modules(model.unet), num_steps, mode=mode)


def latent(batch=1, seed=3):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def all_hooks(*roots):
    return [
        (name, kind)
        for root in roots
        for name, module in root.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")
        if getattr(module, kind)
    ]


def test_latent_update_lowers_loss(tiny_sd1, loras, plan):
    settings = ComposeSettings(method="clora", attention_res_divisor=16, refinement_iters=0, step_size=2.0)
    with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, pass_lora_sets(plan))
        engine = make_engine(tiny_sd1, plan, runtime, settings)
        start = latent()
        result = engine.step(0, start, TIMESTEP, conditioning, tiny_sd1.unet_eps)
        loss_after, _ = engine.loss_and_grad(result.latent, TIMESTEP, conditioning, tiny_sd1.unet_eps)
    assert len(result.losses) == 1
    assert not torch.equal(result.latent, start)
    assert loss_after.item() < result.losses[0].item() - 1e-4


def test_masks_cover_every_pixel_and_modes_agree(tiny_sd1, loras, plan):
    """Masks sum to 1 per pixel; the batched, prefix-truncated engine equals the authors' way."""
    results = {}
    with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, pass_lora_sets(plan))
        for mode in ("fast", "authors"):
            engine = make_engine(tiny_sd1, plan, runtime, mode=mode)
            results[mode] = engine.step(0, latent(), TIMESTEP, conditioning, tiny_sd1.unet_eps)
    fast, authors = results["fast"], results["authors"]
    assert fast.masks.shape == (3, 1, 1, 8, 8)
    torch.testing.assert_close(fast.masks.sum(dim=0), torch.ones(1, 1, 8, 8))
    assert (fast.masks > 0).any(dim=0).all()
    assert len(fast.losses) == 2  # step 0 is a refinement step: 1 + refinement_iters updates
    torch.testing.assert_close(torch.stack(fast.losses), torch.stack(authors.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.latent, authors.latent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.masks, authors.masks)
    torch.testing.assert_close(fast.prediction, authors.prediction, rtol=1e-4, atol=1e-4)


def test_truncated_loss_pass_matches_full_pass_and_skips_the_rest(tiny_sd1, loras, plan):
    conv_out_calls = []
    handle = tiny_sd1.unet.conv_out.register_forward_hook(lambda *args: conv_out_calls.append(1))
    try:
        with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
            conditioning = encode_passes(tiny_sd1.encode, runtime, plan, pass_lora_sets(plan))
            fast = make_engine(tiny_sd1, plan, runtime, mode="fast")
            full = make_engine(tiny_sd1, plan, runtime, mode="authors")
            fast.loss_and_grad(latent(), TIMESTEP, conditioning, tiny_sd1.unet_eps)  # learns the prefix
            calls_before = len(conv_out_calls)
            loss, grad = fast.loss_and_grad(latent(), TIMESTEP, conditioning, tiny_sd1.unet_eps)
            truncated_calls = len(conv_out_calls) - calls_before
            full_loss, full_grad = full.loss_and_grad(latent(), TIMESTEP, conditioning, tiny_sd1.unet_eps)
    finally:
        handle.remove()
    assert truncated_calls == 0
    assert grad.abs().max() > 0
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)


def test_without_updates_and_masks_it_is_the_plain_pass_average(tiny_sd1, loras, plan):
    settings = ComposeSettings(method="clora", attention_res_divisor=16, use_latent_update=False, use_masks=False,
                               guidance_scale=5.0)
    lora_sets = pass_lora_sets(plan)
    z = latent()
    with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, lora_sets)
        result = make_engine(tiny_sd1, plan, runtime, settings).step(0, z, TIMESTEP, conditioning, tiny_sd1.unet_eps)
        guided = []
        with torch.no_grad():
            for p, lora_set in enumerate(lora_sets):
                with runtime.active(lora_set):
                    uncond = tiny_sd1.unet_eps(z, TIMESTEP, conditioning.unconds[p])
                    cond = tiny_sd1.unet_eps(z, TIMESTEP, conditioning.conds[p])
                guided.append(cfg_combine(uncond, cond, 5.0))
    assert result.losses == [] and torch.equal(result.latent, z)
    torch.testing.assert_close(result.prediction, torch.stack(guided).mean(dim=0), rtol=1e-4, atol=1e-5)


def test_batched_rows_equal_separate_passes(tiny_sd1, loras, plan):
    lora_sets = pass_lora_sets(plan)
    z = latent()
    with LoraRuntime(tiny_sd1.targets(), loras) as runtime, torch.no_grad():
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, lora_sets)
        with runtime.rows([sorted(s) for s in lora_sets]):
            batched = tiny_sd1.unet_eps(z.repeat(6, 1, 1, 1), TIMESTEP, conditioning.all_passes())
        separate = []
        for p, lora_set in enumerate(lora_sets):
            with runtime.active(lora_set):
                separate.append(tiny_sd1.unet_eps(z.repeat(2, 1, 1, 1), TIMESTEP, conditioning.pass_batch(p)))
    assert not torch.allclose(separate[0], separate[1], atol=1e-3)  # the LoRAs do change the passes
    torch.testing.assert_close(batched, torch.cat(separate), rtol=1e-4, atol=1e-5)


def test_fast_and_authors_modes_generate_the_same_latents_in_float64(tiny_sd1_folder, loras):
    """Batched + truncated passes compute the authors' algorithm: in float64 the rounding gap
    between batched and separate passes (~1e-16) stays far under float32 resolution through
    six step-20 updates. The library keeps the sampler state in float32 whatever the model's
    dtype, so 1e-5 is ~3 float32 ulps at these latents' magnitude (~45); a float32 model
    differs by ~6e-5 at these settings (measured), so the bound does separate the precisions."""
    model = load_base(tiny_sd1_folder, dtype=torch.float64)
    settings = replace(SETTINGS, refinement_steps=(0,), refinement_iters=5, step_size=20.0)
    fast, authors = (
        CLoRAPipeline(model)(PROMPT, CONCEPTS, loras, steps=4, seed=0, height=64, width=64, settings=settings,
                             mode=mode, decode=False)
        for mode in ("fast", "authors")
    )
    assert fast.latents.abs().max() > 1.0  # the updates ran and the latents are not trivial
    torch.testing.assert_close(fast.latents, authors.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.masks, authors.masks)


def test_x0_prediction_fuses_like_noise(tiny_sd1, loras, plan):
    alpha = tiny_sd1.alphas_cumprod[TIMESTEP]

    def run_unet_x0(latent_rows, timestep, cond):
        eps = tiny_sd1.unet_eps(latent_rows, timestep, cond)
        return (latent_rows - (1 - alpha).sqrt() * eps) / alpha.sqrt()

    with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, pass_lora_sets(plan))
        eps_result = make_engine(tiny_sd1, plan, runtime).step(5, latent(), TIMESTEP, conditioning, tiny_sd1.unet_eps)
        x0_result = make_engine(tiny_sd1, plan, runtime).step(5, latent(), TIMESTEP, conditioning, run_unet_x0)
    torch.testing.assert_close(x0_result.latent, eps_result.latent, rtol=1e-4, atol=1e-5)
    expected = (eps_result.latent - (1 - alpha).sqrt() * eps_result.prediction) / alpha.sqrt()
    torch.testing.assert_close(x0_result.prediction, expected, rtol=1e-4, atol=1e-4)


def test_batch_of_two_treats_images_independently(tiny_sd1, loras, plan):
    lora_sets = pass_lora_sets(plan)
    pair = torch.cat([latent(seed=3), latent(seed=4)])
    with LoraRuntime(tiny_sd1.targets(), loras) as runtime:
        pair_conditioning = encode_passes(tiny_sd1.encode, runtime, plan, lora_sets, batch_size=2)
        single_conditioning = encode_passes(tiny_sd1.encode, runtime, plan, lora_sets)
        both = make_engine(tiny_sd1, plan, runtime).step(0, pair, TIMESTEP, pair_conditioning, tiny_sd1.unet_eps)
        second = make_engine(tiny_sd1, plan, runtime).step(0, pair[1:], TIMESTEP, single_conditioning, tiny_sd1.unet_eps)
    assert both.masks.shape == (3, 2, 1, 8, 8)
    assert both.losses[0].shape == (2,)
    torch.testing.assert_close(both.latent[1:], second.latent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.masks[:, 1:], second.masks)
    torch.testing.assert_close(both.prediction[1:], second.prediction, rtol=1e-4, atol=1e-4)


def test_hooks_removed_and_model_unchanged_after_run_and_after_error(tiny_sd1, loras, plan):
    model = tiny_sd1
    probe_cond = model.encode([PROMPT])
    with torch.no_grad():
        before = model.unet_eps(latent(), TIMESTEP, probe_cond)
    hooks_before = all_hooks(model.unet, model.text_encoder)

    result = CLoRAPipeline(model)(PROMPT, CONCEPTS, loras, steps=2, height=64, width=64, settings=SETTINGS, decode=False)
    assert torch.isfinite(result.latents).all()
    assert all_hooks(model.unet, model.text_encoder) == hooks_before

    class Boom(RuntimeError):
        pass

    def failing_unet(*args):
        raise Boom("host failure inside the loss pass")

    with pytest.raises(Boom):
        with LoraRuntime(model.targets(), loras) as runtime:
            conditioning = encode_passes(model.encode, runtime, plan, pass_lora_sets(plan))
            make_engine(model, plan, runtime).step(0, latent(), TIMESTEP, conditioning, failing_unet)
    assert all_hooks(model.unet, model.text_encoder) == hooks_before
    with torch.no_grad():
        after = model.unet_eps(latent(), TIMESTEP, probe_cond)
    assert torch.equal(before, after)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_compose_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_compose_cli_writes_image_and_masks(tiny_sd1_folder, lora_paths, tmp_path, capsys):
    out, masks = str(tmp_path / "image.png"), str(tmp_path / "masks.png")
    argv = [
        "compose", "--base", tiny_sd1_folder, "--prompt", PROMPT,
        "--lora", lora_paths[0], "--words", "cat", "--trigger", "sks",
        "--lora", lora_paths[1], "--words", "dog", "--trigger", "zqx",
        "--out", out, "--save-masks", masks, "--steps", "2", "--size", "64", "--attention-divisor", "16",
    ]
    assert run_cli(argv + ["--method", "clora"]) == 0  # CLoRA: each LoRA's pass has its own trigger
    assert "pass 1: a sks cat and a dog" in capsys.readouterr().out
    os.remove(out), os.remove(masks)
    assert run_cli(argv) == 0  # the default single pass: one prompt with every trigger
    assert "pass 1: a sks cat and a zqx dog" in capsys.readouterr().out
    image, sheet = Image.open(out), Image.open(masks)
    assert image.size == (64, 64)
    assert sheet.width == 64 and sheet.height > 64  # the legend strip below the image
    assert sheet.crop((0, 0, 64, 64)).tobytes() != image.convert("RGB").tobytes()

    with pytest.raises(FileExistsError, match="image.png"):
        run_cli(argv)
    missing_word = [a if a != "dog" else "horse" for a in argv] + ["--overwrite"]
    with pytest.raises(ValueError, match="horse"):
        run_cli(missing_word)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a lora")
    with pytest.raises(ValueError, match="broken.safetensors"):
        run_cli([str(broken) if a == lora_paths[1] else a for a in argv] + ["--overwrite"])
    assert os.path.getsize(out) > 0


def test_compose_cli_style_everywhere_or_on_chosen_subjects(tiny_sd1, tiny_sd1_folder, lora_paths, tmp_path):
    style = str(tmp_path / "style.safetensors")
    write_kohya_lora(style, attention_deltas(tiny_sd1, 3), "sd1", rank=4)
    base_argv = [
        "compose", "--base", tiny_sd1_folder, "--prompt", PROMPT,
        "--lora", lora_paths[0], "--words", "cat", "--lora", lora_paths[1], "--words", "dog",
        "--steps", "2", "--size", "64", "--attention-divisor", "16",
    ]
    images = {}
    for name, extra in (("plain", []), ("global", ["--style", style]), ("on_cat", ["--style", style, "--style-on", "1"])):
        out = str(tmp_path / f"{name}.png")
        assert run_cli(base_argv + extra + ["--out", out]) == 0
        images[name] = Image.open(out).tobytes()
    assert len(set(images.values())) == 3, "a style changes the image, and limiting it changes it differently"
    with pytest.raises(ValueError, match="from 1 to 2"):
        run_cli(base_argv + ["--style", style, "--style-on", "3", "--out", str(tmp_path / "bad.png")])
    assert not os.path.exists(tmp_path / "bad.png")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_zero_weight_loras_without_updates_sample_exactly_the_plain_guided_image(tiny_sd1, loras, sampler):
    """With every LoRA at weight 0, no trigger words and no latent update, every pass is the
    plain guided prediction, so the fused one is too (the masks sum to 1): the composed latents
    must be the engine's plain sampler's (``sampling.sample``, checked on the exact Gaussian
    ODE in test_tiny_and_host), up to float32 rounding of the mask-weighted sum (measured
    3e-5 to 5e-5 at latents of magnitude ~44; a wrong sigma or guidance moves them by > 0.1)."""
    from lib_loraclr.sampling import sample

    settings = ComposeSettings(method="clora", attention_res_divisor=16, use_latent_update=False, guidance_scale=5.0)
    composed = CLoRAPipeline(tiny_sd1)(
        PROMPT, [LoraConcept("cat"), LoraConcept("dog")], loras, lora_weights=[0.0, 0.0], steps=4, seed=2,
        height=64, width=64, settings=settings, sampler=sampler, decode=False,
    )
    if sampler == "dpmpp_2m":
        plain = sample(tiny_sd1, tiny_sd1.encode([PROMPT]), uncond=tiny_sd1.encode([""]), guidance_scale=5.0,
                       steps=4, height=64, width=64, seed=2)
    else:  # Euler: x_next = x + (sigma_next - sigma) * (x - x0) / sigma, written out here
        from lib_loraclr.sampling import initial_noise, sigmas_for, trailing_timesteps

        timesteps = trailing_timesteps(1000, 4)
        sigmas = sigmas_for(tiny_sd1.alphas_cumprod, timesteps).tolist()
        cond, uncond = tiny_sd1.encode([PROMPT]), tiny_sd1.encode([""])
        x = initial_noise((1, 4, 8, 8), 2) * (1 + sigmas[0] ** 2) ** 0.5
        with torch.no_grad():
            for i, t in enumerate(timesteps.tolist()):
                z = x / (1 + sigmas[i] ** 2) ** 0.5
                eps_c = tiny_sd1.unet_eps(z, torch.tensor([t]), cond)
                eps_u = tiny_sd1.unet_eps(z, torch.tensor([t]), uncond)
                x0 = x - sigmas[i] * (eps_u + 5.0 * (eps_c - eps_u))
                x = x + (sigmas[i + 1] - sigmas[i]) * (x - x0) / sigmas[i]
        plain = x
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(composed.latents, plain, rtol=0, atol=1e-4)
