"""Write a diffusers SD1 / SDXL model as an original single-file checkpoint (ldm key names).

Real users load ``.safetensors`` checkpoints in the CompVis/SGM layout; tests need such a
file with known weights to check that ``load_base(file, config=folder)`` reads it right.
The mapping is the inverse of the original-to-diffusers conversion, written from the two
layouts' key names.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import save_file

_UNET_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_tail(tail: str) -> str:
    for diffusers_name, ldm_name in _UNET_RESNET_NAMES:
        if tail.startswith(diffusers_name + "."):
            return ldm_name + tail[len(diffusers_name) :]
    raise KeyError(tail)


def _unet_key(key: str, layers_per_block: int, up_has_attentions: dict[int, bool]) -> str:
    """One diffusers UNet key -> its ldm ``model.diffusion_model.*`` key."""
    parts = key.split(".")
    for diffusers_prefix, ldm_prefix in _UNET_TOP_LEVEL.items():
        if key.startswith(diffusers_prefix + "."):
            return ldm_prefix + key[len(diffusers_prefix) :]
    if parts[0] == "down_blocks":
        block = int(parts[1])
        first = 1 + block * (layers_per_block + 1)  # input_blocks index of the block's first layer
        kind, index, tail = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{first + index}.0.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"input_blocks.{first + index}.1.{tail}"
        if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.N.0.op.*
            return f"input_blocks.{first + layers_per_block}.0.op.{'.'.join(parts[5:])}"
    if parts[0] == "mid_block":
        kind, index, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet_tail(tail)}"
        return f"middle_block.1.{tail}"
    if parts[0] == "up_blocks":
        block = int(parts[1])
        first = block * (layers_per_block + 1)
        kind, index, tail = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{first + index}.0.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"output_blocks.{first + index}.1.{tail}"
        if kind == "upsamplers":  # after the last layer's resnet (and attention, if any)
            slot = 2 if up_has_attentions[block] else 1
            return f"output_blocks.{first + layers_per_block}.{slot}.{tail}"
    raise KeyError(f"no ldm name for UNet key {key}")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layers_per_block = unet.config.layers_per_block
    has_attentions = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    return {
        "model.diffusion_model." + _unet_key(key, layers_per_block, has_attentions): value
        for key, value in unet.state_dict().items()
    }


def _vae_key(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its ldm ``first_stage_model.*`` key."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for diffusers_name, ldm_name in (
            ("group_norm", "norm"),
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ):
            key = key.replace(f".{diffusers_name}.", f".{ldm_name}.")
        return key
    parts = key.split(".")
    if parts[1] == "down_blocks":
        block = parts[2]
        rest = ".".join(parts[4:])
        if parts[3] == "resnets":
            return f"encoder.down.{block}.block.{rest}"
        return f"encoder.down.{block}.downsample.{'.'.join(parts[5:])}"
    if parts[1] == "up_blocks":
        block = num_blocks - 1 - int(parts[2])  # ldm numbers decoder levels from the bottom
        rest = ".".join(parts[4:])
        if parts[3] == "resnets":
            return f"decoder.up.{block}.block.{rest}"
        return f"decoder.up.{block}.upsample.{'.'.join(parts[5:])}"
    return key


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_blocks = len(vae.config.block_out_channels)
    converted = {}
    for key, value in vae.state_dict().items():
        ldm_key = _vae_key(key, num_blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # ldm's attention projections are 1x1 convs
        converted["first_stage_model." + ldm_key] = value
    return converted


def _clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """State dict with transformers-4 ``text_model.*`` keys whatever transformers is installed."""
    state = text_encoder.state_dict()
    if hasattr(text_encoder, "text_model"):
        return state
    return {
        (key if key.startswith("text_projection") else "text_model." + key): value for key, value in state.items()
    }


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L in the HF layout under ``prefix`` (SD1 ``cond_stage_model.transformer.``)."""
    return {prefix + key: value for key, value in _clip_state_dict(text_encoder).items()}


def open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP layout (SDXL ``conditioner.embedders.1.model.``)."""
    state = _clip_state_dict(text_encoder)
    converted = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),  # OpenCLIP: x @ P
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        source = f"text_model.encoder.layers.{layer}."
        target = f"transformer.resblocks.{layer}."
        for part in ("weight", "bias"):
            converted[target + f"attn.in_proj_{part}"] = torch.cat(
                [state[source + f"self_attn.{name}_proj.{part}"] for name in ("q", "k", "v")]
            )
            for diffusers_name, ldm_name in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                converted[target + f"{ldm_name}.{part}"] = state[source + f"{diffusers_name}.{part}"]
    return {prefix + key: value for key, value in converted.items()}


def write_single_file_checkpoint(pipeline, path: str) -> str:
    """Save a StableDiffusion(XL)Pipeline's weights as one original-layout .safetensors file."""
    state = unet_to_ldm(pipeline.unet) | vae_to_ldm(pipeline.vae)
    if getattr(pipeline, "text_encoder_2", None) is None:
        state |= clip_to_ldm(pipeline.text_encoder, "cond_stage_model.transformer.")
    else:
        state |= clip_to_ldm(pipeline.text_encoder, "conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(pipeline.text_encoder_2, "conditioner.embedders.1.model.")
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


def write_config_folder(model_folder: str, config_folder: str) -> str:
    """Copy a diffusers folder without its weights: what ``load_base(file, config=...)`` needs."""
    shutil.copytree(
        model_folder, config_folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")
    )
    return config_folder


def weight_files(folder: str) -> list[str]:
    return [
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith((".safetensors", ".bin"))
    ]
