"""Where each LoRA acts inside one UNet pass of the single-pass composition (``compose.masked``).

Two pieces, both driven by the fusion weights of the passes (base pass + one per subject):
- ``RegionalCrossAttention``: every cross-attention layer runs once per pass on the same
  queries, each with its pass's own conditioning (the prompt encoded with that pass's LoRAs'
  text-encoder parts) and its pass's LoRAs on q/k/v/out, and the outputs are fused by the
  masks: the part of a UNet where the prompt enters is exactly what each pass alone would
  compute there. Cost: the cross-attention layers run P times.
- ``RegionRouter``: every other UNet layer runs once; each LoRA's output is multiplied, per
  position, by its subject's mask area-resized to the layer's resolution
  (``LoraRuntime.regions``). A style LoRA limited to some subjects follows the union of their
  masks; a global one is never scaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F

from .attention import layer_inputs
from .fusion import map_hw


class RegionRouter:
    """The ``RegionScale`` of one composition's image layers (see the module docstring).

    lora_groups: LoRA index -> the subject indices whose region it follows; LoRAs not listed
        act everywhere. latent_hw: the latent's (h, w); ``update`` gives the masks at that size.
    """

    def __init__(self, lora_groups: Mapping[int, Sequence[int]], subjects: int, latent_hw: tuple[int, int]):
        self.lora_groups = {lora: tuple(groups) for lora, groups in lora_groups.items()}
        self.subjects = subjects
        self.latent_hw = tuple(latent_hw)
        self.masks: torch.Tensor | None = None  # (G, B, 1, h, w)
        self._cache: dict = {}

    def update(self, masks: torch.Tensor) -> None:
        """masks: (G, B, 1, h, w) weights in [0, 1], one per subject; used from the next forward on."""
        if masks.dim() != 5 or masks.shape[0] != self.subjects or tuple(masks.shape[-2:]) != self.latent_hw:
            raise ValueError(f"region masks {tuple(masks.shape)} do not fit {self.subjects} subjects at {self.latent_hw}")
        self.masks = masks.float()
        self._cache = {}

    def __call__(self, target: str, lora: int, term: torch.Tensor) -> torch.Tensor | None:
        groups = self.lora_groups.get(lora)
        if groups is None or term.dim() not in (3, 4):
            return None
        if self.masks is None:
            raise ValueError("RegionRouter: no masks yet (call update before the first UNet pass)")
        tokens = term.dim() == 3  # (R, h*w, r) linear on image tokens, else (R, r, h, w) conv
        size = map_hw(term.shape[1], self.latent_hw) if tokens else tuple(term.shape[-2:])
        key = (tokens, groups, size, term.device)
        scale = self._cache.get(key)
        if scale is None:
            mask = self.masks[list(groups)].sum(dim=0).clamp(max=1.0)  # (B, 1, h, w) union of the groups
            if tuple(size) != self.latent_hw:
                mask = F.interpolate(mask, size=tuple(size), mode="area")
            scale = mask.flatten(2).transpose(1, 2) if tokens else mask  # (B, h*w, 1) or (B, 1, h, w)
            self._cache[key] = scale = scale.to(term.device)
        images = scale.shape[0]
        if term.shape[0] % images:
            raise ValueError(f"{target}: {term.shape[0]} batch rows for {images} images")
        return scale.repeat(term.shape[0] // images, *([1] * (scale.dim() - 1)))


class RegionalCrossAttention:
    """Each cross-attention layer run once per pass, its outputs fused by the masks.

    A forward pre-hook repeats the layer's (R, N, C) queries once per pass and gives each
    block its pass's context; the runtime routes each pass's LoRAs to its block (``rows``, regions off);
    the forward hook returns ``sum_p mask_p * out_p`` (R, N, C). Use as a context manager: the
    hooks are removed and the runtime's routing restored on exit, also on errors.

    contexts: (P, R, T, C) per pass, rows as the UNet's batch ([uncond, cond]).
    masks: (P, B, 1, h, w) fusion weights summing to 1 over passes (``update``).
    """

    def __init__(self, modules, runtime, lora_sets, contexts: torch.Tensor, latent_hw: tuple[int, int]):
        self.modules = list(modules)
        self.runtime = runtime
        self.lora_sets = [sorted(s) for s in lora_sets]
        self.contexts = contexts
        self.latent_hw = tuple(latent_hw)
        self.masks: torch.Tensor | None = None
        self._handles = []
        self._routing = []

    def update(self, masks: torch.Tensor) -> None:
        self.masks = masks.float()

    def __enter__(self):
        try:
            for module in self.modules:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        while self._routing:  # a layer that raised never reached its forward hook
            self._routing.pop().close()

    def _pre_hook(self, module, args, kwargs):
        hidden, own_context = layer_inputs(args, kwargs)
        passes, rows = self.contexts.shape[:2]
        if hidden.dim() != 3 or hidden.shape[0] != rows:
            raise ValueError(f"regional cross-attention: a layer got {tuple(hidden.shape)} for {rows} batch rows")
        dtype = hidden.dtype if own_context is None else own_context.dtype
        context = self.contexts.flatten(0, 1).to(device=hidden.device, dtype=dtype)  # (P*R, T, C)
        hidden = hidden.repeat(passes, 1, 1)  # (P*R, N, C) pass-major
        args, kwargs = list(args), dict(kwargs)
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states" if "hidden_states" in kwargs else "x"] = hidden
        if len(args) > 1:
            args[1] = context
        else:
            kwargs["encoder_hidden_states" if "encoder_hidden_states" in kwargs or "hidden_states" in kwargs
                   else "context"] = context
        routing = ExitStack()  # each pass's LoRAs on its block, unscaled, for this layer's call
        routing.enter_context(self.runtime.regions(None))
        routing.enter_context(self.runtime.rows(self.lora_sets))
        self._routing.append(routing)
        return tuple(args), kwargs

    def _post_hook(self, module, args, kwargs, output):
        self._routing.pop().close()
        passes = self.contexts.shape[0]
        out = output.unflatten(0, (passes, -1))  # (P, R, N, C)
        images = self.masks.shape[1]
        hw = map_hw(out.shape[2], self.latent_hw)
        weights = self.masks.flatten(0, 1)
        if tuple(hw) != self.latent_hw:
            weights = F.interpolate(weights, size=tuple(hw), mode="area")
        weights = weights.view(passes, images, 1, -1).transpose(2, 3)  # (P, B, N, 1)
        weights = weights.repeat(1, out.shape[1] // images, 1, 1).to(out.dtype)  # (P, R, N, 1)
        return (weights * out).sum(dim=0)

