"""The in-memory picture of a LoRA file, shared by every reader, the runtime and the merge.

Target names are canonical and host-independent: ``"<component>.<module path>"`` where
component is ``unet``, ``text_encoder`` or ``text_encoder_2`` and the module path is the
diffusers ``UNet2DConditionModel`` path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``)
or the transformers-4 CLIP path (``text_model.encoder.layers.0.self_attn.q_proj``).
Hosts map these names to their own modules; files map their own keys to these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ARCHITECTURES = ("sd1", "sd2", "sdxl")


class LoraFormatError(ValueError):
    """A LoRA file we cannot read; the message names the file and, where known, the key."""


@dataclass
class LoraModule:
    """One adapted layer of one LoRA file. Subclasses are registered by ``kind``.

    ``delta_weight()`` returns the dense additive weight change (scale included) with the
    base layer's weight shape: (out, in) for linear, (out, in, kh, kw) for conv.
    ``low_rank()`` returns (up, down) with the scale folded into ``up`` when the module is
    exactly low rank, so the runtime can apply it without materialising the delta.
    """

    target: str
    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["LoraModule"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            LoraModule.registry[cls.kind] = cls

    @property
    def component(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def alpha(self) -> float:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


@dataclass
class LoraFile:
    """Everything read from one file: its adapted layers, metadata and trigger words."""

    path: str
    format: str  # "kohya" | "peft" | "diffusers"
    arch: str | None  # one of ARCHITECTURES, or None when it cannot be told
    modules: dict[str, LoraModule]  # canonical target -> module
    metadata: dict[str, str] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        import os

        return os.path.splitext(os.path.basename(self.path))[0]

    def components(self) -> set[str]:
        return {m.component for m in self.modules.values()}


def sidecar_path(lora_path: str) -> str:
    """A1111's per-LoRA user metadata file: ``<name>.json`` beside the LoRA."""
    import os

    return os.path.splitext(lora_path)[0] + ".json"
