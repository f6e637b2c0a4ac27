"""The standalone host: a diffusers SD1 / SD2 / SDXL model behind ``ModelAccess``.

Used by the CLI, the demo and the tests. Never touches the Hugging Face hub: everything is
read from local files (``local_files_only=True`` and hub offline mode while loading).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from ..model import Conditioning, ModelAccess
from ..runtime import is_adaptable
from ..weights import PICKLE_SUFFIXES, load_pickled_tensors

# The text-transformer children of a CLIP text model. transformers 4 nests them under
# ``text_model``; transformers >= 5.6 ``CLIPTextModel`` holds them directly. Canonical target
# names always use the transformers-4 form.
_CLIP_TRANSFORMER_CHILDREN = ("embeddings", "encoder", "final_layer_norm")

# Which diffusers default repository holds the configs of each architecture (only ever looked
# up in the local cache).
_DEFAULT_CONFIG_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
_CONFIG_FILES = ("model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*")



def _canonical_text_path(module_path: str, has_text_model_child: bool) -> str:
    """transformers module path of a CLIP text encoder -> transformers-4 path."""
    if has_text_model_child or module_path.split(".", 1)[0] not in _CLIP_TRANSFORMER_CHILDREN:
        return module_path
    return "text_model." + module_path


class DiffusersModel(ModelAccess):
    """A diffusers UNet + transformers CLIP text encoder(s) + tokenizer(s).

    ``unet_eps`` always returns noise: v-prediction models (scheduler ``prediction_type``,
    e.g. SD2-768) are converted with the schedule.

    SDXL time ids: ``encode(prompts, size=(h, w))`` stores ``(h, w, 0, 0, h, w)`` (original
    size, crop top-left, target size) in ``cond.extra["time_ids"]``; without ``size``,
    ``unet_eps`` uses the image size of the latent it is given, which is what diffusers'
    SDXL pipeline does with default arguments.
    """

    def __init__(
        self,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        *,
        text_encoder_2=None,
        tokenizer_2=None,
        vae=None,
    ):
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self._tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae = vae
        if text_encoder_2 is not None:
            if tokenizer_2 is None:
                raise ValueError("an SDXL model needs tokenizer_2 with text_encoder_2")
            self.arch = "sdxl"
        elif unet.config.cross_attention_dim == 1024:
            self.arch = "sd2"
        else:
            self.arch = "sd1"
        self.latent_channels = unet.config.in_channels
        if vae is not None:
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported UNet prediction type {self.prediction_type!r} (epsilon or v_prediction)")

    @classmethod
    def from_pipeline(cls, pipeline) -> "DiffusersModel":
        return cls(
            pipeline.unet,
            pipeline.text_encoder,
            pipeline.tokenizer,
            pipeline.scheduler,
            text_encoder_2=getattr(pipeline, "text_encoder_2", None),
            tokenizer_2=getattr(pipeline, "tokenizer_2", None),
            vae=pipeline.vae,
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def text_encoders(self) -> dict[str, nn.Module]:
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders

    def targets(self) -> dict[str, nn.Module]:
        found = {
            f"unet.{path}": module
            for path, module in self.unet.named_modules()
            if is_adaptable(module)
        }
        for component, encoder in self.text_encoders().items():
            has_text_model_child = hasattr(encoder, "text_model")
            for path, module in encoder.named_modules():
                if is_adaptable(module):
                    found[f"{component}.{_canonical_text_path(path, has_text_model_child)}"] = module
        return found

    @staticmethod
    def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._token_ids(self._tokenizer, prompts)

    def encode(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """SD1/SD2: the last hidden state (after the final layer norm), as diffusers does.

        SDXL: both encoders' penultimate hidden states concatenated on the channel axis
        (B, 77, C1 + C2); pooled = text_encoder_2's projected text embedding (B, P).
        """
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        if self.arch != "sdxl":
            return Conditioning(self.text_encoder(ids).last_hidden_state)
        ids_2 = self._token_ids(self.tokenizer_2, prompts).to(self.text_encoder_2.device)
        hidden_1 = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (B, 77, C1)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([hidden_1, out_2.hidden_states[-2].to(hidden_1.device)], dim=-1)
        extra = {}
        if size is not None:
            height, width = size
            extra["time_ids"] = torch.tensor([height, width, 0, 0, height, width], dtype=context.dtype)
        return Conditioning(context, out_2.text_embeds, extra)

    def unet_eps(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = latent.shape[0]
        timestep = torch.as_tensor(timestep, device=latent.device).expand(batch)
        added_cond_kwargs = None
        if self.arch == "sdxl":
            if cond.pooled is None:
                raise ValueError("SDXL conditioning needs a pooled text embedding (cond.pooled)")
            time_ids = cond.extra.get("time_ids")
            if time_ids is None:
                height, width = (side * self.vae_scale_factor for side in latent.shape[-2:])
                time_ids = torch.tensor([height, width, 0, 0, height, width])
            time_ids = time_ids.to(latent.device, cond.context.dtype).reshape(-1, 6).expand(batch, 6)
            added_cond_kwargs = {"text_embeds": cond.pooled, "time_ids": time_ids}
        prediction = self.unet(
            latent, timestep, encoder_hidden_states=cond.context, added_cond_kwargs=added_cond_kwargs
        ).sample
        if self.prediction_type == "epsilon":
            return prediction
        # v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps
        alphas = self._alphas_cumprod.to(latent.device)[timestep.long()].view(-1, 1, 1, 1)
        return (alphas.sqrt() * prediction + (1 - alphas).sqrt() * latent).to(prediction.dtype)


@contextlib.contextmanager
def _hub_offline():
    """Make any hub request raise while loading, whatever a library decides to do."""
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _folder_arch(folder: str) -> str:
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as index_file:
        index = json.load(index_file)
    if index.get("text_encoder_2", [None])[0] is not None:
        return "sdxl"
    unet_config_path = os.path.join(folder, "unet", "config.json")
    if os.path.isfile(unet_config_path):
        with open(unet_config_path, encoding="utf-8") as config_file:
            if json.load(config_file).get("cross_attention_dim") == 1024:
                return "sd2"
    return "sd1"


def _checkpoint_arch(path: str, keys) -> str:
    keys = list(keys)
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ValueError(
            f"{path}: not a Stable Diffusion checkpoint (no 'model.diffusion_model.*' UNet keys)"
        )
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return "sd1"
    raise ValueError(f"{path}: no text encoder keys of a known layout (cond_stage_model.* / conditioner.*)")


def _single_file_keys(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as checkpoint:
                return list(checkpoint.keys())
        except Exception as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    if path.endswith(PICKLE_SUFFIXES):
        return list(load_pickled_tensors(path))
    raise ValueError(f"{path}: unknown model file type (expected .safetensors, .ckpt, .pt, .pth or .bin)")


def _cached_config_folder(path: str, arch: str) -> str:
    from huggingface_hub import snapshot_download

    repo = _DEFAULT_CONFIG_REPOS[arch]
    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=list(_CONFIG_FILES))
    except Exception as error:
        raise FileNotFoundError(
            f"{path}: a single-file {arch} checkpoint needs a diffusers config folder and none was "
            f"given; {repo!r} is not in the local Hugging Face cache either ({type(error).__name__}). "
            "Pass config=<folder> holding model_index.json, scheduler/scheduler_config.json, "
            "unet/config.json, vae/config.json, text_encoder/config.json and tokenizer/ "
            "(plus text_encoder_2/ and tokenizer_2/ for SDXL); weights are not needed."
        ) from error


def _check_config_folder(config: str, path: str, arch: str) -> None:
    if not os.path.isfile(os.path.join(config, "model_index.json")):
        raise FileNotFoundError(
            f"config folder {config} (for {path}) has no model_index.json: it must be a diffusers "
            "model folder layout (weights not needed)"
        )
    config_arch = _folder_arch(config)
    if (config_arch == "sdxl") != (arch == "sdxl"):
        raise ValueError(f"{path} is an {arch} checkpoint but config folder {config} is for {config_arch}")


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def _pipeline_kwargs(arch: str, dtype: torch.dtype) -> dict:
    kwargs = {"dtype": dtype, "local_files_only": True}
    if arch != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def load_base(
    path: str, config: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusersModel:
    """Load an SD1 / SD2 / SDXL base model from local files only.

    path: a diffusers folder (with model_index.json), or an original single-file checkpoint
    (.safetensors; .ckpt/.pt only if it loads with ``torch.load(weights_only=True)``).
    config: for a single file, a local diffusers folder with the configs and tokenizer(s);
    without it the matching default repository is looked up in the local HF cache only.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file or folder")
    with _hub_offline():
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ValueError(f"{path}: not a diffusers model folder (no model_index.json)")
            arch = _folder_arch(path)
            pipeline = _pipeline_class(arch).from_pretrained(path, **_pipeline_kwargs(arch, dtype))
        else:
            arch = _checkpoint_arch(path, _single_file_keys(path))
            if config is None:
                config = _cached_config_folder(path, arch)
            config = os.fspath(config)
            _check_config_folder(config, path, arch)
            pipeline = _pipeline_class(arch).from_single_file(
                path, config=config, **_pipeline_kwargs(arch, dtype)
            )
    pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            module.eval()
    return DiffusersModel.from_pipeline(pipeline)
