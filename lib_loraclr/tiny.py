"""Tiny SD1 / SDXL models with random weights and the real layer structure and names.

Tests, the demo and the benches need a model that runs in milliseconds on a CPU and has no
hub access, yet has every layer a LoRA can target under the same names as SD1.5 / SDXL.

Resolution levels at a 64x64 image (8x8 latent):
- SD1: down_blocks.0-2 / up_blocks.1-3 have cross-attention at 8x8, 4x4 and 2x2 latent
  pixels (1/8, 1/16, 1/32 of the image, as SD1.5 at 512 px has 64, 32, 16), the mid block
  at 1x1 (1/64). 1/32 of the image (CLoRA's attention resolution) is down_blocks.2 and
  up_blocks.1, as in SD1.5: 2 attention layers down, 3 up.
- SDXL: down_blocks.0 / up_blocks.2 have no attention (8x8); down_blocks.1 / up_blocks.1 at
  4x4 and down_blocks.2 / up_blocks.0 at 2x2 (1/32 of the image) have 2 transformer blocks
  per attention, as SDXL (which has 2 and 10); the mid block at 2x2 too.
"""

from __future__ import annotations

import os

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "clip_tokenizer")

CLIP_VOCAB_SIZE = 49408
TEXT_HIDDEN_SD1 = 32  # SD1.5: 768
TEXT_HIDDEN_SDXL_1 = 32  # SDXL text_encoder (CLIP-L): 768
# SDXL text_encoder_2 (OpenCLIP bigG): 1280. It must differ from text_encoder's width: that is
# how diffusers' single-file loader tells the two SDXL text encoders apart.
TEXT_HIDDEN_SDXL_2 = 48
SDXL_TIME_EMBED_DIM = 8  # SDXL: 256, for each of the 6 time ids
SAMPLE_SIZE = 8  # latent pixels: the default image is 64x64


def _text_config(hidden_size: int, hidden_act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    # 4 blocks -> 3 downsamplings -> vae scale factor 8, as SD's VAE
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


def _sd1_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=4,  # SD1's legacy name for the head count (8 in SD1.5)
        cross_attention_dim=TEXT_HIDDEN_SD1,
        norm_num_groups=16,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    pooled_dim = TEXT_HIDDEN_SDXL_2
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TEXT_HIDDEN_SDXL_1 + TEXT_HIDDEN_SDXL_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_dim,
        norm_num_groups=16,
    )


def build_tiny_components(arch: str = "sd1", seed: int = 0) -> dict:
    """The components of a tiny pipeline of ``arch`` ("sd1" | "sdxl"), weights drawn from ``seed``.

    The global torch RNG is left as it was, so building a model does not disturb a test's draws.
    """
    if arch not in ("sd1", "sdxl"):
        raise ValueError(f"tiny models exist for 'sd1' and 'sdxl', not {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "sd1":
            components = {
                "unet": _sd1_unet(),
                "text_encoder": CLIPTextModel(_text_config(TEXT_HIDDEN_SD1, "quick_gelu")),
                "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                "vae": _vae(0.18215),
                "scheduler": _scheduler(),
            }
        else:
            components = {
                "unet": _sdxl_unet(),
                "text_encoder": CLIPTextModel(_text_config(TEXT_HIDDEN_SDXL_1, "quick_gelu")),
                "text_encoder_2": CLIPTextModelWithProjection(
                    _text_config(TEXT_HIDDEN_SDXL_2, "gelu", projection_dim=TEXT_HIDDEN_SDXL_2)
                ),
                "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                # SDXL's second tokenizer pads with "!" (id 0), not with the end token
                "tokenizer_2": CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
                "vae": _vae(0.13025),
                "scheduler": _scheduler(),
            }
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def build_tiny_pipeline(arch: str = "sd1", seed: int = 0):
    """A StableDiffusionPipeline / StableDiffusionXLPipeline around the tiny components."""
    components = build_tiny_components(arch, seed)
    if arch == "sd1":
        return StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return StableDiffusionXLPipeline(**components)


def save_tiny_model(folder: str, arch: str = "sd1", seed: int = 0) -> str:
    """Write a tiny model as a diffusers folder (safetensors) and return the folder."""
    build_tiny_pipeline(arch, seed).save_pretrained(folder, safe_serialization=True)
    return folder
