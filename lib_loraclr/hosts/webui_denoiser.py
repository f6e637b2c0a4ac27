"""CLoRA inside a WebUI sampler: the part A1111 and Forge share.

Both hosts' samplers call their CFG denoiser as ``model_wrap_cfg(x, sigma, uncond, cond,
cond_scale, s_min_uncond, image_cond)`` once per model evaluation, with the latent they
carry. ``ComposeDenoiser`` takes that call's place for one sampling run: it runs the
engine's step, writes the updated latent back into ``x`` in place (so the sampler continues
from it), and returns the fused, guided prediction in the sampler's own terms. Hosts say how
x maps to the UNet input, how to run one UNet pass and what the sampler expects back.

The engine sees the UNet input ``z`` (``x / sqrt(sigma^2 + 1)`` for k-diffusion samplers), as
CLoRA's reference updates diffusers' latents. The LoRA hooks are on only during each call.
The hosts' prompt conditioning (``cond``, ``uncond``) is replaced by the session's per-pass
conditioning; other extensions' CFG callbacks are not called for composed steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..compose.engine import NonFiniteError

# Sampler functions that evaluate the model once per step on the latent they carry forward:
# there a latent update written into the sampler's ``x`` is the update CLoRA makes. Second-
# order and adaptive samplers evaluate at temporary points, where an update would be lost.
ONE_EVALUATION_PER_STEP = frozenset({
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "ddim",
})
SUPPORTED_LABELS = "Euler, Euler a, LMS, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M SDE, DDIM"


def sampler_function_name(sampler) -> str:
    funcname = getattr(sampler, "funcname", None)
    return funcname if isinstance(funcname, str) else getattr(funcname, "__name__", "")


@dataclass
class StepInput:
    """z: (B, C, h, w) UNet input; scale: (B, 1, 1, 1) z = x * scale; unet_sigma: what the host's UNet call takes."""

    latent: torch.Tensor
    scale: torch.Tensor
    unet_sigma: torch.Tensor


class ComposeDenoiser(ABC):
    """Replace ``sampler.model_wrap_cfg``'s forward with CLoRA for one sampling run."""

    def __init__(self, sampler, session, engine):
        funcname = sampler_function_name(sampler)
        if funcname not in ONE_EVALUATION_PER_STEP:
            label = getattr(getattr(sampler, "config", None), "name", funcname)
            raise ValueError(
                f"the sampler {label!r} is not supported: it needs one model "
                f"evaluation per step ({SUPPORTED_LABELS})"
            )
        self.sampler = sampler
        self.denoiser = sampler.model_wrap_cfg
        self.kdiffusion = funcname.startswith("sample_")
        self.session = session
        self.engine = engine

    def install(self) -> None:
        self.denoiser.forward = self.forward

    def remove(self) -> None:
        self.denoiser.__dict__.pop("forward", None)

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from modules import sd_samplers_common, shared

        if shared.state.interrupted or shared.state.skipped:
            raise sd_samplers_common.InterruptedException
        batch = x.shape[0]
        step_input = self.step_input(x, sigma)

        def run_unet(latent_rows, _timestep, cond_rows):
            repeats = latent_rows.shape[0] // batch
            return self.unet(
                latent_rows, step_input.scale.repeat(repeats, 1, 1, 1), step_input.unet_sigma.repeat(repeats),
                cond_rows, image_cond, repeats,
            )

        with self.session.runtime.attached():
            try:
                result = self.engine.step(self.denoiser.step, step_input.latent, step_input.unet_sigma,
                                          self.session.conditioning, run_unet)
            except NonFiniteError as error:
                raise RuntimeError(f"LoRACLR composition: {error}") from error
        updated = result.latent.to(x.dtype)
        x.copy_(updated / step_input.scale if self.kdiffusion else updated)
        prediction = result.prediction.to(x.dtype)
        self.session.last_masks = result.masks.detach().cpu()
        output, x0 = self.sampler_output(updated, step_input, prediction)
        self.sampler.last_latent = x0
        sd_samplers_common.store_latent(x0)
        self.denoiser.step += 1
        return output

    @abstractmethod
    def step_input(self, x: torch.Tensor, sigma: torch.Tensor) -> StepInput:
        """The sampler's x and sigma (or DDIM timestep) -> the UNet input and its scale."""

    @abstractmethod
    def unet(self, latent_rows, scale_rows, sigma_rows, cond_rows, image_cond, repeats) -> torch.Tensor:
        """One UNet pass over ``repeats`` copies of the batch -> the host's prediction."""

    @abstractmethod
    def sampler_output(self, latent, step_input: StepInput, prediction) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the sampler expects back, the predicted x0 for previews and interrupts)."""


class FailingDenoiser:
    """Stops a generation at its first step with ``error``: how a script hook's failure reaches
    the user, since the WebUIs swallow exceptions raised in the hooks themselves."""

    def __init__(self, sampler, error: Exception):
        self.denoiser = sampler.model_wrap_cfg
        self.error = error
        self.denoiser.forward = self.forward

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"LoRACLR composition: {self.error}") from self.error

    def remove(self) -> None:
        self.denoiser.__dict__.pop("forward", None)


def kdiffusion_scale(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, 1) 1 / sqrt(sigma^2 + 1): k-diffusion's x -> UNet input factor."""
    return ((sigma.float() ** 2 + 1) ** -0.5).view(-1, 1, 1, 1).to(dtype)
