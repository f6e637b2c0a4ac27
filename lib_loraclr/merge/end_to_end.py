"""End to end: per concept, how close the merged model's UNet output is to the concept's own LoRA.

The per-layer report measures each layer on the features it was fitted on; it cannot see
errors that compound through the network, nor how the merge does away from its capture. This
figure runs the whole model on concept i's prompt, on fresh latents at timesteps and a
resolution the capture never used, four ways in one batch: no LoRA, concept i's own LoRA, the
merged file, and every concept's LoRA stacked (each text encoder with the same LoRAs).

    kept_i = 1 - |eps_merged - eps_own| / |eps_base - eps_own|   (norms summed over the samples)

1: the merged model predicts what the concept's own LoRA predicts; 0: no closer than the base
model; below 0: further from the concept than the base model is.
"""

from __future__ import annotations

import math
import time

import torch

from ..lora.base import LoraFile
from ..model import Conditioning, ModelAccess
from ..progress import Progress
from ..runtime import LoraRuntime
from ..sampling import initial_noise, trailing_timesteps

CANDIDATE_TIMESTEPS = (837, 519, 213)  # spread over the schedule; moved off the capture's grid
SAMPLES = 1  # fresh latents per timestep: 3 UNet evaluations (a batch of 4) per concept
SEED_OFFSET = 1_000_003  # the latents' seed: the merge seed + this, never the capture's noise


def held_out_timesteps(num_train_timesteps: int, capture_steps: int) -> list[int]:
    """``CANDIDATE_TIMESTEPS``, each moved down until the capture sampler never visits it."""
    grid = set(trailing_timesteps(num_train_timesteps, capture_steps).tolist())
    held_out = []
    for t in CANDIDATE_TIMESTEPS:
        while t in grid:
            t -= 1
        held_out.append(t)
    return held_out


def held_out_size(capture_size: int) -> tuple[int, int]:
    """(height, width): the capture's height, and a width of three quarters of it in steps of 64 px
    (the UNet's stride), or 64 px more where that would be the capture size (small captures)."""
    width = max(64, capture_size * 3 // 4 // 64 * 64)
    return capture_size, width + 64 if width == capture_size else width


def kept(distance_sq: float, reference_sq: float) -> float | None:
    """1 - |merged - own| / |base - own| from the summed squares; None when the LoRA changes nothing."""
    return None if reference_sq <= 0 else 1.0 - math.sqrt(distance_sq / reference_sq)


@torch.no_grad()
def end_to_end(
    model: ModelAccess,
    loras: list[LoraFile],
    weights: list[float],
    prompts: list[str],
    merged: LoraFile,
    names: list[str],
    *,
    capture_size: int,
    capture_steps: int,
    seed: int,
    progress: Progress | None = None,
) -> dict:
    """{"size": [height, width], "timesteps", "samples", "merged": {name: kept}, "stacked": {name: kept}, "seconds"}."""
    progress = progress or Progress()
    started = time.perf_counter()
    n = len(loras)
    height, width = held_out_size(capture_size)
    timesteps = held_out_timesteps(len(model.alphas_cumprod), capture_steps)
    factor = model.vae_scale_factor
    shape = (SAMPLES * len(timesteps), model.latent_channels, height // factor, width // factor)
    latents = initial_noise(shape, seed + SEED_OFFSET).to(model.device, model.dtype)
    steps = torch.tensor(timesteps, device=model.device).repeat(SAMPLES)
    # row sets: base, concept i alone, the merged file (index n), every concept stacked
    stacked = list(range(n))
    figures = {"merged": {}, "stacked": {}}
    with LoraRuntime(model.targets(), [*loras, merged], [*weights, 1.0]) as runtime:
        for i, (name, prompt) in enumerate(zip(names, prompts)):
            progress.update("report", i, n, message=f"end to end: {name} on fresh latents at {width}x{height} px ({i + 1}/{n})")
            row_sets = [[], [i], [n], stacked]
            conds = []
            for row_set in row_sets:
                with runtime.active(row_set):
                    conds.append(model.encode([prompt]))
            cond = Conditioning.cat(conds)  # (4, 77, C): each row encoded with its row's LoRAs
            totals = dict.fromkeys(("base", "merged", "stacked"), 0.0)
            for latent, timestep in zip(latents, steps):
                batch = latent.unsqueeze(0).repeat(4, 1, 1, 1)
                with runtime.rows(row_sets):
                    eps = model.unet_eps(batch, timestep.repeat(4), cond).float()  # (4, C, h, w)
                base, own, merged_eps, stacked_eps = eps
                totals["base"] += float((base - own).square().sum())
                totals["merged"] += float((merged_eps - own).square().sum())
                totals["stacked"] += float((stacked_eps - own).square().sum())
            figures["merged"][name] = kept(totals["merged"], totals["base"])
            figures["stacked"][name] = kept(totals["stacked"], totals["base"])
    progress.update("report", n, n, message="end to end: done")
    return {"size": [height, width], "timesteps": timesteps, "samples": SAMPLES, **figures,
            "seconds": time.perf_counter() - started}
