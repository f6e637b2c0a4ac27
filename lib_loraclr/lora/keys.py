"""Key names of every LoRA family <-> the canonical target names of ``lora.base``.

Kohya/A1111 files join module paths with ``_`` (``lora_unet_down_blocks_0_attentions_0_...``),
which is ambiguous because identifiers contain ``_`` too; we split on ``_`` and re-join the
words against a vocabulary of known multi-word identifiers. SDXL files from kohya sd-scripts
name UNet modules by the original (ldm/sgm) UNet (``input_blocks.4.1...``); those paths are
mapped to diffusers paths by the block formula of a UNet with two layers per block.
"""

from __future__ import annotations

import re

# Multi-word identifiers of diffusers' UNet2DConditionModel, the ldm/sgm UNet and the
# transformers CLIP text model. Single words (attn1, norm1, conv1, ff, net, ...) need no entry.
MULTI_WORD_IDENTIFIERS = (
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
    "to_out", "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "conv_norm_out",
    "time_emb_proj", "time_embedding", "add_embedding", "linear_1", "linear_2",
    # ldm / sgm UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # transformers CLIP
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1",
    "layer_norm2", "final_layer_norm", "text_projection", "token_embedding",
    "position_embedding",
)
_VOCAB_WORDS = sorted((ident.split("_") for ident in MULTI_WORD_IDENTIFIERS), key=len, reverse=True)

LAYERS_PER_BLOCK = 2  # every SD1/SD2/SDXL UNet
_BLOCK_STRIDE = LAYERS_PER_BLOCK + 1

# Which diffusers up_blocks have attentions: decides whether an ldm upsampler sits at
# output_blocks.N.1 (no attention in that block) or output_blocks.N.2.
_UP_BLOCKS_WITH_ATTENTION = {"sd1": {1, 2, 3}, "sd2": {1, 2, 3}, "sdxl": {0, 1}}

# ldm ResBlock inner layer -> diffusers ResnetBlock2D layer.
_LDM_RESNET_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_DIFFUSERS_RESNET_LAYERS = {v: k for k, v in _LDM_RESNET_LAYERS.items()}

# ldm modules outside the input/middle/output blocks.
_LDM_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_DIFFUSERS_TOP_LEVEL = {v: k for k, v in _LDM_TOP_LEVEL.items()}

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

# Old diffusers attention-processor names (``processor.to_k_lora``) -> module names.
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_CLIP = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def join_underscored(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    words = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(words):
        for ident in _VOCAB_WORDS:
            if words[i : i + len(ident)] == ident:
                parts.append("_".join(ident))
                i += len(ident)
                break
        else:
            parts.append(words[i])
            i += 1
    return ".".join(parts)


def ldm_to_diffusers_unet(path: str) -> str:
    """An ldm/sgm UNet module path -> the diffusers UNet2DConditionModel path.

    Paths already in diffusers form are returned unchanged.
    """
    for ldm, diffusers in _LDM_TOP_LEVEL.items():
        if path == ldm:
            return diffusers
    m = re.fullmatch(r"middle_block\.([012])\.(.+)", path)
    if m is not None:
        prefix = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[int(m.group(1))]
        rest = m.group(2)
        return f"{prefix}.{_LDM_RESNET_LAYERS.get(rest, rest) if 'resnets' in prefix else rest}"
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", path)
    if m is None:
        if path.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            raise ValueError(f"no diffusers module for ldm UNet path {path!r}")
        return path
    family, block, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if family == "input_blocks":
        index, layer = divmod(block - 1, _BLOCK_STRIDE)
        if rest == "op":
            return f"down_blocks.{index}.downsamplers.0.conv"
        prefix = f"down_blocks.{index}.{('resnets', 'attentions')[inner]}.{layer}"
    else:
        index, layer = divmod(block, _BLOCK_STRIDE)
        if inner > 0 and rest == "conv":
            return f"up_blocks.{index}.upsamplers.0.conv"
        prefix = f"up_blocks.{index}.{('resnets', 'attentions')[inner]}.{layer}"
    if ".resnets." in prefix:
        rest = _LDM_RESNET_LAYERS.get(rest, rest)
    return f"{prefix}.{rest}"


def diffusers_to_ldm_unet(path: str, arch: str) -> str:
    """A diffusers UNet module path -> the ldm/sgm path kohya sd-scripts uses for ``arch``."""
    if path in _DIFFUSERS_TOP_LEVEL:
        return _DIFFUSERS_TOP_LEVEL[path]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if m is not None:
        family, index, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            rest = _DIFFUSERS_RESNET_LAYERS.get(rest, rest)
        if family == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{_BLOCK_STRIDE * (index + 1)}.0.op"
            inner = 0 if kind == "resnets" else 1
            return f"input_blocks.{_BLOCK_STRIDE * index + layer + 1}.{inner}.{rest}"
        block = _BLOCK_STRIDE * index + (LAYERS_PER_BLOCK if kind == "upsamplers" else layer)
        if kind == "upsamplers":
            inner = 2 if index in _UP_BLOCKS_WITH_ATTENTION[arch] else 1
        else:
            inner = 0 if kind == "resnets" else 1
        return f"output_blocks.{block}.{inner}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m is not None:
        kind, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_DIFFUSERS_RESNET_LAYERS.get(rest, rest)}"
        return f"middle_block.1.{rest}"
    raise ValueError(f"no ldm module for diffusers UNet path {path!r}")


def _text_encoder_path(path: str) -> str:
    """Text encoder paths always use the transformers-4 form ``text_model.encoder...``."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def kohya_to_target(name: str) -> str:
    """``lora_unet_input_blocks_4_1_..._to_q`` / ``lora_te2_text_model_...`` -> canonical target."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            path = join_underscored(name[len(prefix) :])
            if component == "unet":
                return f"unet.{ldm_to_diffusers_unet(path)}"
            return f"{component}.{_text_encoder_path(path)}"
    raise ValueError(f"not a kohya LoRA module name: {name!r}")


def kohya_key(target: str, arch: str) -> str:
    """Canonical target -> the kohya module name sd-scripts writes for ``arch``.

    SD1/SD2: ``lora_unet_`` + diffusers path, ``lora_te_`` + CLIP path. SDXL: ``lora_te1_`` /
    ``lora_te2_`` and the UNet in ldm/sgm form, as kohya's SDXL trainer names it.
    """
    component, path = target.split(".", 1)
    if component == "unet":
        if arch == "sdxl":
            path = diffusers_to_ldm_unet(path, arch)
        return "lora_unet_" + path.replace(".", "_")
    if component == "text_encoder":
        return ("lora_te1_" if arch == "sdxl" else "lora_te_") + path.replace(".", "_")
    if component == "text_encoder_2":
        if arch != "sdxl":
            raise ValueError(f"{target!r}: a second text encoder exists only in SDXL, not {arch}")
        return "lora_te2_" + path.replace(".", "_")
    raise ValueError(f"unknown component in target {target!r}")


def diffusers_to_target(path: str, default_component: str = "unet") -> str:
    """A dotted module path from a diffusers/PEFT file -> canonical target.

    ``path`` is what precedes the LoRA suffix, e.g. ``unet.down_blocks.0...attn1.to_q``,
    ``text_encoder_2.text_model...q_proj``, ``base_model.model.down_blocks...`` or an old
    processor path ``unet....attn1.processor.to_k`` (the ``_lora`` already stripped).
    Paths without a component prefix use ``default_component``.
    """
    if path.startswith("base_model.model."):
        path = path[len("base_model.model.") :]
    component = default_component
    for name in ("text_encoder_2", "text_encoder", "unet"):
        if path.startswith(name + "."):
            component, path = name, path[len(name) + 1 :]
            break
    m = re.fullmatch(r"(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)", path)
    if m is not None and (".processor." in path or component != "unet"):
        table = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_CLIP
        path = f"{m.group(1)}.{table[m.group(2)]}"
    if component == "unet":
        return f"unet.{ldm_to_diffusers_unet(path)}"
    return f"{component}.{_text_encoder_path(path)}"


# UNet convolutions with 3x3 kernels, by the last names of their canonical paths. LyCORIS
# stores some conv factors flattened to (rank, in*kh*kw); the kernel comes from the name.
_CONV3X3 = re.compile(
    r"unet\.(conv_in|conv_out|.*\.resnets\.\d+\.conv[12]|.*\.(down|up)samplers\.0\.conv)"
)


def conv_kernel_hint(target: str) -> tuple[int, int] | None:
    """(3, 3) for the SD UNet's 3x3 convolutions, else None (unknown or not a 3x3 conv)."""
    return (3, 3) if _CONV3X3.fullmatch(target) else None
