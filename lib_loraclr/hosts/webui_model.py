"""What A1111's and Forge's loaded models share behind ``ModelAccess``.

Both run the original (ldm-named) UNet, whose module paths map to the canonical diffusers
paths with ``keys.ldm_to_diffusers_unet``; both keep transformers CLIP text encoders whose
``text_model.`` paths canonical names already use; both encode prompts with the host's own
``get_learned_conditioning`` (emphasis, clip skip and embeddings as in a generation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.keys import ldm_to_diffusers_unet
from ..model import Conditioning, ModelAccess
from ..runtime import is_adaptable


class WebUIModel(ModelAccess):
    """Subclasses set ``arch``, ``sd_model``, ``unet``, ``text_encoders`` (component -> transformers
    text model) and ``_tokenizer`` in ``__init__`` and may add targets in ``extra_targets``."""

    sd_model: object
    text_encoders: dict[str, nn.Module]
    _tokenizer: object
    _targets: dict[str, nn.Module] | None = None
    image_size: tuple[int, int] | None = None  # (height, width) a generation asks for (SDXL's size conditioning)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def tokenizer(self):
        return self._tokenizer

    def targets(self) -> dict[str, nn.Module]:
        if self._targets is None:
            found = {
                f"unet.{ldm_to_diffusers_unet(path)}": module
                for path, module in self.unet.named_modules()
                if is_adaptable(module)
            }
            for component, transformer in self.text_encoders.items():
                found.update({
                    f"{component}.{path}": module
                    for path, module in transformer.named_modules()
                    if path.startswith("text_model.") and is_adaptable(module)
                })
            found.update(self.extra_targets())
            self._targets = found
        return self._targets

    def extra_targets(self) -> dict[str, nn.Module]:
        return {}

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    def encode(self, prompts: list[str]) -> Conditioning:
        batch = list(prompts)
        if self.arch == "sdxl" and self.image_size is not None:
            from modules.prompt_parser import SdConditioning

            height, width = self.image_size
            batch = SdConditioning(batch, width=width, height=height)
        cond = self.sd_model.get_learned_conditioning(batch)
        if isinstance(cond, dict):
            return Conditioning(cond["crossattn"], cond["vector"])
        return Conditioning(cond)
