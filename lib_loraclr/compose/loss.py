"""CLoRA's contrastive objective on cross-attention maps (InfoNCE / NT-Xent).

Maps of the same concept group (the concept word and the LoRA trigger, in every pass's
prompt) are pulled together; maps of different groups are pushed apart, which is what
separates the subjects in the image. The latent update differentiates this loss, so
everything here is plain differentiable torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..model import at_least_float32
from .concepts import ConceptPlan

_EPS = 1e-12


def contrastive_attention_loss(
    maps: torch.Tensor, labels: torch.Tensor | Sequence[int], temperature: float = 0.5
) -> torch.Tensor:
    """InfoNCE over attention maps, averaged over ordered positive pairs.

    maps: (..., M, HW) one flattened attention map per (group, pass, token); leading dims
        (e.g. the image batch) give independent losses.
    labels: (M,) concept-group id of each map.
    Returns (...) losses: for every ordered pair (a, p), a != p, same label,
    ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n: other label} e^{s_an/t}))`` with s the cosine
    similarity of min-max normalised maps, averaged over the pairs. A single group has no
    negatives and gives 0. Computed in float32 with logsumexp for stability.
    """
    labels = torch.as_tensor(labels, device=maps.device)
    if labels.dim() != 1 or labels.shape[0] != maps.shape[-2]:
        raise ValueError(f"labels must have shape ({maps.shape[-2]},), got {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]  # (M, M)
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=maps.device)
    if not positive.any():
        raise ValueError("contrastive loss needs a group with at least two maps (no positive pair)")

    maps = at_least_float32(maps)
    low = maps.amin(dim=-1, keepdim=True)
    high = maps.amax(dim=-1, keepdim=True)
    normalised = (maps - low) / (high - low).clamp_min(_EPS)
    unit = F.normalize(normalised, dim=-1, eps=_EPS)
    logits = unit @ unit.transpose(-1, -2) / temperature  # (..., M, M) = s / t

    # log sum_n exp(s_an / t) over each anchor's negatives; -inf-free so gradients stay finite
    floor = torch.finfo(logits.dtype).min
    negatives_lse = logits.masked_fill(same, floor).logsumexp(dim=-1, keepdim=True)  # (..., M, 1)
    pair_losses = torch.logaddexp(logits, negatives_lse) - logits  # (..., M, M)
    return pair_losses[..., positive].mean(dim=-1)


def gather_token_maps(attn_probs: torch.Tensor, plan: ConceptPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick every concept token's map out of the passes' cross-attention probabilities.

    attn_probs: (P, HW, T) or per image (P, B, HW, T): each pass's softmax probabilities over
        the T (77) tokens, averaged over the chosen layers, heads and CFG halves.
    Returns maps (M, HW) or (B, M, HW), and labels (M,) long, ready for
    ``contrastive_attention_loss``; order follows ``plan.token_entries()``.
    """
    if attn_probs.dim() not in (3, 4):
        raise ValueError(f"attn_probs must be (P, HW, T) or (P, B, HW, T), got {tuple(attn_probs.shape)}")
    pass_ids, positions, labels = plan.token_entries()
    if attn_probs.shape[0] != len(plan.passes):
        raise ValueError(f"attn_probs has {attn_probs.shape[0]} passes, the plan has {len(plan.passes)}")
    if max(positions) >= attn_probs.shape[-1]:
        raise ValueError(f"token position {max(positions)} outside attention over {attn_probs.shape[-1]} tokens")
    device = attn_probs.device
    pass_index = torch.tensor(pass_ids, device=device)
    token_index = torch.tensor(positions, device=device)
    if attn_probs.dim() == 3:
        maps = attn_probs[pass_index, :, token_index]  # (M, HW)
    else:
        maps = attn_probs[pass_index, :, :, token_index].movedim(0, -2)  # (M, B, HW) -> (B, M, HW)
    return maps, torch.tensor(labels, device=device)
