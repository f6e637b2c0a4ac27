"""The CLoRA knobs in one place, so the CLI, the tab, the API and infotext share the names.

Defaults are those of the CLoRA paper (``papers/clora-2024.txt``) and the authors' code
(gemlab-vt/clora); see ``/work/shared/REFERENCE.md``; the masked mode's were measured in the
toy world (``bench/toyworld``). Step-indexed defaults were chosen for
a 50-step schedule and are rescaled to the step count actually sampled.
"""

from __future__ import annotations

import math
from typing import Literal, Tuple

from ..validation import StrictBool, checked, integer, real


# Upper bounds keep a typo from making a generation endless or its latent overflow.
StepIndex = integer(ge=0, le=1000)
METHODS = ("clora", "masked")  # one UNet pass per LoRA fused by masks | one pass, masked LoRA outputs


@checked(frozen=True, what="composition settings", unknown="setting")
class ComposeSettings:
    """Composition settings; the annotations are the one check of each value (``validation.checked``).

    method: "masked" (default: one UNet pass per step, each subject LoRA's output multiplied
        by its attention mask; ``compose.masked``: about plain sampling's cost, and the better
        mode in the toy world) or "clora" (the paper: one UNet pass per LoRA plus a base pass,
        fused by attention masks, with the contrastive latent update). The latent-update and
        refinement settings apply to "clora" only.
    warmup_steps: "masked" only: the first steps run without the subject LoRAs in the image
        layers, to form the first masks (0: none; the layout below forms them instead).
    layout_steps: "masked" only: after the warm-up, this many steps (of ``reference_steps``,
        rescaled: 8 of 50 is 3 of 20) give each subject a fixed stripe of the image, in row
        order, left to right (top to bottom in a portrait image), before the attention maps
        take over. Why: a prompt of unknown words often starts as one object, and maps read
        from it put every subject on that one object. In the toy world pair fidelity at
        N = 2 / 3 / 4 rose from 0.47 / 0.43 / 0.47 and 0.58 / 0.49 / 0.52 to 0.71 / 0.50 / 0.52
        and 0.69 / 0.53 / 0.55 (held-out seeds 5000 and 7100, 12 each), and from 0.52 / 0.43 /
        0.47 to 0.55 / 0.44 / 0.49 on 36 fresh seeds (9000-9035), bleeding about the same.

    step_size: latent update ``z <- z - step_size * grad_z L``; 20, constant over steps (code).
    temperature: InfoNCE temperature of the contrastive loss; 0.5 (paper, section 4.2.3).
    max_iter_to_alter: the latent is updated at steps ``i < max_iter_to_alter``; 30 of 50 in
        the code (the notebook uses 50 of 100); the paper limits updates to early steps.
    reference_steps: the step count the step-indexed defaults were set for (50, code).
    refinement_steps: steps at which the passes + update are repeated ``refinement_iters``
        more times; {0, 10, 20} of 50 (code, following Attend-and-Excite).
    refinement_iters: extra update iterations at each refinement step; 20 (code).
    mask_threshold: alpha of ``mask = map >= alpha * max(map)``; 0.3 (code default; the
        notebook uses 0.4).
    exclusive_masks: "clora": give each pixel to the one subject whose map (relative to its
        peak) is highest there, if >= alpha (``fusion.exclusive_masks``; "masked" always
        does). Off: the paper's union masks with overlaps averaged, which in the toy world
        covered 80-89% of the image for every subject, so the LoRAs were averaged instead of
        separated (pair fidelity 0.19 union vs 0.47 exclusive on the same 12 images).
    attention_res_divisor: maps come from cross-attention layers whose query count is
        (H/32)*(W/32) for an HxW image: 16x16 at 512px, SD1.5's 2 down + 3 up layers (code).
        A setting so tiny test models and other architectures can pick another resolution.
    use_latent_update: run the contrastive latent update (the paper's attention refinement).
    use_masks: fuse passes with attention masks; off = plain per-pass average (ablation).
    guidance_scale: classifier-free guidance scale; 7.5 (code, diffusers' SD default).
    """

    method: Literal[METHODS] = "masked"
    warmup_steps: StepIndex = 0
    layout_steps: StepIndex = 8
    step_size: real(ge=0, le=1000) = 20.0
    temperature: real(gt=0, le=100) = 0.5
    max_iter_to_alter: StepIndex = 30
    reference_steps: integer(ge=1, le=1000) = 50
    refinement_steps: Tuple[StepIndex, ...] = (0, 10, 20)
    refinement_iters: integer(ge=0, le=100) = 20
    mask_threshold: real(gt=0, le=1) = 0.3
    attention_res_divisor: integer(ge=1, le=256) = 32
    use_latent_update: StrictBool = True
    use_masks: StrictBool = True
    exclusive_masks: StrictBool = True
    guidance_scale: real(ge=0, le=100) = 7.5

    def _scaled(self, step: int, num_steps: int) -> int:
        # Round half up: 30 of 50 -> 12 of 20, 10 of 50 -> 5 of 25.
        return math.floor(step * num_steps / self.reference_steps + 0.5)

    def alter_until(self, num_steps: int) -> int:
        """Latent updates run at steps ``i < alter_until(num_steps)`` (same fraction as 30/50)."""
        return min(num_steps, self._scaled(self.max_iter_to_alter, num_steps))

    def layout_until(self, num_steps: int) -> int:
        """Steps ``warmup_steps <= i < layout_until(num_steps)`` are routed by the fixed layout."""
        warmup = min(self.warmup_steps, num_steps)
        return min(num_steps, warmup + self._scaled(self.layout_steps, num_steps))

    def refinement_steps_for(self, num_steps: int) -> tuple[int, ...]:
        """The refinement steps rescaled to ``num_steps`` (sorted, unique, < num_steps)."""
        scaled = {self._scaled(s, num_steps) for s in self.refinement_steps}
        return tuple(sorted(s for s in scaled if s < num_steps))

    def attention_map_hw(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the attention maps used for an image of height x width pixels.

        Ceil division, because the UNet's stride-2 convolutions round up odd sizes.
        """
        d = self.attention_res_divisor
        return -(-height // d), -(-width // d)

    def query_count(self, latent_hw: tuple[int, int], vae_scale_factor: int) -> int:
        """Query count (map_h * map_w) of the cross-attention layers the maps are read from."""
        map_h, map_w = self.attention_map_hw(*(side * vae_scale_factor for side in latent_hw))
        return map_h * map_w
