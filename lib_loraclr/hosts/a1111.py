"""AUTOMATIC1111 1.10: its loaded ldm (SD1) / sgm (SDXL) model behind ``ModelAccess``.

Names: A1111 runs the original UNet (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``), so
its module paths are mapped to the canonical diffusers paths with ``keys.ldm_to_diffusers_unet``.
The SD1 text encoder and SDXL's first one are transformers ``CLIPTextModel``s with the
``text_model.`` paths canonical names already use. SDXL's second one is OpenCLIP: its
``mlp.c_fc``/``mlp.c_proj``/``attn.out_proj`` map to ``fc1``/``fc2``/``out_proj``; its q/k/v
projections are packed into ``nn.MultiheadAttention.in_proj_weight`` and cannot be hooked
as separate layers, so LoRA layers there are reported as unsupported.

Nothing here imports diffusers or any ``modules.*`` at import time: this file is loaded inside
the WebUI, and its tests run with stand-ins.
"""

from __future__ import annotations

import contextlib
import re
import sys

import torch
from torch import nn

from ..lora.keys import ldm_to_diffusers_unet
from ..model import Conditioning, ModelAccess
from ..webui.host import WebUIHost, scan_lora_folder

_OPEN_CLIP_LAYERS = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_OPEN_CLIP_PATH = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
PACKED_QKV_NOTE = "SDXL text_encoder_2 q/k/v layers are packed in OpenCLIP's MultiheadAttention in A1111"


def _open_clip_targets(model: nn.Module, component: str) -> dict[str, nn.Module]:
    found = {}
    for path, module in model.named_modules():
        match = _OPEN_CLIP_PATH.fullmatch(path)
        if match and match.group(2) in _OPEN_CLIP_LAYERS and isinstance(module, nn.Linear):
            layer = _OPEN_CLIP_LAYERS[match.group(2)]
            found[f"{component}.text_model.encoder.layers.{match.group(1)}.{layer}"] = module
    return found


def _hf_clip_targets(transformer: nn.Module, component: str) -> dict[str, nn.Module]:
    return {
        f"{component}.{path}": module
        for path, module in transformer.named_modules()
        if path.startswith("text_model.") and isinstance(module, (nn.Linear, nn.Conv2d))
    }


class A1111Model(ModelAccess):
    """``shared.sd_model`` of A1111 (SD1 / SDXL).

    ``encode`` is the host's own ``get_learned_conditioning`` (emphasis, clip skip and
    embeddings as in a generation); ``unet_eps`` is ``apply_model``, converted to noise for
    v-prediction checkpoints.
    """

    def __init__(self, sd_model):
        if getattr(sd_model, "is_sdxl", False):
            self.arch = "sdxl"
            embedders = sd_model.conditioner.embedders
            self._text_encoders = {"text_encoder": embedders[0].wrapped.transformer}
            self._open_clip = {"text_encoder_2": embedders[1].wrapped.model}
            self._tokenizer = embedders[0].wrapped.tokenizer
        elif getattr(sd_model, "is_sd2", False):
            raise ValueError("SD2 checkpoints are not supported by LoRACLR in AUTOMATIC1111; load an SD1.x or SDXL model")
        else:
            self.arch = "sd1"
            self._text_encoders = {"text_encoder": sd_model.cond_stage_model.wrapped.transformer}
            self._open_clip = {}
            self._tokenizer = sd_model.cond_stage_model.wrapped.tokenizer
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.latent_channels = getattr(sd_model, "latent_channels", 4)
        self._targets: dict[str, nn.Module] | None = None
        self.image_size: tuple[int, int] | None = None  # (height, width) a generation asks for

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.sd_model.alphas_cumprod.detach().float().cpu()

    def targets(self) -> dict[str, nn.Module]:
        if self._targets is None:
            found = {
                f"unet.{ldm_to_diffusers_unet(path)}": module
                for path, module in self.unet.named_modules()
                if isinstance(module, (nn.Linear, nn.Conv2d))
            }
            for component, transformer in self._text_encoders.items():
                found.update(_hf_clip_targets(transformer, component))
            for component, model in self._open_clip.items():
                found.update(_open_clip_targets(model, component))
            self._targets = found
        return self._targets

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    def encode(self, prompts: list[str]) -> Conditioning:
        batch = list(prompts)
        if self.arch == "sdxl" and self.image_size is not None:
            from modules.prompt_parser import SdConditioning

            height, width = self.image_size
            batch = SdConditioning(batch, width=width, height=height)  # SDXL's size conditioning
        cond = self.sd_model.get_learned_conditioning(batch)
        if isinstance(cond, dict):
            return Conditioning(cond["crossattn"], cond["vector"])
        return Conditioning(cond)

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


# Sampler functions that evaluate the model once per step on the latent they carry forward:
# there a latent update written into the sampler's ``x`` is the update CLoRA makes. Second-
# order and adaptive samplers evaluate at temporary points, where an update would be lost.
ONE_EVALUATION_PER_STEP = frozenset({
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "ddim",
})


class ComposeDenoiser:
    """CLoRA in place of one A1111 sampler's CFG denoiser, for one sampling run.

    The sampler calls ``model_wrap_cfg(x, sigma, uncond, cond, cond_scale, s_min_uncond,
    image_cond)`` once per step with the latent it carries; this replaces that call with the
    engine's step: the latent update is written back into ``x`` in place (so the sampler
    continues from the updated latent), and the fused, guided prediction is returned in the
    sampler's own terms (x0 for k-diffusion, noise for DDIM). The engine sees the UNet input
    ``z = x / sqrt(sigma^2 + 1)`` for k-diffusion, as CLoRA's reference updates diffusers' z.
    The LoRA hooks are on only during each call. A1111's prompt conditioning (``cond``,
    ``uncond``) is replaced by the session's per-pass conditioning.
    """

    def __init__(self, sampler, model: A1111Model, session, engine):
        funcname = getattr(sampler, "funcname", None)
        funcname = funcname if isinstance(funcname, str) else getattr(funcname, "__name__", "")
        if funcname not in ONE_EVALUATION_PER_STEP:
            label = getattr(getattr(sampler, "config", None), "name", funcname)
            raise ValueError(
                f"LoRACLR composition does not support the sampler {label!r}: it needs one model "
                "evaluation per step (Euler, Euler a, LMS, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M SDE, DDIM)"
            )
        self.sampler = sampler
        self.denoiser = sampler.model_wrap_cfg
        self.kdiffusion = funcname.startswith("sample_")  # k-diffusion: x0 out; DDIM: noise out
        self.model = model
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
        scale = ((sigma.float() ** 2 + 1) ** -0.5).view(-1, 1, 1, 1) if self.kdiffusion else torch.ones_like(sigma).view(-1, 1, 1, 1)
        scale = scale.to(x.dtype)

        def run_unet(latent_rows, timestep, cond_rows):
            repeats = latent_rows.shape[0] // batch
            return self.denoiser.inner_model(
                latent_rows / scale.repeat(repeats, 1, 1, 1),
                sigma.repeat(repeats),
                cond=self.model.condition_dict(cond_rows, image_cond.repeat(repeats, *[1] * (image_cond.dim() - 1))),
            )

        with self.session.runtime.attached():
            result = self.engine.step(self.denoiser.step, x * scale, sigma, self.session.conditioning, run_unet)
        x.copy_((result.latent / scale).to(x.dtype))
        prediction = result.prediction.to(x.dtype)
        self.session.last_masks = result.masks.detach().cpu()
        self.sampler.last_latent = prediction if self.kdiffusion else self._x0_from_eps(x, sigma, prediction)
        sd_samplers_common.store_latent(self.sampler.last_latent)
        self.denoiser.step += 1
        return prediction

    def _x0_from_eps(self, latent, timestep, eps):
        alphas = self.model.sd_model.alphas_cumprod.to(latent.device)[timestep.long()].view(-1, 1, 1, 1)
        return (latent - (1 - alphas).sqrt() * eps) / alphas.sqrt()


class A1111Host(WebUIHost):
    """AUTOMATIC1111 1.10: ``shared.sd_model``, the built-in Lora's list and the queue lock."""

    name = "AUTOMATIC1111"

    def model(self) -> A1111Model:
        from modules import shared

        if shared.sd_model is None:
            raise RuntimeError("no checkpoint is loaded; load one in the WebUI first")
        return A1111Model(shared.sd_model)

    def lora_dir(self) -> str:
        return self.command_option("lora_dir")

    def lora_files(self) -> dict[str, str]:
        networks = sys.modules.get("networks")
        if networks is not None and networks.available_networks:
            return {name: entry.filename for name, entry in sorted(networks.available_networks.items())}
        return scan_lora_folder(self.lora_dir())

    def refresh_host_loras(self) -> None:
        networks = sys.modules.get("networks")
        if networks is not None:
            networks.list_available_networks()

    @property
    def queue_lock(self):
        from modules.call_queue import queue_lock

        return queue_lock

    @contextlib.contextmanager
    def base_weights(self):
        from modules import shared

        unmerge_builtin_loras(shared.sd_model)
        yield

    def install_compose(self, p, session) -> ComposeDenoiser:
        """Run ``session`` in place of p's current sampler's CFG denoiser; returns it (``remove()``).

        The hires pass (a second sampling with a new sampler) fuses the passes but does not
        update the latent: CLoRA's updates belong to the first, layout-forming steps.
        """
        hires = bool(getattr(p, "is_hr_pass", False))
        steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else p.steps
        engine = session.engine(steps, p.cfg_scale, latent_updates=not hires)
        denoiser = ComposeDenoiser(p.sampler, session.model, session, engine)
        denoiser.install()
        return denoiser
