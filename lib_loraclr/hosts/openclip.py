"""SDXL's second text encoder as A1111 runs it (OpenCLIP), presented as separate linear layers.

OpenCLIP packs each block's q/k/v into ``nn.MultiheadAttention.in_proj_weight`` and never
calls ``out_proj.forward``, and its blocks run sequence-first ``(77, B, D)``: no hook on its
modules would see what a LoRA for ``self_attn.q_proj`` or ``mlp.fc1`` adapts. So each block
gets six ``LayerView``s (q/k/v/out slices of the attention weights, and the two MLP layers)
under the canonical names, and while any view has a hook the block runs an equivalent
forward that calls the views batch-first. With no hook on them, the block is OpenCLIP's own.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK_PATH = re.compile(r"transformer\.resblocks\.(\d+)")


class LayerView(nn.Linear):
    """A linear layer of a packed block: ``weight``/``bias`` read the block's own tensors."""

    def __init__(self, block: "UnpackedBlock", weight: Callable[[], torch.Tensor], bias: Callable[[], torch.Tensor | None],
                 call: Callable[[torch.Tensor], torch.Tensor] | None = None):
        nn.Module.__init__(self)
        self._block, self._weight, self._bias, self._call = block, weight, bias, call
        self.out_features, self.in_features = weight().shape

    @property
    def weight(self) -> torch.Tensor:
        return self._weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self._bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x) if self._call is not None else F.linear(x, self.weight, self.bias)

    def register_forward_hook(self, *args, **kwargs):
        return self._block.track(super().register_forward_hook(*args, **kwargs))

    def register_forward_pre_hook(self, *args, **kwargs):
        return self._block.track(super().register_forward_pre_hook(*args, **kwargs))


class _TrackedHandle:
    def __init__(self, handle, block: "UnpackedBlock"):
        self.handle, self.block, self.removed = handle, block, False

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            self.handle.remove()
            self.block.release()


class UnpackedBlock:
    """One OpenCLIP ``ResidualAttentionBlock``: its views, and its forward while they are hooked."""

    def __init__(self, block: nn.Module):
        self.block = block
        attention = block.attn
        width = attention.embed_dim

        def rows(i):
            return lambda: attention.in_proj_weight[i * width:(i + 1) * width]

        def bias_rows(i):
            return lambda: None if attention.in_proj_bias is None else attention.in_proj_bias[i * width:(i + 1) * width]

        fc1, fc2 = block.mlp.c_fc, block.mlp.c_proj
        self.views = {
            "self_attn.q_proj": LayerView(self, rows(0), bias_rows(0)),
            "self_attn.k_proj": LayerView(self, rows(1), bias_rows(1)),
            "self_attn.v_proj": LayerView(self, rows(2), bias_rows(2)),
            "self_attn.out_proj": LayerView(self, lambda: attention.out_proj.weight, lambda: attention.out_proj.bias),
            # the MLP layers are called as themselves, so the host's own Linear patches still run
            "mlp.fc1": LayerView(self, lambda: fc1.weight, lambda: fc1.bias, fc1),
            "mlp.fc2": LayerView(self, lambda: fc2.weight, lambda: fc2.bias, fc2),
        }
        self.hooks = 0

    def track(self, handle) -> _TrackedHandle:
        self.hooks += 1
        if self.hooks == 1:
            self.block.forward = self.forward
        return _TrackedHandle(handle, self)

    def release(self) -> None:
        self.hooks -= 1
        if self.hooks == 0:
            self.block.__dict__.pop("forward", None)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        """open_clip's ``ResidualAttentionBlock.forward`` (self-attention) through the views."""
        if k_x is not None or v_x is not None:
            raise RuntimeError("LoRACLR: OpenCLIP cross-attention blocks are not supported")
        block, attention, view = self.block, self.block.attn, self.views
        networks = sys.modules.get("networks")  # A1111's built-in Lora merges its weights at the module's forward
        if networks is not None and hasattr(attention, "network_layer_name"):
            networks.network_apply_weights(attention)
        x = q_x if attention.batch_first else q_x.transpose(0, 1)  # (B, L, D)
        h = block.ln_1(x)
        batch, length, width = h.shape
        heads = attention.num_heads

        def split(t):  # (B, L, D) -> (B, heads, L, D / heads)
            return t.view(batch, length, heads, width // heads).transpose(1, 2)

        mask = attn_mask.to(h.dtype) if attn_mask is not None else None
        attended = F.scaled_dot_product_attention(
            split(view["self_attn.q_proj"](h)), split(view["self_attn.k_proj"](h)), split(view["self_attn.v_proj"](h)),
            attn_mask=mask,
        )
        attended = view["self_attn.out_proj"](attended.transpose(1, 2).reshape(batch, length, width))
        x = x + getattr(block, "ls_1", nn.Identity())(attended)
        mlp = view["mlp.fc2"](block.mlp.gelu(view["mlp.fc1"](block.ln_2(x))))
        x = x + getattr(block, "ls_2", nn.Identity())(mlp)
        return x if attention.batch_first else x.transpose(0, 1)


def open_clip_targets(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """Canonical name -> ``LayerView`` for every block of an OpenCLIP text model (``model.transformer``)."""
    found = {}
    for path, module in model.named_modules():
        match = _BLOCK_PATH.fullmatch(path)
        if match and isinstance(getattr(module, "attn", None), nn.MultiheadAttention):
            unpacked = UnpackedBlock(module)
            for layer, view in unpacked.views.items():
                found[f"{component}.text_model.encoder.layers.{match.group(1)}.{layer}"] = view
    return found
