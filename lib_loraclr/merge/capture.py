"""Layer-input capture for the merge: every concept runs in one batch, row block i = concept i.

Running the concepts in lockstep keeps their feature rows aligned (same prompt template,
same token slots, same sampling step), which is what the loss compares, and lets the
collector accumulate the cross-concept inner products <Y_i, Y_j> that per-concept Gram
matrices cannot give.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .stats import LayerStats


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """(D_out, D_in) view of a Linear or Conv2d weight (conv: D_in = in * kh * kw)."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1).float()


def input_rows(module: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Rows the layer multiplies by its weight: (B, R, D_in); conv inputs are unfolded into patches."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            layer_input,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (B, in*kh*kw, L)
        return patches.transpose(1, 2)
    return layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])


def output_rows(module: nn.Module, layer_output: torch.Tensor) -> torch.Tensor:
    """Layer output without its bias, as (B, R, D_out) rows matching ``input_rows``."""
    if isinstance(module, nn.Conv2d):
        if module.bias is not None:
            layer_output = layer_output - module.bias.view(1, -1, 1, 1)
        return layer_output.flatten(2).transpose(1, 2)
    if module.bias is not None:
        layer_output = layer_output - module.bias
    return layer_output.reshape(layer_output.shape[0], -1, layer_output.shape[-1])


class FeatureCollector:
    """Forward hooks that stream each target's (X_i, Y_i) blocks into ``LayerStats``.

    Register it after the LoRA runtime's hooks so the observed output is the concept's
    LoRA-applied output Y_i. With ``keep_raw`` the raw row blocks are also kept (the
    reference solver needs them; the fast solver does not).
    """

    def __init__(self, targets: dict[str, nn.Module], n_concepts: int, keep_raw: bool = False):
        self.targets = targets
        self.n_concepts = n_concepts
        self.keep_raw = keep_raw
        self.stats: dict[str, LayerStats] = {}
        self.raw_inputs: dict[str, list[list[torch.Tensor]]] = {}
        self.recording = True
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.recording:
                return
            # Forge runs its text encoder under inference_mode: the statistics must stay
            # ordinary tensors, or their in-place accumulation fails outside it.
            with torch.inference_mode(False), torch.no_grad():
                x_rows = input_rows(module, args[0].detach()).float()
                y_rows = output_rows(module, output.detach()).float()
                batch = x_rows.shape[0]
                if batch % self.n_concepts:
                    raise RuntimeError(f"batch {batch} of {name} is not a multiple of {self.n_concepts} concepts")
                per = batch // self.n_concepts
                x_blocks = [x_rows[i * per:(i + 1) * per].reshape(-1, x_rows.shape[-1]) for i in range(self.n_concepts)]
                y_blocks = [y_rows[i * per:(i + 1) * per].reshape(-1, y_rows.shape[-1]) for i in range(self.n_concepts)]
                self.add(name, module, x_blocks, y_blocks)

        return hook

    def add(self, name: str, module: nn.Module, x_blocks: list[torch.Tensor], y_blocks: list[torch.Tensor]):
        """Feed one aligned chunk (row block per concept) of a layer."""
        if name not in self.stats:
            self.stats[name] = LayerStats(layer_matrix(module), self.n_concepts)
            self.raw_inputs[name] = [[] for _ in range(self.n_concepts)]
        self.stats[name].add(x_blocks, y_blocks)
        if self.keep_raw:
            for i, block in enumerate(x_blocks):
                self.raw_inputs[name][i].append(block.cpu())

    def raw(self, name: str) -> list[torch.Tensor]:
        return [torch.cat(blocks) for blocks in self.raw_inputs[name]]

    @contextmanager
    def attached(self):
        try:
            for name, module in self.targets.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()


@contextmanager
def weights_added(targets: dict[str, nn.Module], deltas: dict[str, torch.Tensor]):
    """Temporarily add merged deltas to the model's weights; restore the exact originals after.

    Inference-tensor weights (Forge) can only be written inside inference mode.
    """
    originals = {}
    try:
        for name, delta in deltas.items():
            weight = targets[name].weight
            with torch.inference_mode(weight.is_inference()), torch.no_grad():
                originals[name] = weight.detach().clone()
                weight.add_(delta.reshape(weight.shape).to(weight.device, weight.dtype))
        yield
    finally:
        for name, original in originals.items():
            weight = targets[name].weight
            with torch.inference_mode(weight.is_inference()), torch.no_grad():
                weight.copy_(original)
