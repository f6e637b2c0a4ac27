"""Composition inside both WebUI stand-ins against independent known answers, not "the image changed".

1. Zero-weight concept LoRAs, latent update off: every pass runs the plain model on the plain
   prompt, so the fused, guided prediction is the host's own CFG result and the sampler must
   end on the plain generation's latent, for each supported sampler the stand-ins offer.
2. One concept whose mask covers every pixel: the composition is that LoRA alone on the
   whole image, i.e. the host's own ``<lora:name:1>`` generation.
3. The host conversions (x0 / eps / v, sigma / timestep, k-diffusion scaling) on hand-made
   tensors built from a known x0 and noise, answers by formula in the test.
"""
import types

import numpy as np
import pytest
import torch

from test_extension import PROMPT, SETTINGS, compose_args, host, our_model, pixels, webui  # noqa: F401 (fixtures)

# Of the compose denoiser's supported samplers (webui_denoiser.SUPPORTED_LABELS), the ones the
# stand-ins offer; LMS and the DPM++ SDE samplers are not in them (checked below).
STAND_IN_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DDIM"]
NO_TRIGGERS_ZERO_WEIGHT = [{"lora": "cat_lora", "words": "cat", "weight": 0.0},
                           {"lora": "dog_lora", "words": "dog", "weight": 0.0}]
NO_UPDATE = {**SETTINGS, "use_latent_update": False}

# Final-latent tolerance of test 1, relative to the plain latent's largest entry (|x| ~ 45 on
# the tiny model). Why not 0: the composed run feeds the UNet a 2*P*B-row batch (pass-major
# [uncond, cond] per pass) where the host feeds 2B rows, and x goes through x*c_in/c_in. The
# tiny random UNet on the CPU gives different float32 rounding per batch size (measured: the same
# inputs in a 2-row and a 4-row batch differ by 8e-4 in Forge's x0 output, and a 1e-7 relative
# change of x moves it as much); CFG x7 and 3 steps carry that along. Measured max |diff| /
# max |plain|: <= 6e-6 for every k-diffusion sampler and A1111's DDIM, 1.9e-4 for Forge's DDIM
# (its eps is (x - x0) / sigma, and DDIM's x0 = (x - sqrt(1-a) eps) / sqrt(a) multiplies eps
# errors by 14.6 at t=999); test 2: 3e-6 (A1111), 3.7e-5 (Forge). A real conversion error is
# far above 1e-3 (measured by patching each into the code): cond/uncond swapped 0.3, the UNet
# fed z instead of x (a missing c_in) 1.0, sigma passed where the timestep goes 27, Forge
# DDIM's eps sign flipped 0.64, its alphas read one timestep off 0.05, even CFG scale 6.5 for
# 7 gives 1.1e-2. Scale errors that cancel end to end (the same wrong c_in both ways) and the
# preview x0 are caught by the conversion tests below instead.
LATENT_RTOL = 1e-3


def final_latents(monkeypatch):
    """Every generation's final latents (B, C, h, w), as handed to the VAE, in call order."""
    from modules import processing

    seen = []
    original = processing.decode_latent_batch

    def recording(model, batch, *args, **kwargs):
        seen.append(batch.detach().float().clone())
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(processing, "decode_latent_batch", recording)
    return seen


def engine_steps(monkeypatch):
    """The composition engine's StepResults, in call order (proves the composition ran)."""
    from lib_loraclr.compose.engine import ComposeEngine

    results = []
    original = ComposeEngine.step

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(ComposeEngine, "step", recording)
    return results


def test_the_stand_ins_offer_these_supported_samplers(webui):
    from lib_loraclr.hosts.webui_denoiser import SUPPORTED_LABELS
    from modules import sd_samplers

    offered = {sampler.name for sampler in sd_samplers.all_samplers}
    assert sorted(offered & set(SUPPORTED_LABELS.split(", "))) == sorted(STAND_IN_SAMPLERS)


@pytest.mark.parametrize("sampler", STAND_IN_SAMPLERS)
def test_zero_weight_concepts_reproduce_the_plain_generation(host, sampler, monkeypatch):
    """Known answer: the plain generation. Weight 0 makes each LoRA hook add exactly 0; without
    triggers every pass's prompt is the plain prompt (a trigger would change the LoRA passes'
    conditioning); without the update the latent is not moved; the fusion weights sum to 1
    over identical passes. What is left is the hosts' sigma/timestep conversions, the k-diffusion
    scaling, the x0/eps conversion back to the sampler and the CFG order and scale."""
    latents = final_latents(monkeypatch)
    steps = engine_steps(monkeypatch)
    plain = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3)
    composed = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3,
                            script_args=compose_args(host, concepts=NO_TRIGGERS_ZERO_WEIGHT, settings=NO_UPDATE))
    assert host.errors() == []
    assert "LoRACLR: " in composed.info and len(steps) == 3, "the composition must have run every step"
    assert all(result.losses == [] for result in steps), "the latent update must be off"
    plain_latent, composed_latent = latents
    scale = plain_latent.abs().max().item()
    assert scale > 1.0
    difference = (composed_latent - plain_latent).abs().max().item()
    assert difference <= LATENT_RTOL * scale, f"{sampler}: max |diff| {difference:.3g} of max |x| {scale:.3g}"
    # the decoded images agree within one grey level (rounding at a .5 boundary)
    assert np.abs(pixels(plain).astype(int) - pixels(composed).astype(int)).max() <= 1


def test_a_whole_image_mask_is_that_lora_alone_as_the_host_applies_it(host, monkeypatch):
    """Known answer: the host's own ``<lora:cat_lora:1>`` generation (its built-in Lora merges
    the LoRA into the UNet and text encoder weights). One concept, no trigger: the LoRA pass
    encodes the plain prompt and negative prompt with the LoRA's text-encoder part active, as
    the host does for both; a tiny mask threshold (alpha = 1e-9: softmax maps are > 0 everywhere)
    makes its mask cover every pixel, so the base pass gets weight 0 and fusion returns the
    LoRA pass exactly. Tolerance as in test 1 (merged W + BA vs hooked Wx + B(Ax) adds its
    own rounding); the LoRA's own effect on the latent is checked to be far larger."""
    latents = final_latents(monkeypatch)
    steps = engine_steps(monkeypatch)
    request = dict(concepts=[{"lora": "cat_lora", "words": "cat"}],
                   settings={**NO_UPDATE, "mask_threshold": 1e-9})
    composed = host.txt2img(PROMPT, "ugly", seed=8, steps=3, script_args=compose_args(host, **request))
    with_lora = host.txt2img(PROMPT + " <lora:cat_lora:1>", "ugly", seed=8, steps=3)
    plain = host.txt2img(PROMPT, "ugly", seed=8, steps=3)
    assert host.errors() == []
    assert len(steps) == 3
    for result in steps:
        base, lora = result.masks  # (P=2, B, 1, h, w)
        assert torch.equal(lora, torch.ones_like(lora)) and torch.equal(base, torch.zeros_like(base))
    composed_latent, lora_latent, plain_latent = latents
    scale = lora_latent.abs().max().item()
    difference = (composed_latent - lora_latent).abs().max().item()
    assert difference <= LATENT_RTOL * scale, f"max |diff| {difference:.3g} of max |x| {scale:.3g}"
    # the LoRA's own effect is far beyond the tolerance (measured 87x to several 100x), so a
    # composition that dropped or doubled it could not pass
    assert (lora_latent - plain_latent).abs().max().item() > 20 * LATENT_RTOL * scale, "the LoRA must matter"


# ---------------------------------------------------------------- conversions on known tensors

def known_sample(t, seed=0, shape=(2, 4, 3, 3)):
    """(x0, eps) with a fixed seed, float64 for the reference formulas."""
    generator = torch.Generator().manual_seed(seed + int(t))
    return (torch.randn(shape, generator=generator, dtype=torch.float64),
            torch.randn(shape, generator=generator, dtype=torch.float64))


def per_row(values, shape=(2, 1, 1, 1)):
    return torch.as_tensor(values, dtype=torch.float64).view(shape)


def close(actual, expected, tol=1e-5):
    actual = actual.double()
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert error <= tol * max(1.0, expected.abs().max().item()), error


def cond_for(batch):
    from lib_loraclr.model import Conditioning

    return Conditioning(torch.zeros(batch, 77, 8))


TIMESTEPS = torch.tensor([999, 321])  # one per row: the conversions must be per row


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_a1111_unet_eps_for_eps_and_v_checkpoints(a1111, monkeypatch, parameterization):
    """z = sqrt(a) x0 + sqrt(1-a) eps; an eps model returns eps, a v model v = sqrt(a) eps - sqrt(1-a) x0;
    unet_eps must give eps for both (eps = sqrt(a) v + sqrt(1-a) z), with apply_model fed z and t as they are."""
    model = our_model()
    sd_model = model.sd_model
    alphas = sd_model.alphas_cumprod.double()[TIMESTEPS].view(-1, 1, 1, 1)
    x0, eps = known_sample(7)
    z = alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps
    v = alphas.sqrt() * eps - (1 - alphas).sqrt() * x0
    calls = []

    def apply_model(x, t, cond):
        calls.append((x, t))
        return (eps if parameterization == "eps" else v).float()

    monkeypatch.setattr(sd_model, "apply_model", apply_model)
    monkeypatch.setattr(sd_model, "parameterization", parameterization, raising=False)
    result = model.unet_eps(z.float(), TIMESTEPS, cond_for(2))
    close(result, eps)
    (x, t), = calls
    close(x, z, 1e-7)
    assert torch.equal(t, TIMESTEPS)


def forge_sigmas(t):
    """sigma_t = sqrt((1 - a_t) / a_t) from Forge's predictor's alphas_cumprod, float64."""
    from modules import shared

    alphas = shared.sd_model.forge_objects.unet.model.predictor.alphas_cumprod.double()[t]
    return ((1 - alphas) / alphas).sqrt()


def test_forge_unet_eps_converts_x0_through_sigma(forge, monkeypatch):
    """Forge's KModel takes the k-diffusion x = x0 + sigma eps and sigma (not t) and returns x0;
    unet_eps gets the UNet input z = x / sqrt(sigma^2 + 1) and t, and must return eps."""
    model = our_model()
    sigma = per_row(forge_sigmas(TIMESTEPS))
    x0, eps = known_sample(8)
    x = x0 + sigma * eps
    z = x / (sigma ** 2 + 1).sqrt()
    calls = []

    def apply_model(x_in, sigma_in, c_crossattn=None, transformer_options=None, **extra):
        calls.append((x_in, sigma_in))
        return x0.float()

    monkeypatch.setattr(model.unet_patcher.model, "apply_model", apply_model)
    result = model.unet_eps(z.float(), TIMESTEPS, cond_for(2))
    close(result, eps, 1e-4)  # (x - x0) / sigma: float32 x at sigma 14.6
    (x_in, sigma_in), = calls
    close(x_in, x)
    close(sigma_in.reshape(-1), sigma.reshape(-1))


def fake_sampler(funcname, inner_model=None):
    return types.SimpleNamespace(funcname=funcname, model_wrap_cfg=types.SimpleNamespace(inner_model=inner_model, step=0))


@pytest.mark.parametrize("host_name", ["a1111", "forge"])
def test_kdiffusion_step_input_unet_and_sampler_output(request, monkeypatch, host_name):
    """k-diffusion: x = x0 + sigma eps. The engine sees z = x / sqrt(sigma^2 + 1); the host's
    model gets x back and sigma (A1111's CompVisDenoiser, Forge's KModel, both -> x0); the
    sampler gets x0 back (prediction and preview)."""
    request.getfixturevalue(host_name)
    from lib_loraclr.hosts.webui_host import current_host

    host = current_host()
    model = host.model()
    sigma = torch.tensor([14.6146, 0.4])
    sigma64 = per_row(sigma.double())
    x0, eps = known_sample(9)
    x = x0 + sigma64 * eps
    calls = []

    def inner_model(x_in, sigma_in, cond=None):
        calls.append((x_in, sigma_in))
        return x0.float()

    denoiser = host.compose_denoiser(fake_sampler("sample_euler", inner_model), model, None, None)
    if host_name == "forge":
        def denoise(x_in, sigma_in, cond):
            calls.append((x_in, sigma_in))
            return x0.float()

        monkeypatch.setattr(model, "denoise", denoise)
    step_input = denoiser.step_input(x.float(), sigma)
    close(step_input.latent, x / (sigma64 ** 2 + 1).sqrt(), 1e-6)
    close(step_input.scale, 1 / (sigma64 ** 2 + 1).sqrt(), 1e-6)
    assert torch.equal(step_input.unet_sigma, sigma)
    repeats = 3  # the engine's pass-major batch: the same rows repeated
    latent_rows = step_input.latent.repeat(repeats, 1, 1, 1)
    image_cond = torch.zeros(2, 5, 1, 1)
    prediction = denoiser.unet(latent_rows, step_input.scale.repeat(repeats, 1, 1, 1), sigma.repeat(repeats),
                               cond_for(2 * repeats), image_cond, repeats)
    close(prediction, x0)
    (x_in, sigma_in), = calls
    close(x_in, x.repeat(repeats, 1, 1, 1), 1e-6)
    assert torch.equal(sigma_in, sigma.repeat(repeats))
    output, preview = denoiser.sampler_output(step_input.latent, step_input, x0.float())
    close(output, x0)
    close(preview, x0)


def test_a1111_ddim_step_input_and_sampler_output(a1111):
    """A1111's DDIM: x is z = sqrt(a) x0 + sqrt(1-a) eps, sigma is the timestep; its
    CompVisTimestepsDenoiser returns eps, which the sampler wants back; the preview is x0."""
    from lib_loraclr.hosts.a1111 import A1111ComposeDenoiser

    model = our_model()
    alphas = per_row(model.sd_model.alphas_cumprod.double()[TIMESTEPS])
    x0, eps = known_sample(10)
    z = alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps
    timesteps = TIMESTEPS.float()
    denoiser = A1111ComposeDenoiser(fake_sampler("ddim"), model, None, None)
    step_input = denoiser.step_input(z.float(), timesteps)
    close(step_input.latent, z, 1e-7)
    assert torch.equal(step_input.scale, torch.ones(2, 1, 1, 1))
    assert torch.equal(step_input.unet_sigma, timesteps)
    output, preview = denoiser.sampler_output(step_input.latent, step_input, eps.float())
    close(output, eps)
    close(preview, x0, 1e-4)  # / sqrt(a) = x14.6 at t=999 on float32 inputs


def test_forge_ddim_step_input_and_sampler_output(forge, monkeypatch):
    """Forge's DDIM ("classic DDIM eps estimation"): x is z = sqrt(a) x0 + sqrt(1-a) eps and sigma
    the timestep; its model runs k-diffusion style on x / sqrt(a) = x0 + sigma_t eps at sigma_t and
    returns x0; the sampler wants eps back."""
    from lib_loraclr.hosts.forge import ForgeComposeDenoiser

    model = our_model()
    sigma = per_row(forge_sigmas(TIMESTEPS))
    alphas = 1 / (sigma ** 2 + 1)
    x0, eps = known_sample(11)
    z = alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps
    timesteps = TIMESTEPS.float()
    denoiser = ForgeComposeDenoiser(fake_sampler("ddim"), model, None, None)
    calls = []

    def denoise(x_in, sigma_in, cond):
        calls.append((x_in, sigma_in))
        return x0.float()

    monkeypatch.setattr(model, "denoise", denoise)
    step_input = denoiser.step_input(z.float(), timesteps)
    close(step_input.latent, z, 1e-7)
    close(step_input.scale, alphas.sqrt(), 1e-6)
    close(step_input.unet_sigma.double().reshape(-1), sigma.reshape(-1), 1e-6)
    prediction = denoiser.unet(step_input.latent, step_input.scale, step_input.unet_sigma, cond_for(2), None, 1)
    close(prediction, x0)
    (x_in, sigma_in), = calls
    close(x_in, x0 + sigma * eps, 1e-6)
    close(sigma_in.double().reshape(-1), sigma.reshape(-1), 1e-6)
    output, preview = denoiser.sampler_output(step_input.latent, step_input, x0.float())
    close(output, eps, 1e-4)
    close(preview, x0)
