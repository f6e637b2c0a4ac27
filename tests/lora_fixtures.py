"""Tiny LoRA files in every family we read, for tests.

Factor builders return ``{role: tensor}`` with kohya/LyCORIS role names ("lora_up.weight",
"hada_w1_a", ...); writers put them under each family's key names. Tests compute expected
deltas from these raw tensors with their own formulas.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from lib_loraclr.lora.keys import kohya_key

# The shapes of a few canonical SD1 targets, shrunk except where width tells the arch.
SD1_CROSS_ATTN_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
SD1_SELF_ATTN_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SD1_RESNET_CONV = "unet.down_blocks.0.resnets.0.conv1"
SD1_TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_factors(out_dim: int, in_dim: int, rank: int, *, alpha: float | None = None,
                 kernel: tuple[int, int] | None = None, tucker: bool = False, seed: int = 0) -> dict:
    """Classic LoRA / LoCon factors; conv when ``kernel`` is given, with a Tucker core if ``tucker``."""
    g = _gen(seed)
    if kernel is None:
        factors = {"lora_up.weight": torch.randn(out_dim, rank, generator=g),
                   "lora_down.weight": torch.randn(rank, in_dim, generator=g)}
    elif tucker:
        factors = {"lora_up.weight": torch.randn(out_dim, rank, 1, 1, generator=g),
                   "lora_mid.weight": torch.randn(rank, rank, *kernel, generator=g),
                   "lora_down.weight": torch.randn(rank, in_dim, 1, 1, generator=g)}
    else:
        factors = {"lora_up.weight": torch.randn(out_dim, rank, 1, 1, generator=g),
                   "lora_down.weight": torch.randn(rank, in_dim, *kernel, generator=g)}
    if alpha is not None:
        factors["alpha"] = torch.tensor(float(alpha))
    return factors


def loha_factors(out_dim: int, in_dim: int, rank: int, *, alpha: float = 1.0,
                 kernel: tuple[int, int] | None = None, tucker: bool = False, seed: int = 0) -> dict:
    """LoHa factors as LyCORIS stores them: conv without Tucker is flattened to (r, in*kh*kw)."""
    g = _gen(seed)
    flat_in = in_dim * (kernel[0] * kernel[1] if kernel and not tucker else 1)
    factors = {"alpha": torch.tensor(float(alpha))}
    for n in (1, 2):
        if tucker:
            factors[f"hada_w{n}_a"] = torch.randn(rank, out_dim, generator=g)
            factors[f"hada_t{n}"] = torch.randn(rank, rank, *kernel, generator=g)
        else:
            factors[f"hada_w{n}_a"] = torch.randn(out_dim, rank, generator=g)
        factors[f"hada_w{n}_b"] = torch.randn(rank, flat_in, generator=g)
    return factors


def lokr_factors(w1_shape: tuple[int, int], w2_shape: tuple[int, ...], *, rank: int | None = None,
                 alpha: float = 1.0, decompose_w1: bool = False, decompose_w2: bool = False,
                 tucker: bool = False, seed: int = 0) -> dict:
    """LoKr factors: delta = kron(w1 (a, c), w2 (b, d[, kh, kw])), either factor full or low rank."""
    g = _gen(seed)
    factors = {"alpha": torch.tensor(float(alpha))}
    if decompose_w1:
        factors["lokr_w1_a"] = torch.randn(w1_shape[0], rank, generator=g)
        factors["lokr_w1_b"] = torch.randn(rank, w1_shape[1], generator=g)
    else:
        factors["lokr_w1"] = torch.randn(*w1_shape, generator=g)
    if tucker:
        factors["lokr_t2"] = torch.randn(rank, rank, *w2_shape[2:], generator=g)
        factors["lokr_w2_a"] = torch.randn(rank, w2_shape[0], generator=g)
        factors["lokr_w2_b"] = torch.randn(rank, w2_shape[1], generator=g)
    elif decompose_w2:
        factors["lokr_w2_a"] = torch.randn(w2_shape[0], rank, generator=g)
        factors["lokr_w2_b"] = torch.randn(rank, *w2_shape[1:], generator=g)
    else:
        factors["lokr_w2"] = torch.randn(*w2_shape, generator=g)
    return factors


def write_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save raw keys -> tensors as safetensors; returns the path."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def kohya_tensors(modules: dict[str, dict], arch: str) -> dict[str, torch.Tensor]:
    """{canonical target: factors} -> kohya keys as sd-scripts names them for ``arch``."""
    return {f"{kohya_key(target, arch)}.{role}": t for target, factors in modules.items()
            for role, t in factors.items()}


def write_kohya_file(path, modules: dict[str, dict], arch: str, metadata: dict[str, str] | None = None) -> str:
    return write_file(path, kohya_tensors(modules, arch), metadata)


_DIFFUSERS_SUFFIX = {
    "peft": {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight", "alpha": "alpha"},
    "lora_linear_layer": {"lora_up.weight": "lora_linear_layer.up.weight",
                          "lora_down.weight": "lora_linear_layer.down.weight"},
}


def write_diffusers_file(path, modules: dict[str, dict], style: str = "peft") -> str:
    """Dotted keys ``<component>.<path>.<suffix>``; style "peft" (lora_A/B, .alpha) or
    "lora_linear_layer" (old diffusers text-encoder layout, no alpha)."""
    table = _DIFFUSERS_SUFFIX[style]
    return write_file(path, {f"{target}.{table[role]}": t for target, factors in modules.items()
                             for role, t in factors.items() if role in table})


def write_processor_file(path, modules: dict[str, dict]) -> str:
    """Old diffusers attention-processor keys: ``unet.<attn path>.processor.to_k_lora.down.weight``.

    ``modules`` maps canonical UNet attention targets (``....attn1.to_k`` / ``.to_out.0``)."""
    tensors = {}
    for target, factors in modules.items():
        attn, name = target.removesuffix(".0").rsplit(".", 1)
        for role, direction in (("lora_down.weight", "down"), ("lora_up.weight", "up")):
            tensors[f"{attn}.processor.{name}_lora.{direction}.weight"] = factors[role]
    return write_file(path, tensors)


def write_peft_folder(folder, modules: dict[str, dict], *, lora_alpha: float, r: int,
                      target_modules: list[str], adapter_name: str | None = None) -> str:
    """A PEFT adapter: ``base_model.model.<module path>.lora_A[.<adapter>].weight`` plus
    adapter_config.json; ``modules`` maps module paths without component."""
    os.makedirs(folder, exist_ok=True)
    middle = f".{adapter_name}" if adapter_name else ""
    tensors = {}
    for module_path, factors in modules.items():
        tensors[f"base_model.model.{module_path}.lora_A{middle}.weight"] = factors["lora_down.weight"]
        tensors[f"base_model.model.{module_path}.lora_B{middle}.weight"] = factors["lora_up.weight"]
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": target_modules}, f)
    return write_file(os.path.join(folder, "adapter_model.safetensors"), tensors)


def random_lora_for(targets: dict[str, tuple[int, ...]], rank: int = 2, seed: int = 0) -> dict[str, dict]:
    """Random LoRA factors for each {canonical target: base weight shape} (linear or conv)."""
    modules = {}
    for i, (target, shape) in enumerate(targets.items()):
        kernel = tuple(shape[2:]) if len(shape) == 4 else None
        modules[target] = lora_factors(shape[0], shape[1], rank, alpha=rank / 2, kernel=kernel, seed=seed + i)
    return modules
