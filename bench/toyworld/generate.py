"""Sampling shared by the training scripts' evaluations and the benchmark: the library's
DPM-Solver++(2M) (``lib_loraclr.sampling.sample``) with classifier-free guidance against the
empty prompt and one seed per row, so an image depends only on its prompt and seed."""

from __future__ import annotations

import numpy as np

from lib_loraclr.sampling import sample

from .model import latents_to_images
from .world import SIZE

STEPS = 20
GUIDANCE = 4.0


def generate(model, prompts: list[str], seeds: list[int], *, steps: int = STEPS, guidance: float = GUIDANCE,
             size: int = SIZE, batch: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8 images of ``prompts[i]`` from ``seeds[i]``."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        latents = sample(model, model.encode(chunk), uncond=model.encode([""] * len(chunk)), guidance_scale=guidance,
                         steps=steps, height=size, width=size, seed=list(seeds[start:start + batch]))
        out.append(latents_to_images(latents))
    return np.concatenate(out)
