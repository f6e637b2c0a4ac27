"""Sampling helpers shared by the training scripts' evaluations and the benchmark.

``generate`` is the library's DPM-Solver++(2M) sampler (``lib_loraclr.sampling``: trailing
timesteps, k-diffusion formulation) with one seed per row, so an image depends only on its
prompt and seed, never on what else is in the batch. (The library's ``sample`` draws one
noise tensor for the whole batch from one seed; a ``noise=`` argument there would let this
module call it directly.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lib_loraclr.model import Conditioning
from lib_loraclr.sampling import initial_noise, sigmas_for, trailing_timesteps

from .model import latents_to_images
from .world import SIZE

STEPS = 20
GUIDANCE = 4.0


@torch.no_grad()
def generate(model, prompts: list[str], seeds: list[int], *, steps: int = STEPS, guidance: float = GUIDANCE,
             size: int = SIZE, batch: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8 images of ``prompts[i]`` from ``seeds[i]`` (CFG with the empty prompt)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk, chunk_seeds = prompts[start:start + batch], seeds[start:start + batch]
        cond = model.encode(list(chunk))
        uncond = model.encode([""] * len(chunk))
        both = Conditioning.cat([uncond, cond])
        timesteps = trailing_timesteps(len(model.alphas_cumprod), steps)
        sigmas = sigmas_for(model.alphas_cumprod, timesteps).tolist()
        shape = (1, model.latent_channels, size // model.vae_scale_factor, size // model.vae_scale_factor)
        x = torch.cat([initial_noise(shape, int(s)) for s in chunk_seeds]).to(model.device)
        x = x * (1.0 + sigmas[0] ** 2) ** 0.5
        previous = None
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            model_input = (x / (1.0 + sigma**2) ** 0.5).to(model.dtype)
            t = torch.full((2 * len(chunk),), int(timesteps[i]), dtype=torch.long, device=x.device)
            eps_uncond, eps_cond = model.unet_eps(torch.cat([model_input, model_input]), t, both).float().chunk(2)
            denoised = x - sigma * (eps_uncond + guidance * (eps_cond - eps_uncond))
            ratio = sigma_next / sigma
            if previous is None or sigma_next == 0:
                estimate = denoised
            else:
                r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = ratio * x + (1 - ratio) * estimate
            previous = denoised
        out.append(latents_to_images(x))
    return np.concatenate(out)
