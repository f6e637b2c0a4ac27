"""LoRA files in and out: read any supported family into canonical targets, write kohya files."""

from .base import ARCHITECTURES, COMPONENTS, LoraFile, LoraFormatError, LoraModule
from .keys import diffusers_to_target, kohya_key, kohya_to_target
from .modules import FullDiff, LoHa, LoKr, LoraUpDown
from .reader import ArchMismatchError, check_same_arch, describe, read_lora
from .writer import safe_output_path, write_kohya_lora, write_sidecar

__all__ = [
    "ARCHITECTURES", "COMPONENTS", "LoraFile", "LoraFormatError", "LoraModule",
    "diffusers_to_target", "kohya_key", "kohya_to_target",
    "FullDiff", "LoHa", "LoKr", "LoraUpDown",
    "ArchMismatchError", "check_same_arch", "describe", "read_lora",
    "safe_output_path", "write_kohya_lora", "write_sidecar",
]
