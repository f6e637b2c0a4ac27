"""The toy world's text-to-image model: Stable Diffusion 1's architecture at toy widths.

- text encoder: ``transformers.CLIPTextModel`` (CLIP architecture, the standard CLIP BPE
  vocabulary of ``lib_loraclr/assets/clip_tokenizer``, 77 positions), width 64, 2 layers;
- UNet: ``diffusers.UNet2DConditionModel`` with cross-attention (SD1 block types and names),
  widths (64, 128), cross-attention at 8x8 and 4x4 latent pixels and in the mid block;
- "VAE": a fixed pixel-space equivalent. The latent is the image itself, space-to-depth by 4
  and standardised: ``latent = (pixel_unshuffle(rgb / 255, 4) - PIXEL_MEAN) / PIXEL_STD``,
  48 channels at 8x8 for a 32x32 image (lossless; the VAE scale factor is 4; each latent
  pixel is a 4x4 patch, as a patch-4 DiT). Standardising plays the part of SD's latent
  scaling factor: a latent far from zero mean (the raw [-1, 1] image of a mostly black scene
  has mean -0.85) made sampling drift into noise. For the loaders, the folder holds a
  three-level ``AutoencoderKL`` (48 latent channels, scaling factor 1) fitted to that
  transform and its inverse (``train_base`` reports its error); the benchmark never decodes
  through it but applies the exact inverse (``latents_to_images``);
- scheduler: SD's (1000 steps, scaled-linear betas) with v-prediction, as SD 2's 768 models:
  with epsilon prediction a small noise error at the first steps becomes a 15x larger
  error in the predicted image, and the tiny model's first steps went astray.

The folder is an ordinary diffusers ``StableDiffusionPipeline`` folder (safetensors), read by
``lib_loraclr.hosts.diffusers.load_base``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lib_loraclr.tiny import TOKENIZER_DIR

from .world import SIZE

TEXT_WIDTH = 64
LATENT_CHANNELS = 48  # 3 colours x 4 x 4 pixels
FACTOR = 4
# mean and standard deviation of rgb / 255 over 2000 training scenes (mostly black background)
PIXEL_MEAN = 0.073
PIXEL_STD = 0.213


def build_components(seed: int = 0) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=TEXT_WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
        unet = UNet2DConditionModel(
            sample_size=SIZE // FACTOR,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(64, 128),
            layers_per_block=1,
            attention_head_dim=4,  # SD1's legacy name for the head count
            cross_attention_dim=TEXT_WIDTH,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 48), layers_per_block=1, norm_num_groups=8, sample_size=SIZE,
            scaling_factor=1.0, mid_block_add_attention=False,
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction",
    )
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae, "scheduler": scheduler}


def save_pipeline(components: dict, folder: str) -> str:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def images_to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 48, H/4, W/4) latent (the exact pixel-space encoder)."""
    unit = (images_to_pixels(images) + 1) / 2
    return (torch.nn.functional.pixel_unshuffle(unit, FACTOR) - PIXEL_MEAN) / PIXEL_STD


def latents_to_images(latents: torch.Tensor) -> np.ndarray:
    """(N, 48, h, w) latent -> (N, 4h, 4w, 3) uint8 (the exact pixel-space decoder)."""
    unit = torch.nn.functional.pixel_shuffle(latents.detach().float().cpu() * PIXEL_STD + PIXEL_MEAN, FACTOR)
    return (unit.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
