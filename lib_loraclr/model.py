"""The one interface both engines use to reach a model, whichever host loaded it.

A host (standalone diffusers, A1111, Forge) implements ``ModelAccess``; the engines never
touch host objects. Module names are the canonical target names of ``lora.base``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Conditioning:
    """What the UNet needs from a batch of prompts.

    context: (B, 77*k, C) cross-attention states (C = 768 SD1, 1024 SD2, 2048 SDXL).
    pooled: (B, P) pooled text embedding (SDXL only), else None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def select(self, rows) -> "Conditioning":
        return Conditioning(
            self.context[rows],
            None if self.pooled is None else self.pooled[rows],
            dict(self.extra),
        )

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Conditioning(torch.cat([c.context for c in conds]), pooled, dict(conds[0].extra))


class ModelAccess(ABC):
    """Text encoder(s), tokenizer and UNet of a loaded SD model, by canonical names."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    unet: nn.Module  # the host's own UNet: composition finds its cross-attention modules here

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def targets(self) -> dict[str, nn.Module]:
        """Every Linear/Conv2d a LoRA may adapt, keyed by canonical target name."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) token ids of the first tokenizer, padded to max length (CLIP: BOS ... EOS pad)."""

    @property
    @abstractmethod
    def tokenizer(self):
        """A callable tokenizer with ``encode``/``decode`` and ``model_max_length`` (CLIP BPE)."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Run the text encoder(s) on prompts, as the host does for generation."""

    @abstractmethod
    def unet_eps(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet pass: (B, 4, h, w) latent at discrete timesteps (B,) -> predicted noise."""

    @property
    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) training schedule, used by the engine's own samplers."""

    latent_channels: int = 4
    vae_scale_factor: int = 8


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the engines' numerics; fp32/fp64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
