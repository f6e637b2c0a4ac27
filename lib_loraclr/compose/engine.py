"""CLoRA's per-denoising-step work, the one object every host calls once per step.

A host owns the sampler and the UNet call; the engine owns everything CLoRA adds to a step:
the contrastive latent update, the per-pass UNet runs with their LoRA sets, the masks and
the fusion. It never sees a scheduler: it gets the latent the UNet is fed, an opaque
timestep and ``run_unet(latent_batch, timestep, cond_batch) -> prediction`` (noise or x0:
fusion is affine-invariant, see ``fusion``), and returns the updated latent and the fused,
guided prediction.

Batch layout of every multi-pass UNet call: pass-major, each pass [uncond B, cond B], so
``LoraRuntime.set_rows`` with one row set per pass gives each pass its LoRAs in one call.

Two modes with the same math:
- "fast": the P passes run as one batched UNet call; loss passes stop after the last
  cross-attention layer they read (``StopForward``), so forward and backward cover only that
  prefix; autograd graphs live only inside one update.
- "authors": the reference implementation's way, for benchmarks and tests: one full UNet
  run per pass, the loss backpropagated through all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import Conditioning, at_least_float32
from ..runtime import LoraRuntime
from .attention import AttentionCapture, StopForward, per_pass_maps
from .concepts import ConceptPlan
from .fusion import cfg_combine, concept_masks, exclusive_masks, fuse, subject_maps, uniform_masks
from .loss import contrastive_attention_loss, gather_token_maps
from .settings import ComposeSettings

RunUnet = Callable[[torch.Tensor, object, Conditioning], torch.Tensor]
MODES = ("fast", "authors")


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Treat float32 subnormals as zero on the CPU while differentiating attention maps.

    Why: the backward of a near-saturated softmax fills the gradients with subnormal values,
    which x86 CPUs process over 100x slower (measured: a 0.6 s update took 90 s). Values
    under 1.2e-38 do not change the result. CUDA is unaffected. The flag is process-wide
    and has no getter, so it is set back to torch's default (off) afterwards.
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class NonFiniteError(ValueError):
    """NaN or Inf where an image is being formed: stop with a message instead of drawing a black image."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(
            f"{what} holds NaN or infinite values, so the image would be black: lower the latent update "
            "step size, the LoRA weights or the prompt's emphasis weights, or check the LoRA files and the checkpoint"
        )


@dataclass(eq=False)
class PassConditioning:
    """Each pass's cond and uncond conditioning, (B, 77, C) each, encoded with its own LoRAs."""

    conds: list[Conditioning]
    unconds: list[Conditioning]
    _all: Conditioning | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.conds or len(self.conds) != len(self.unconds):
            raise ValueError(f"{len(self.conds)} cond and {len(self.unconds)} uncond passes; need equal, >= 1")
        sizes = {c.context.shape[0] for c in self.conds + self.unconds}
        if len(sizes) != 1:
            raise ValueError(f"every pass needs the same batch size, got {sorted(sizes)}")

    @property
    def num_passes(self) -> int:
        return len(self.conds)

    @property
    def batch_size(self) -> int:
        return self.conds[0].context.shape[0]

    def pass_batch(self, index: int) -> Conditioning:
        """(2B, 77, C) [uncond, cond] of one pass."""
        return Conditioning.cat([self.unconds[index], self.conds[index]])

    def all_passes(self) -> Conditioning:
        """(2PB, 77, C) pass-major batch of every pass, built once."""
        if self._all is None:
            self._all = Conditioning.cat([self.pass_batch(p) for p in range(self.num_passes)])
        return self._all


@torch.no_grad()
def encode_passes(
    encode: Callable[[list[str]], Conditioning],
    runtime: LoraRuntime,
    plan: ConceptPlan,
    lora_sets: Sequence[frozenset[int]],
    negative_prompt: str = "",
    batch_size: int = 1,
) -> PassConditioning:
    """Encode each pass's prompt and negative prompt with only that pass's LoRAs active.

    Why per pass: a LoRA's text-encoder part belongs to its own prompt only; encoding pass k
    with LoRA k's text-encoder layers is what the reference does. ``encode`` is the host's
    prompt encoder (``ModelAccess.encode``); prompts are the plan's clean prompts.
    """
    conds, unconds = [], []
    for index, (compose_pass, lora_set) in enumerate(zip(plan.passes, lora_sets)):
        with runtime.active(lora_set):
            both = encode([negative_prompt] * batch_size + [compose_pass.clean_prompt] * batch_size)
        cond = both.select(slice(batch_size, 2 * batch_size))
        cond.context = apply_emphasis(cond.context, compose_pass.token_weights)
        check_finite(cond.context, f"the conditioning of pass {index} ({compose_pass.clean_prompt!r})")
        unconds.append(both.select(slice(0, batch_size)))
        conds.append(cond)
    return PassConditioning(conds, unconds)


# SDXL's context is CLIP-L's states (768) next to OpenCLIP-G's (1280); A1111 weights each on its own.
_ENCODER_WIDTHS = {2048: (768, 1280)}


def apply_emphasis(context: torch.Tensor, token_weights: Sequence[float]) -> torch.Tensor:
    """A1111's "Original" emphasis on (B, T, C) states: token t (BOS at 0) times its weight, then
    each encoder's states rescaled to their mean before weighting. Unchanged when every weight is 1.
    States whose mean is rounding noise (a LayerNorm without bias) are left unrescaled: dividing by
    it would blow them up by ~1e8 while staying finite.

    Why here and not in the host: the passes' prompts reach the text encoders without A1111
    syntax (the plan's token positions are those of the clean prompt), on every host.
    """
    if all(weight == 1.0 for weight in token_weights):
        return context
    multipliers = torch.ones(context.shape[1], dtype=context.dtype, device=context.device)
    multipliers[1 : 1 + len(token_weights)] = torch.tensor(token_weights, dtype=context.dtype)
    blocks = []
    for block in context.split(list(_ENCODER_WIDTHS.get(context.shape[-1], (context.shape[-1],))), dim=-1):
        weighted = block * multipliers[None, :, None]
        mean = weighted.mean()
        degenerate = mean.abs() <= 1e-4 * weighted.abs().mean()
        blocks.append(weighted if degenerate else weighted * (block.mean() / mean))
    return torch.cat(blocks, dim=-1)


@dataclass
class StepResult:
    """latent: (B, C, h, w) after the latent updates; prediction: (B, C, h, w) fused + CFG,
    float32; masks: (P, B, 1, h, w) fusion weights; losses: (B,) loss before each update."""

    latent: torch.Tensor
    prediction: torch.Tensor
    masks: torch.Tensor
    losses: list[torch.Tensor]


class StepEngine:
    """What every composition engine keeps and checks: the plan, its LoRA sets, the attention layers."""

    def __init__(self, plan: ConceptPlan, settings: ComposeSettings, runtime: LoraRuntime,
                 lora_sets: Sequence[frozenset[int]], attention_modules: list[nn.Module], vae_scale_factor: int):
        if len(lora_sets) != len(plan.passes):
            raise ValueError(f"{len(lora_sets)} LoRA sets for {len(plan.passes)} passes")
        if not attention_modules:
            raise ValueError("the UNet has no cross-attention (attn2) layers to read maps from")
        self.plan = plan
        self.settings = settings
        self.runtime = runtime
        self.lora_sets = [frozenset(s) for s in lora_sets]
        self.attention_modules = list(attention_modules)
        self.vae_scale_factor = vae_scale_factor

    def _check(self, latent: torch.Tensor, conditioning: PassConditioning) -> None:
        check_finite(latent, "the latent the sampler passed in")
        if conditioning.num_passes != len(self.plan.passes):
            raise ValueError(f"conditioning has {conditioning.num_passes} passes, the plan has {len(self.plan.passes)}")
        if latent.shape[0] != conditioning.batch_size:
            raise ValueError(f"latent batch {latent.shape[0]} != conditioning batch {conditioning.batch_size}")


class ComposeEngine(StepEngine):
    """CLoRA for one generation: call ``step`` once per denoising step.

    plan, lora_sets: from ``plan_concepts`` and ``pass_lora_sets`` (indices into runtime's LoRAs).
    attention_modules: the UNet's cross-attention layers (``cross_attention_modules``).
    num_steps: the sampled step count (the step-indexed settings are rescaled to it).
    vae_scale_factor: image pixels per latent pixel, to find the attention resolution.
    mode: "fast" or "authors" (see the module docstring).
    grad_context: entered around each loss pass's forward and backward; hosts whose weights
        are inference tensors (Forge) pass ``frozen_grad.GradThroughFrozen``.
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
        mode: str = "fast",
        grad_context: Callable[[], AbstractContextManager] = nullcontext,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown compose mode {mode!r}; expected one of {MODES}")
        super().__init__(plan, settings, runtime, lora_sets, attention_modules, vae_scale_factor)
        self.mode = mode
        self.grad_context = grad_context
        self.alter_until = settings.alter_until(num_steps)
        self.refinement_steps = set(settings.refinement_steps_for(num_steps))
        self._layer_counts: dict[int, int] = {}  # query count -> matching layers in a full run

    def updates_at(self, step_index: int) -> int:
        """How many latent updates run at this step (0 when the loss has no negatives)."""
        settings = self.settings
        if (
            not settings.use_latent_update
            or settings.step_size == 0
            or len(self.plan.groups) < 2
            or step_index >= self.alter_until
        ):
            return 0
        return 1 + (settings.refinement_iters if step_index in self.refinement_steps else 0)

    def step(
        self,
        step_index: int,
        latent: torch.Tensor,
        timestep,
        conditioning: PassConditioning,
        run_unet: RunUnet,
    ) -> StepResult:
        """Update the latent (early steps), run the passes, fuse them, apply CFG."""
        self._check(latent, conditioning)
        latent = latent.detach()
        losses = []
        for _ in range(self.updates_at(step_index)):
            loss, grad = self.loss_and_grad(latent, timestep, conditioning, run_unet)
            latent = (latent - self.settings.step_size * grad.to(latent.dtype)).detach()
            losses.append(loss)
        check_finite(latent, f"the latent after step {step_index}'s update")
        with torch.no_grad():
            uncond, cond, probs = self._prediction_passes(latent, timestep, conditioning, run_unet)
        masks = self._masks(probs, latent)
        prediction = cfg_combine(fuse(uncond, masks), fuse(cond, masks), self.settings.guidance_scale)
        check_finite(prediction, f"the model's prediction at step {step_index}")
        return StepResult(latent, prediction, masks, losses)

    def loss_and_grad(
        self, latent: torch.Tensor, timestep, conditioning: PassConditioning, run_unet: RunUnet
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) contrastive loss at ``latent`` and its gradient (B, C, h, w) w.r.t. the latent."""
        self._check(latent, conditioning)
        # Hosts may sample under inference_mode (Forge) or no_grad (A1111).
        with torch.inference_mode(False), torch.enable_grad(), _flush_denormals(latent.device), self.grad_context():
            latent_leaf = latent.detach().clone().requires_grad_(True)
            probs = self._loss_maps(latent_leaf, timestep, conditioning, run_unet)  # (P, B, N, T)
            maps, labels = gather_token_maps(probs, self.plan)
            loss = contrastive_attention_loss(maps, labels, self.settings.temperature)  # (B,)
            (grad,) = torch.autograd.grad(loss.sum(), latent_leaf)
        return loss.detach(), grad

    def _query_count(self, latent: torch.Tensor) -> int:
        return self.settings.query_count(tuple(latent.shape[-2:]), self.vae_scale_factor)

    def _run(self, latent_rows, timestep, cond_rows, run_unet, query_count, capture_maps, truncate):
        """One UNet call with optional capture; (prediction or None if stopped early, probs or None)."""
        if not capture_maps:
            return run_unet(latent_rows, timestep, cond_rows), None
        stop_after = self._layer_counts.get(query_count) if truncate else None
        capture = AttentionCapture(self.attention_modules, query_count, stop_after)
        with capture:
            try:
                prediction = run_unet(latent_rows, timestep, cond_rows)
            except StopForward:
                prediction = None
        if prediction is not None:
            self._layer_counts.setdefault(query_count, capture.layers_seen)
        return prediction, capture.probs

    def _loss_maps(self, latent, timestep, conditioning, run_unet) -> torch.Tensor:
        """(P, B, N, T) maps of every pass at ``latent``, differentiable w.r.t. it."""
        num_passes, query_count = conditioning.num_passes, self._query_count(latent)
        if self.mode == "fast":
            rows = latent.repeat(2 * num_passes, 1, 1, 1)  # (2PB, C, h, w)
            with self.runtime.rows([sorted(s) for s in self.lora_sets]):
                _, probs = self._run(rows, timestep, conditioning.all_passes(), run_unet, query_count, True, True)
            return per_pass_maps(probs, num_passes)
        per_pass = []
        for p in range(num_passes):
            with self.runtime.active(self.lora_sets[p]):
                _, probs = self._run(
                    torch.cat([latent, latent]), timestep, conditioning.pass_batch(p), run_unet, query_count, True, False
                )
            per_pass.append(per_pass_maps(probs, 1)[0])
        return torch.stack(per_pass)

    def _prediction_passes(self, latent, timestep, conditioning, run_unet):
        """Per-pass (uncond, cond) predictions (P, B, C, h, w) float32 and maps (P, B, N, T) or None."""
        num_passes, batch = conditioning.num_passes, conditioning.batch_size
        query_count, capture_maps = self._query_count(latent), self.settings.use_masks
        if self.mode == "fast":
            rows = latent.repeat(2 * num_passes, 1, 1, 1)
            with self.runtime.rows([sorted(s) for s in self.lora_sets]):
                prediction, probs = self._run(
                    rows, timestep, conditioning.all_passes(), run_unet, query_count, capture_maps, False
                )
            prediction = at_least_float32(prediction).view(num_passes, 2, batch, *latent.shape[1:])
            probs = None if probs is None else per_pass_maps(probs, num_passes)
        else:
            predictions, maps = [], []
            for p in range(num_passes):
                with self.runtime.active(self.lora_sets[p]):
                    pass_prediction, pass_probs = self._run(
                        torch.cat([latent, latent]), timestep, conditioning.pass_batch(p), run_unet,
                        query_count, capture_maps, False,
                    )
                predictions.append(at_least_float32(pass_prediction).view(2, batch, *latent.shape[1:]))
                if pass_probs is not None:
                    maps.append(per_pass_maps(pass_probs, 1)[0])
            prediction = torch.stack(predictions)
            probs = torch.stack(maps) if maps else None
        return prediction[:, 0], prediction[:, 1], probs

    def _masks(self, probs: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor:
        """(P, B, 1, h, w) fusion weights."""
        latent_hw = tuple(latent.shape[-2:])
        if probs is None:
            masks = uniform_masks(len(self.plan.passes), latent_hw, device=latent.device)
            return masks.unsqueeze(1).expand(-1, latent.shape[0], -1, -1, -1)
        if self.settings.exclusive_masks:
            return exclusive_masks(subject_maps(probs, self.plan), self.settings.mask_threshold, latent_hw)
        return concept_masks(probs, self.plan, self.settings.mask_threshold, latent_hw)
