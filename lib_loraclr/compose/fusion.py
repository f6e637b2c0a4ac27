"""Masked fusion of the passes' model outputs, CFG, and which LoRAs each pass runs.

Each LoRA pass owns the pixels its concept attends to; the base pass (no LoRA) owns the
rest; pixels claimed by several passes are shared equally. Per pixel the weights are >= 0
and sum to 1, so fusion is a convex combination of the passes' predictions.

Why the same fusion is valid for noise (eps) and x0 predictions: all passes see the same
latent x_t, and at a fixed step every sampler update (and the eps <-> x0 conversion
``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``) is affine in the model output, applied per
pixel with coefficients shared by all passes. An affine map commutes with a convex
combination, so fusing x0 predictions equals fusing eps predictions and converting, and
the updated latent is the same fusion of the per-pass updates. Likewise CFG is linear, so
fusing uncond and cond separately and then combining equals fusing the guided outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .concepts import ConceptPlan


def map_hw(query_count: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) with h * w == query_count whose aspect is closest to the latent's."""
    height, width = latent_hw
    factors = [(h, query_count // h) for h in range(1, query_count + 1) if query_count % h == 0]
    return min(factors, key=lambda hw: abs(hw[0] * width - hw[1] * height) / (hw[1] * height))


@torch.no_grad()
def concept_masks(
    attn_probs: torch.Tensor, plan: ConceptPlan, threshold: float, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Per-pass fusion weights from the passes' attention maps.

    attn_probs: (P, HW, T) or per image (P, B, HW, T), as for ``gather_token_maps``.
    threshold: alpha; a token's mask is ``map >= alpha * max(map)``; a pass's mask is the
        union over its ``mask_positions``; pass 0 (base) covers what no LoRA mask covers.
    Returns float weights (P, 1, H, W) or (P, B, 1, H, W) at ``latent_hw`` (nearest
    upsampling), summing to 1 over passes at every pixel (overlaps averaged).
    """
    batched = attn_probs.dim() == 4
    probs = attn_probs if batched else attn_probs.unsqueeze(1)  # (P, B, HW, T)
    num_passes, batch, query_count, _ = probs.shape
    if num_passes != len(plan.passes):
        raise ValueError(f"attn_probs has {num_passes} passes, the plan has {len(plan.passes)}")
    map_h, map_w = map_hw(query_count, latent_hw)

    owned = torch.zeros(num_passes, batch, query_count, dtype=torch.bool, device=probs.device)
    for p, compose_pass in enumerate(plan.passes):
        if not compose_pass.mask_positions:
            continue
        token_maps = probs[p][..., list(compose_pass.mask_positions)]  # (B, HW, K)
        peak = token_maps.amax(dim=1, keepdim=True)  # (B, 1, K)
        owned[p] = (token_maps >= threshold * peak).any(dim=-1)
    lora_passes = [p for p, compose_pass in enumerate(plan.passes) if compose_pass.mask_positions]
    base_passes = [p for p in range(num_passes) if p not in lora_passes]
    uncovered = ~owned[lora_passes].any(dim=0) if lora_passes else torch.ones_like(owned[0])
    owned[base_passes] = uncovered

    weights = owned.float()
    weights = weights / weights.sum(dim=0, keepdim=True)  # every pixel has >= 1 owner
    weights = weights.view(num_passes * batch, 1, map_h, map_w)
    weights = F.interpolate(weights, size=tuple(latent_hw), mode="nearest")
    weights = weights.view(num_passes, batch, 1, *latent_hw)
    return weights if batched else weights.squeeze(1)


@torch.no_grad()
def exclusive_masks(subject_maps: torch.Tensor, threshold: float, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Fusion weights with one owner per pixel: the subject whose map, relative to its own peak, is
    highest there, if that is >= ``threshold``; the base pass owns the rest.

    Why: with the union rule every map of a weakly localised token clears ``alpha * max`` over
    most of the image, so the masks overlap almost everywhere and each LoRA is averaged with
    the others instead of owning its subject (toy world: masks covered 80-89% of the image).
    subject_maps: (G, B, HW) one map per subject. Returns (1 + G, B, 1, H, W) in pass order
    (base first), nearest-upsampled to ``latent_hw``.
    """
    subjects, batch, query_count = subject_maps.shape
    map_h, map_w = map_hw(query_count, latent_hw)
    relative = subject_maps / subject_maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (G, B, HW)
    best, owner = relative.max(dim=0)  # (B, HW)
    weights = torch.zeros(1 + subjects, batch, query_count, device=subject_maps.device)
    owned = best >= threshold
    weights[1:] = (F.one_hot(owner, subjects).movedim(-1, 0) * owned).float()
    weights[0] = (~owned).float()
    weights = F.interpolate(weights.view(-1, 1, map_h, map_w), size=tuple(latent_hw), mode="nearest")
    return weights.view(1 + subjects, batch, 1, *latent_hw)


def subject_maps(attn_probs: torch.Tensor, plan: ConceptPlan) -> torch.Tensor:
    """(P, B, HW, T) passes' probabilities -> (G, B, HW): each LoRA pass's mean map over its mask tokens."""
    return torch.stack([attn_probs[p][..., list(cp.mask_positions)].mean(dim=-1)
                        for p, cp in enumerate(plan.passes) if cp.mask_positions])


def uniform_masks(num_passes: int, latent_hw: tuple[int, int], device=None) -> torch.Tensor:
    """(P, 1, H, W) equal weights 1/P: the ``use_masks=False`` path (plain average)."""
    return torch.full((num_passes, 1, *latent_hw), 1.0 / num_passes, device=device)


def fuse(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_p masks_p * preds_p.

    preds: (P, B, C, H, W) per-pass model outputs (eps or x0; uncond and cond fused in
        separate calls). masks: (P, 1, H, W) shared by all images, or (P, B|1, 1, H, W).
    Returns (B, C, H, W).
    """
    if masks.dim() == 4:
        masks = masks.unsqueeze(1)
    if masks.shape[0] != preds.shape[0] or masks.shape[-2:] != preds.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit predictions {tuple(preds.shape)}")
    return (masks.to(preds.dtype) * preds).sum(dim=0)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def pass_lora_sets(
    plan: ConceptPlan, style_loras: Mapping[int, Sequence[int] | None] | None = None
) -> list[frozenset[int]]:
    """The LoRA indices each pass runs with: its subject LoRA plus the applicable styles.

    style_loras: style LoRA index (the caller's numbering, distinct from the subject
        indices 0..N-1 of the plan) -> None for a global style (every pass, base included,
        so it covers the whole image), or the concept groups it is limited to (it then runs
        only in those concepts' passes, so it lands only inside their masks).
    """
    style_loras = dict(style_loras or {})
    subjects = {p.lora_index for p in plan.passes if p.lora_index is not None}
    for style, groups in style_loras.items():
        if style in subjects:
            raise ValueError(f"style LoRA index {style} is also a subject LoRA of the plan")
        unknown = [g for g in groups or () if not 0 <= g < len(plan.groups)]
        if unknown:
            raise ValueError(f"style LoRA {style} limited to unknown concept group(s) {unknown}")
    sets = []
    for compose_pass in plan.passes:
        active = {s for s, groups in style_loras.items() if groups is None}
        if compose_pass.lora_index is not None:
            active.add(compose_pass.lora_index)
            active |= {s for s, groups in style_loras.items() if groups and compose_pass.lora_index in groups}
        sets.append(frozenset(active))
    return sets
