"""Reading tensor files that may be pickles, without ever running pickled code."""

from __future__ import annotations

import torch

PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def load_pickled_tensors(path: str) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.ckpt`` state dict through ``torch.load(weights_only=True)``; anything else is refused.

    Raises ValueError naming the file when it holds more than tensors and plain containers.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        lines = str(error).splitlines() or [""]
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise ValueError(
            f"{path}: refused; a pickle file may hold only tensors and plain containers "
            f"(torch.load weights_only=True failed: {reason}). Convert it to .safetensors."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: key {key!r} holds {type(value).__name__}, not a tensor")
    return dict(loaded)
