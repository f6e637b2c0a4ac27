"""Single-pass composition: every subject LoRA in one UNet evaluation, each kept to its region.

After FreeFuse (2025): instead of one full UNet pass per LoRA fused by masks (CLoRA), one pass
per step (cond and uncond batched as usual) in which each subject LoRA's output is multiplied
by its subject's mask (``regions.RegionRouter``), approximating each LoRA run alone in its own
region. Where the prompt enters (the cross-attention layers) the approximation is made exact
at small cost: each region attends to its own pass's conditioning through its own LoRAs
(``regions.RegionalCrossAttention``), so a LoRA's text-encoder part acts in its region only.
Measured in the toy world (``bench/toyworld``): the variant that applied each text-encoder
LoRA to its own tokens of one shared prompt and token-masked the k/v LoRAs kept 0.40 pair
fidelity against 0.49 for this one, on the same images.

Masks: one owner per pixel (``fusion.exclusive_masks``) from the previous step's maps of each
subject's words, trigger and end-of-text token, read with the pass's queries against the
subject's own conditioning (``attention.ProbeCapture``); step i is routed by step i-1's maps.
The first ``warmup_steps`` give the whole image to the base pass; the next ``layout_steps``
give each subject a fixed stripe (``stripe_masks``), so that two subjects start as two objects
before their maps route them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch import nn

from ..model import at_least_float32
from ..runtime import LoraRuntime
from .attention import ProbeCapture
from .concepts import ConceptPlan
from .engine import PassConditioning, RunUnet, StepEngine, StepResult, check_finite
from .fusion import cfg_combine, exclusive_masks
from .regions import RegionalCrossAttention, RegionRouter
from .settings import ComposeSettings


def lora_regions(plan: ConceptPlan, lora_sets: Sequence[frozenset[int]]) -> dict[int, tuple[int, ...]]:
    """LoRA index -> the subjects whose region it follows; LoRAs of the base pass (global styles) are absent."""
    regions: dict[int, list[int]] = {}
    for compose_pass, lora_set in zip(plan.passes, lora_sets):
        for lora in lora_set:
            if compose_pass.lora_index is None:
                regions[lora] = None
            elif regions.get(lora, []) is not None:
                regions.setdefault(lora, []).append(compose_pass.lora_index)
    return {lora: tuple(sorted(groups)) for lora, groups in regions.items() if groups is not None}


def stripe_masks(passes: int, subject_passes: Sequence[int], batch: int, latent_hw: tuple[int, int],
                 device=None) -> torch.Tensor:
    """(passes, B, 1, h, w) one-hot masks: subject g owns the g-th of equal stripes along the longer side.

    Stripes run left to right (top to bottom when the latent is taller than wide); the base
    pass (and any pass not listed) owns nothing.
    """
    height, width = latent_hw
    along_width = width >= height
    side = width if along_width else height
    masks = torch.zeros(passes, batch, 1, height, width, device=device)
    for g, p in enumerate(subject_passes):
        start, stop = (k * side // len(subject_passes) for k in (g, g + 1))
        stripe = masks[p, ..., start:stop] if along_width else masks[p, ..., start:stop, :]
        stripe.fill_(1.0)
    return masks


class MaskedLoraEngine(StepEngine):
    """Single-pass composition for one generation: call ``step`` once per denoising step.

    Same interface and arguments as ``engine.ComposeEngine`` (the plan must be a one-prompt
    plan, ``concepts.plan_one_prompt``); the latent is never updated here, so no gradient is
    taken and ``grad_context`` is accepted only for that shared interface. ``StepResult.masks``
    are the masks the step's maps give, which route the next step (and show in the previews).
    """

    def __init__(
        self,
        plan: ConceptPlan,
        settings: ComposeSettings,
        runtime: LoraRuntime,
        lora_sets: Sequence[frozenset[int]],
        attention_modules: list[nn.Module],
        num_steps: int,
        *,
        vae_scale_factor: int = 8,
        grad_context: Callable | None = None,
    ):
        if len({p.clean_prompt for p in plan.passes}) != 1:
            raise ValueError("the single-pass composition needs one prompt for every subject (plan_one_prompt)")
        super().__init__(plan, settings, runtime, lora_sets, attention_modules, vae_scale_factor)
        self.warmup_steps = min(settings.warmup_steps, num_steps)
        self.layout_until = settings.layout_until(num_steps)
        self.subject_passes = [i for i, p in enumerate(plan.passes) if p.lora_index is not None]
        self._regions = lora_regions(plan, self.lora_sets)
        # a subject's map: its words, trigger and end-of-text token in its own pass's encoding
        self.probe_tokens = [plan.passes[p].mask_positions + (plan.passes[p].end_position,) for p in self.subject_passes]
        self._router: RegionRouter | None = None
        self._masks: torch.Tensor | None = None  # (P, B, 1, h, w) for the next step
        self._pass_contexts: tuple[PassConditioning, torch.Tensor] | None = None

    def step(
        self,
        step_index: int,
        latent: torch.Tensor,
        timestep,
        conditioning: PassConditioning,
        run_unet: RunUnet,
    ) -> StepResult:
        """One UNet pass with each subject LoRA in its region, CFG; the maps give the next regions."""
        self._check(latent, conditioning)
        latent = latent.detach()
        batch, latent_hw = latent.shape[0], tuple(latent.shape[-2:])
        router, masks = self._state_for(batch, latent_hw, latent.device)
        if step_index < self.warmup_steps:  # base only: the subjects' maps form without their LoRAs in the image
            masks = torch.zeros_like(masks)
            masks[0] = 1.0
        elif step_index < self.layout_until:
            masks = stripe_masks(len(self.plan.passes), self.subject_passes, masks.shape[1], latent_hw, masks.device)
        router.update(masks[1:])
        query_count = self.settings.query_count(latent_hw, self.vae_scale_factor)
        probes = [(conditioning.conds[p].context, partial(self._own_keys, self.lora_sets[p])) for p in self.subject_passes]
        capture = ProbeCapture(self.attention_modules, query_count, probes, slice(batch, 2 * batch))
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(self.runtime.regions(router))
            stack.enter_context(capture)  # before the regional hooks: it reads the layer's own inputs
            regional = stack.enter_context(RegionalCrossAttention(
                self.attention_modules, self.runtime, self.lora_sets, self._contexts(conditioning), latent_hw))
            regional.update(masks)
            # the base pass's conditioning: every cross-attention layer swaps in each pass's own
            prediction = run_unet(torch.cat([latent, latent]), timestep, conditioning.pass_batch(0))
        prediction = at_least_float32(prediction)
        probs = capture.probs  # (G, B, N, T)
        maps = torch.stack([probs[g][..., list(tokens)].mean(dim=-1) for g, tokens in enumerate(self.probe_tokens)])
        self._masks = exclusive_masks(maps, self.settings.mask_threshold, latent_hw)  # (P, B, 1, h, w)
        guided = cfg_combine(prediction[:batch], prediction[batch:], self.settings.guidance_scale)
        check_finite(guided, f"the model's prediction at step {step_index}")
        return StepResult(latent, guided, self._masks, [])

    def _state_for(self, batch: int, latent_hw: tuple[int, int], device) -> tuple[RegionRouter, torch.Tensor]:
        """The router and masks of this latent size; a new size (a hires pass) starts again from even masks."""
        if self._router is None or self._router.latent_hw != latent_hw or self._masks.shape[1] != batch:
            self._router = RegionRouter(self._regions, len(self.subject_passes), latent_hw)
            passes = len(self.plan.passes)
            self._masks = torch.full((passes, batch, 1, *latent_hw), 1.0 / passes, device=device)
        return self._router, self._masks

    def _contexts(self, conditioning: PassConditioning) -> torch.Tensor:
        """(P, 2B, T, C) every pass's [uncond, cond] context, stacked once per conditioning."""
        if self._pass_contexts is None or self._pass_contexts[0] is not conditioning:
            stacked = torch.stack([conditioning.pass_batch(p).context for p in range(conditioning.num_passes)])
            self._pass_contexts = (conditioning, stacked)
        return self._pass_contexts[1]

    @contextmanager
    def _own_keys(self, lora_set):
        """A subject's own pass's LoRAs everywhere, for the keys of its probe."""
        with self.runtime.regions(None), self.runtime.active(lora_set):
            yield
