"""The engine's own sampler, working only through ``ModelAccess.unet_eps`` and ``alphas_cumprod``.

The merge engine samples to capture UNet features (LoRACLR stage 3: 20 DPM-Solver steps, no
CFG) in hosts that have no diffusers (A1111, Forge), so it cannot borrow a host's scheduler.

DPM-Solver++(2M) in the k-diffusion formulation: the VP model is seen as a denoiser on the
variance-exploding latent ``x = x0 + sigma * noise`` with ``sigma_t = sqrt((1 - a_t) / a_t)``;
the UNet gets ``x / sqrt(1 + sigma^2)`` and timestep ``t``, and ``denoised = x - sigma * eps``.
Sigmas are the training sigmas at "trailing" spaced timesteps (``t_i = round(T - i*T/n) - 1``:
999, 949, ..., 49 for 20 steps) then 0; no Karras warping. Trailing spacing starts at the
largest training sigma, so the first step sees pure noise as in training (Lin et al. 2023).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .model import Conditioning, ModelAccess


def trailing_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """(steps,) descending discrete timesteps, the last one ``T/steps - 1``."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    spacing = torch.arange(steps, dtype=torch.float64) * (num_train_timesteps / steps)
    return (torch.round(num_train_timesteps - spacing) - 1).long()


def sigmas_for(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(n + 1,) float64 sigmas of the timesteps, with a final 0."""
    alphas = alphas_cumprod.double()[timesteps]
    return torch.cat([((1 - alphas) / alphas).sqrt(), alphas.new_zeros(1)])


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The unit Gaussian the sampler starts from: CPU generator, so it is the same on any device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _denoiser(model: ModelAccess, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float):
    """x (B, C, h, w) at sigma, timestep -> predicted x0, with classifier-free guidance if uncond."""
    batch_both = uncond is not None and uncond.context.shape == cond.context.shape

    def eps(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if uncond is None:
            return model.unet_eps(model_input, timestep, cond).float()
        if batch_both:
            both = model.unet_eps(
                torch.cat([model_input, model_input]), timestep.repeat(2), Conditioning.cat([uncond, cond])
            ).float()
            eps_uncond, eps_cond = both.chunk(2)
        else:
            eps_uncond = model.unet_eps(model_input, timestep, uncond).float()
            eps_cond = model.unet_eps(model_input, timestep, cond).float()
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def denoise(x: torch.Tensor, sigma: float, timestep: int) -> torch.Tensor:
        model_input = (x / (1.0 + sigma**2) ** 0.5).to(model.dtype)
        timesteps = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        return x - sigma * eps(model_input, timesteps)

    return denoise


SAMPLERS = ("dpmpp_2m", "euler")

# step(i, x, sigma, timestep) -> (x, denoised): the (possibly updated) latent and its predicted x0
Step = Callable[[int, torch.Tensor, float, int], "tuple[torch.Tensor, torch.Tensor]"]


def sample_steps(
    x: torch.Tensor,
    sigmas: Sequence[float],
    timesteps: torch.Tensor,
    step: Step,
    *,
    sampler: str = "dpmpp_2m",
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The one sampler loop: DPM-Solver++(2M) (or Euler) from ``x`` at ``sigmas[0]`` to sigma 0.

    ``step`` may return a changed latent (CLoRA's latent update): the solver continues from it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    steps = len(timesteps)
    previous_denoised = None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = step(i, x, sigma, int(timesteps[i]))
        ratio = sigma_next / sigma  # exp(-h), h = log(sigma / sigma_next)
        if sampler == "euler" or previous_denoised is None or sigma_next == 0:
            estimate = denoised
        else:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)  # h_last / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous_denoised
        x = ratio * x + (1 - ratio) * estimate
        previous_denoised = denoised
        if callback is not None:
            callback(i, steps)
    return x


@torch.no_grad()
def sample(
    model: ModelAccess,
    cond: Conditioning,
    *,
    steps: int = 20,
    height: int = 512,
    width: int = 512,
    seed: int | Sequence[int] = 0,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    callback: Callable[[int, int], None] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one latent per row of ``cond``; returns x0 (B, C, height/8, width/8) in float32.

    The result is in the UNet's latent space (divide by the VAE scaling factor to decode, as
    ``decode_latents`` does). No guidance when ``uncond`` is None. ``callback(i, steps)`` runs
    after step i (0-based). ``seed``: one for the whole batch's noise, or one per row, so that a
    row's image depends only on its prompt and seed, never on the rest of the batch. ``noise``:
    the starting unit Gaussian itself (B, C, h, w), instead of a seed (rows of a larger batch's).
    """
    batch = cond.context.shape[0]
    factor = model.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    alphas_cumprod = model.alphas_cumprod
    timesteps = trailing_timesteps(len(alphas_cumprod), steps)
    sigmas = sigmas_for(alphas_cumprod, timesteps).tolist()
    denoise = _denoiser(model, cond, uncond, guidance_scale)

    shape = (batch, model.latent_channels, height // factor, width // factor)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for a {shape} batch")
    elif isinstance(seed, int):
        noise = initial_noise(shape, seed)
    elif len(seed) == batch:
        noise = torch.cat([initial_noise((1, *shape[1:]), int(row_seed)) for row_seed in seed])
    else:
        raise ValueError(f"got {len(seed)} seeds for {batch} rows")
    # std of x0 + sigma_max * noise for unit-variance latents
    x = noise.to(model.device) * (1.0 + sigmas[0] ** 2) ** 0.5
    return sample_steps(x, sigmas, timesteps, lambda _i, x, sigma, timestep: (x, denoise(x, sigma, timestep)),
                        callback=callback)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> list:
    """(B, 4, h, w) sampler latents -> B PIL images, through a diffusers ``AutoencoderKL``."""
    from diffusers.image_processor import VaeImageProcessor

    scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    images = vae.decode(scaled).sample  # (B, 3, H, W) in [-1, 1]
    return VaeImageProcessor(do_normalize=True).postprocess(images.float(), output_type="pil")
