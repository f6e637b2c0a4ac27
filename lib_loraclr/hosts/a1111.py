"""AUTOMATIC1111 1.10: its loaded ldm (SD1) / sgm (SDXL) model behind ``ModelAccess``.

Names: A1111 runs the original UNet (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``), so
its module paths are mapped to the canonical diffusers paths with ``keys.ldm_to_diffusers_unet``.
The SD1 text encoder and SDXL's first one are transformers ``CLIPTextModel``s with the
``text_model.`` paths canonical names already use. SDXL's second one is OpenCLIP
(``openclip.py``): its packed q/k/v and its MLP are presented as separate layers.

Nothing here imports diffusers or any ``modules.*`` at import time: this file is loaded inside
the WebUI, and its tests run with stand-ins.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from ..model import Conditioning
from .openclip import open_clip_targets
from .webui_denoiser import ComposeDenoiser, StepInput, kdiffusion_scale
from .webui_host import WebUIHost
from .webui_model import WebUIModel

class A1111Model(WebUIModel):
    """``shared.sd_model`` of A1111 (SD1 / SDXL).

    ``unet_eps`` is ``apply_model``, converted to noise for v-prediction checkpoints.
    """

    def __init__(self, sd_model):
        if getattr(sd_model, "is_sdxl", False):
            self.arch = "sdxl"
            embedders = sd_model.conditioner.embedders
            self.text_encoders = {"text_encoder": embedders[0].wrapped.transformer}
            self._open_clip = {"text_encoder_2": embedders[1].wrapped.model}
            self._tokenizer = embedders[0].wrapped.tokenizer
        elif getattr(sd_model, "is_sd2", False):
            raise ValueError("SD2 checkpoints are not supported by LoRACLR in AUTOMATIC1111; load an SD1.x or SDXL model")
        else:
            self.arch = "sd1"
            self.text_encoders = {"text_encoder": sd_model.cond_stage_model.wrapped.transformer}
            self._open_clip = {}
            self._tokenizer = sd_model.cond_stage_model.wrapped.tokenizer
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.latent_channels = getattr(sd_model, "latent_channels", 4)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.sd_model.alphas_cumprod.detach().float().cpu()

    def extra_targets(self) -> dict[str, nn.Module]:
        found = {}
        for component, model in self._open_clip.items():
            found.update(open_clip_targets(model, component))
        return found

    def condition_dict(self, cond: Conditioning, image_cond: torch.Tensor | None = None) -> dict:
        """The ``cond`` argument of ``apply_model`` / the k-diffusion wrappers, as CFGDenoiser builds it."""
        if self.arch == "sdxl":
            result = {"crossattn": cond.context, "vector": cond.pooled}
        else:
            result = {"c_crossattn": [cond.context]}
        if image_cond is not None:
            result["c_concat"] = [image_cond]
        return result

    def unet_eps(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = latent.shape[0]
        timestep = torch.as_tensor(timestep, device=latent.device).reshape(-1).expand(batch)
        prediction = self.sd_model.apply_model(latent, timestep, self.condition_dict(cond))
        if getattr(self.sd_model, "parameterization", "eps") != "v":
            return prediction
        alphas = self.sd_model.alphas_cumprod.to(latent.device)[timestep.long()].view(-1, 1, 1, 1)
        return (alphas.sqrt() * prediction + (1 - alphas).sqrt() * latent).to(prediction.dtype)


def unmerge_builtin_loras(root: nn.Module) -> int:
    """Give every layer of ``root`` its checkpoint weights back from the built-in Lora's backups.

    Why: A1111's built-in Lora merges the last generation's LoRAs into the weights in place and
    keeps them there; a merge must read the checkpoint's own weights. Emptying its list of
    loaded networks makes its next forward restore the backups anyway; restoring here makes
    it certain before we read anything. The next generation re-applies its LoRAs as usual.
    Returns how many layers were restored. Call with the host's queue lock held.
    """
    networks = sys.modules.get("networks")
    if networks is None:
        return 0
    networks.loaded_networks.clear()
    restored = 0
    for module in root.modules():
        if getattr(module, "network_current_names", ()):
            networks.network_restore_weights_from_backup(module)
            module.network_current_names = ()
            restored += 1
    return restored


class A1111ComposeDenoiser(ComposeDenoiser):
    """A1111's samplers: k-diffusion ones get x0 from ``inner_model`` (CompVisDenoiser), DDIM gets noise."""

    def __init__(self, sampler, model: A1111Model, session, engine):
        super().__init__(sampler, session, engine)
        self.model = model

    def step_input(self, x, sigma):
        scale = kdiffusion_scale(sigma, x.dtype) if self.kdiffusion else torch.ones_like(x[:, :1, :1, :1])
        return StepInput(x * scale, scale, sigma)

    def unet(self, latent_rows, scale_rows, sigma_rows, cond_rows, image_cond, repeats):
        image_rows = image_cond.repeat(repeats, *[1] * (image_cond.dim() - 1))
        return self.denoiser.inner_model(
            latent_rows / scale_rows, sigma_rows, cond=self.model.condition_dict(cond_rows, image_rows)
        )

    def sampler_output(self, latent, step_input, prediction):
        if self.kdiffusion:
            return prediction, prediction
        alphas = self.model.sd_model.alphas_cumprod.to(latent.device)[step_input.unet_sigma.long()].view(-1, 1, 1, 1)
        return prediction, (latent - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


class A1111Host(WebUIHost):
    """AUTOMATIC1111 1.10: ``shared.sd_model``, the built-in Lora's list and the queue lock."""

    name = "AUTOMATIC1111"
    model_class = A1111Model
    compose_denoiser = A1111ComposeDenoiser

    @contextlib.contextmanager
    def base_model(self):
        model = self.model()
        unmerge_builtin_loras(model.sd_model)
        yield model
