"""Cross-attention probabilities for CLoRA, recomputed from each layer's own inputs.

Why recompute: hosts run fused attention kernels (SDPA, xformers, sub-quadratic) that never
materialise the softmax, and each host names and wires its attention differently. A forward
pre-hook sees the layer's inputs in every host (diffusers passes ``encoder_hidden_states``
as a keyword, A1111/Forge's ldm ``CrossAttention`` gets ``context``), and running them
through the layer's own ``to_q``/``to_k`` lets active LoRA runtime hooks apply, so the
probabilities are exactly those the layer uses. Only layers at the chosen query count are
read; the layers themselves are never modified.

Truncation: a loss pass needs nothing after the last layer it reads, so the capture can
raise ``StopForward`` from that layer's pre-hook; the forward (and the backward) then cover
only the UNet prefix up to it. The caller catches the exception.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import at_least_float32


class StopForward(Exception):
    """Raised from a pre-hook once every layer the capture reads has run."""


def cross_attention_modules(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attention layers: diffusers and ldm both name them ``attn2``."""
    return [module for name, module in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn2"]


def map_divisor(modules: list[nn.Module], run, latent_side: int, vae_scale_factor: int, preferred_side: int = 16) -> int:
    """The ``attention_res_divisor`` whose maps are the model's cross-attention resolution closest
    to ``preferred_side`` (the paper's 16x16) for a square latent of ``latent_side``; ``run()``
    runs the UNet once at that size (the layers' query counts are read from it)."""
    sides: set[int] = set()

    def pre_hook(module, args, kwargs):
        hidden, _ = layer_inputs(args, kwargs)
        if hidden is not None and hidden.dim() == 3:
            sides.add(round(hidden.shape[1] ** 0.5))

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for module in modules]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    levels = [k for k in range(12) if -(-latent_side // 2**k) in sides]
    if not levels:
        raise ValueError(f"no cross-attention layer ran at a {latent_side}x{latent_side} latent")
    best = min(levels, key=lambda k: abs(-(-latent_side // 2**k) - preferred_side))
    return vae_scale_factor * 2**best


def layer_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, context) of an attention call, diffusers or ldm calling convention."""
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    context = kwargs.get("encoder_hidden_states", kwargs.get("context"))
    if context is None and len(args) > 1:
        context = args[1]
    return hidden, context


def split_heads(module: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """(B, N, h*d) projected states -> (B, h, N, d)."""
    return states.unflatten(-1, (module.heads, -1)).transpose(1, 2)


def probs_of(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, averaged over heads: (B, N, T) float32."""
    scale = getattr(module, "scale", None) or query.shape[-1] ** -0.5  # Forge's CrossAttention has no .scale
    scores = at_least_float32(query) @ at_least_float32(key).transpose(-1, -2) * scale  # (B, h, N, T)
    return scores.softmax(dim=-1).mean(dim=1)


def attention_probs(module: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The layer's own cross-attention probabilities over the context tokens: (B, N, T) float32."""
    return probs_of(module, split_heads(module, module.to_q(hidden)), split_heads(module, module.to_k(context)))


class AttentionCapture:
    """Average cross-attention probabilities of the layers with ``query_count`` queries.

    modules: the cross-attention layers to watch (``cross_attention_modules``).
    stop_after: raise ``StopForward`` once this many matching layers have run (None: never).
    Assumes one call per layer per UNet run (the whole batch at once).
    Use as a context manager; the hooks are removed on exit, also on errors.
    """

    def __init__(self, modules: list[nn.Module], query_count: int, stop_after: int | None = None):
        self.modules = modules
        self.query_count = query_count
        self.stop_after = stop_after
        self.layers_seen = 0
        self._total: torch.Tensor | None = None  # (B, N, T) sum over layers
        self._handles = []

    def __enter__(self) -> "AttentionCapture":
        try:
            for module in self.modules:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def probs(self) -> torch.Tensor:
        """(B, N, T) probabilities averaged over the layers seen."""
        if self._total is None:
            raise ValueError(
                f"no cross-attention layer ran with {self.query_count} queries; choose an "
                "attention_res_divisor that matches one of the model's attention resolutions"
            )
        return self._total / self.layers_seen

    def layer_probs(self, module: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """What one layer adds to the average: its own probabilities (B, N, T)."""
        return attention_probs(module, hidden, context)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, context = layer_inputs(args, kwargs)
        if context is None or hidden.dim() != 3 or hidden.shape[1] != self.query_count:
            return None
        layer_probs = self.layer_probs(module, hidden, context)
        self._total = layer_probs if self._total is None else self._total + layer_probs
        self.layers_seen += 1
        if self.stop_after is not None and self.layers_seen >= self.stop_after:
            raise StopForward
        return None


def per_pass_maps(probs: torch.Tensor, num_passes: int) -> torch.Tensor:
    """(P*2B, N, T) pass-major [uncond B, cond B] rows -> (P, B, N, T), CFG halves averaged."""
    rows, query_count, tokens = probs.shape
    return probs.view(num_passes, 2, rows // (2 * num_passes), query_count, tokens).mean(dim=1)


class ProbeCapture(AttentionCapture):
    """Average probabilities of the layers' queries against other contexts than the layer's own.

    probes: per subject, (its own conditioning's context (B, T, C), a context manager factory
        under which the layer's ``to_k`` runs with that subject's LoRAs). rows: the batch rows
        whose queries are read (the cond half of a [uncond, cond] pass).
    ``probs``: (G, B, N, T), what each subject's own pass would attend to from these queries.
    Why: a single pass has one prompt whose end-of-text states summarise every subject at
    once; a subject's own encoding still has a localised summary of it (toy world: its EOS map
    holds 2-7x the object's share of attention mass where its word's map holds ~1x).
    """

    def __init__(self, modules, query_count, probes, rows: slice):
        super().__init__(modules, query_count)
        self.probes = list(probes)
        self.rows = rows

    def layer_probs(self, module, hidden, context):
        query = split_heads(module, module.to_q(hidden[self.rows]))  # (B, h, N, d)
        per_subject = []
        for probe_context, keys_context in self.probes:
            with keys_context():
                key = split_heads(module, module.to_k(probe_context.to(device=context.device, dtype=context.dtype)))
            per_subject.append(probs_of(module, query, key))  # (B, N, T)
        return torch.stack(per_subject)
