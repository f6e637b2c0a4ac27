"""Forge 2.0 (backend rewrite): its loaded model behind ``ModelAccess`` and the WebUI host.

Forge keeps the model in ``sd_model.forge_objects``: a UNet patcher whose ``model`` is a
``KModel`` (``apply_model(x, sigma, c_crossattn=..., y=...)`` -> x0, k-diffusion convention)
around an ldm-named UNet, and a CLIP patcher whose text encoders are transformers models
(``clip_l``, ``clip_g`` for SDXL) under ``.transformer``. Everything is loaded under
``torch.inference_mode()``, so CLoRA's latent gradient runs inside ``GradThroughFrozen``.

Forge's own LoRAs are patches merged into the weights by ``LoraLoader.refresh``; a merge
takes them out (``refresh`` with no patches) and puts them back afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from ..frozen_grad import GradThroughFrozen
from ..model import Conditioning
from .webui_denoiser import ComposeDenoiser, StepInput, kdiffusion_scale
from .webui_host import WebUIHost
from .webui_model import WebUIModel

_TEXT_ENCODERS = (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))


class ForgeModel(WebUIModel):
    """``sd_model`` of Forge (SD1 / SD2 / SDXL; Flux and SD3 are refused)."""

    def __init__(self, sd_model):
        if getattr(sd_model, "is_sdxl", False):
            self.arch = "sdxl"
        elif getattr(sd_model, "is_sd2", False):
            self.arch = "sd2"
        elif getattr(sd_model, "is_sd1", False):
            self.arch = "sd1"
        else:
            raise ValueError(f"LoRACLR supports SD1, SD2 and SDXL checkpoints; the loaded model is a {type(sd_model).__name__}")
        self.sd_model = sd_model
        objects = sd_model.forge_objects
        self.unet_patcher = objects.unet
        self.unet = objects.unet.model.diffusion_model
        clip = objects.clip
        self.clip_patcher = clip.patcher
        self.text_encoders = {
            component: getattr(clip.cond_stage_model, name).transformer
            for name, component in _TEXT_ENCODERS
            if getattr(clip.cond_stage_model, name, None) is not None
        }
        tokenizers = clip.tokenizer
        self._tokenizer = getattr(tokenizers, "clip_l", None) or getattr(tokenizers, "clip_h", None)
        if "text_encoder" not in self.text_encoders and getattr(clip.cond_stage_model, "clip_h", None) is not None:
            self.text_encoders["text_encoder"] = clip.cond_stage_model.clip_h.transformer
        self.latent_channels = 4

    @property
    def dtype(self) -> torch.dtype:
        return self.unet_patcher.model.computation_dtype

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.unet_patcher.model.predictor.alphas_cumprod.detach().float().cpu()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 from the k-diffusion latent ``x`` (noise scale ``sigma``), Forge's own way."""
        extra = {"y": cond.pooled} if cond.pooled is not None else {}
        return self.unet_patcher.model.apply_model(x, sigma, c_crossattn=cond.context, transformer_options={}, **extra)

    def unet_eps(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = latent.shape[0]
        timestep = torch.as_tensor(timestep, device=latent.device).reshape(-1).expand(batch)
        sigma = self.unet_patcher.model.predictor.sigma(timestep).to(latent.device).float()
        x = latent / kdiffusion_scale(sigma, latent.dtype)
        x0 = self.denoise(x, sigma, cond)
        return ((x - x0) / sigma.view(-1, 1, 1, 1)).to(latent.dtype)

    def load_to_device(self) -> None:
        """Forge moves models to the GPU on demand; a merge runs outside its sampler."""
        from backend import memory_management

        memory_management.load_models_gpu([self.unet_patcher, self.clip_patcher])


class ForgeComposeDenoiser(ComposeDenoiser):
    """Forge's samplers: all run k-diffusion style through ``KModel.apply_model`` (x0); DDIM
    ("classic DDIM eps estimation") passes timesteps and wants noise back."""

    def __init__(self, sampler, model: ForgeModel, session, engine):
        super().__init__(sampler, session, engine)
        self.model = model

    def step_input(self, x, sigma):
        if self.kdiffusion:
            scale = kdiffusion_scale(sigma, x.dtype)
            return StepInput(x * scale, scale, sigma)
        alphas = self.model.unet_patcher.model.predictor.alphas_cumprod.to(x.device)
        real_sigma = ((1 - alphas) / alphas)[sigma.round().long()] ** 0.5
        return StepInput(x, kdiffusion_scale(real_sigma, x.dtype), real_sigma)

    def unet(self, latent_rows, scale_rows, sigma_rows, cond_rows, image_cond, repeats):
        return self.model.denoise(latent_rows / scale_rows, sigma_rows, cond_rows)

    def sampler_output(self, latent, step_input, prediction):
        if self.kdiffusion:
            return prediction, prediction
        x = latent / step_input.scale
        return (x - prediction) / step_input.unet_sigma.view(-1, 1, 1, 1), prediction


class ForgeHost(WebUIHost):
    """Forge 2.0: ``shared.sd_model.forge_objects``; LoRA list and queue lock as A1111's."""

    name = "Forge"
    model_class = ForgeModel
    compose_denoiser = ForgeComposeDenoiser
    grad_context = GradThroughFrozen

    def model(self) -> ForgeModel:
        """Forge loads the selected checkpoint lazily (``shared.sd_model`` is a ``FakeInitialModel``
        until the first generation): load it as a generation does, then wrap it."""
        from modules import sd_models

        sd_models.forge_model_reload()
        return super().model()

    @contextlib.contextmanager
    def base_model(self):
        model = self.model()
        model.load_to_device()
        patchers = (model.unet_patcher, model.clip_patcher)  # each patcher's lora_loader is its module's own
        for patcher in patchers:
            patcher.lora_loader.refresh(lora_patches={}, offload_device=patcher.offload_device)
        try:
            yield model
        finally:
            for patcher in patchers:
                patcher.refresh_loras()
