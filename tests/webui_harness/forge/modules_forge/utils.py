"""modules_forge.utils: the helpers processing uses."""
import numpy as np
import torch


def prepare_free_memory(aggressive=False):
    return


def apply_circular_forge(model, tiling_enabled=False):
    if model.tiling_enabled == tiling_enabled:
        return
    model.tiling_enabled = tiling_enabled
    raise NotImplementedError("tiling is not simulated by the harness")


def pytorch_to_numpy(x):
    return [np.clip(255. * y.cpu().numpy(), 0, 255).astype(np.uint8) for y in x]


def numpy_to_pytorch(x):
    y = x.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(y[None].copy())).float()
