"""``--method distill``: every layer's merged delta fitted at once, end to end, to what each
concept's own LoRA predicts on its own prompt.

Why: a per-layer fit (``loraclr``, ``lsq``) can only compromise where the concepts' layer
inputs overlap (the spatial UNet layers), and its errors compound through the network; the
end-to-end figure showed such merges further from the concepts than the base model. Here:

1. teacher: concept i's prompt sampled with its own LoRA (text encoder and UNet, guided as a
   user would), recording on the way the model input, the timestep and the noise its LoRA
   predicts for the prompt and for the empty prompt (``TeacherPool``);
2. pair teacher (``distill_pair_trajectories`` > 0): "<prompt i> and <prompt j>" sampled by
   the single-pass composition (``compose.masked``: each LoRA kept to its subject's region),
   recording the guided noise, so the loss also keeps one concept's attributes off the other's
   object, which no single-concept prompt can teach;
3. student: the model with ``MixedDeltas`` hooked on, its text encoder included, trained by
   Adam to predict the same noises on random draws from the pool.

Each layer's merged delta stays in the span of the concepts' own factors,
dW = U M D with U = [U_1 .. U_N] (D_out, K), D = [D_1; ..; D_N] (K, D_in) and a trained
(K, K) mix M that starts at the identity (plain stacking). So the solve cannot put weight in
directions no LoRA uses, the file is exact at rank K = sum of the ranks, and the trained
state is sum over layers of K^2 numbers, whatever the layers' widths.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..compose.attention import cross_attention_modules, map_divisor
from ..compose.concepts import LoraConcept, plan_one_prompt
from ..compose.engine import encode_passes
from ..compose.fusion import pass_lora_sets
from ..compose.masked import MaskedLoraEngine
from ..compose.settings import ComposeSettings
from ..frozen_grad import GradThroughFrozen
from ..lora.base import LoraFile
from ..lora.lowrank import LowRank
from ..model import Conditioning, ModelAccess
from ..progress import Progress
from ..runtime import LoraRuntime
from ..sampling import initial_noise, sample_steps, sigmas_for, trailing_timesteps


@dataclass
class TeacherPool:
    """Points on the teachers' sampling trajectories, on the CPU: S = prompts x trajectories x steps.

    A single point (``guided`` False) holds the concept's own LoRA's noise on its prompt and on
    the empty prompt; a pair point holds the composition's guided noise in ``eps_cond`` (its
    ``eps_uncond`` is not used)."""

    inputs: torch.Tensor  # (S, C, h, w) the UNet's input there (x / sqrt(1 + sigma^2))
    timesteps: torch.Tensor  # (S,)
    prompts: torch.Tensor  # (S,) which prompt's trajectory (an index into the training's prompt list)
    eps_cond: torch.Tensor  # (S, C, h, w) noise on the prompt (pair points: guided)
    eps_uncond: torch.Tensor  # (S, C, h, w) noise on the empty prompt (pair points: zeros)
    guided: torch.Tensor  # (S,) bool: a pair point

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inputs, self.eps_cond, self.eps_uncond))

    @staticmethod
    def cat(pools: list["TeacherPool"]) -> "TeacherPool":
        return TeacherPool(*(torch.cat([getattr(p, f.name) for p in pools]) for f in fields(TeacherPool)))


def pair_indices(count: int) -> list[tuple[int, int]]:
    """The pairs the pair teacher samples: each concept with the next (cyclically), so every
    concept is in two pairs and the pool grows with N, not N^2; one pair for two concepts."""
    if count < 2:
        return []
    return [(0, 1)] if count == 2 else [(i, (i + 1) % count) for i in range(count)]


class _Trajectories:
    """Seeded teacher trajectories on the sampling schedule, recording every step's model input,
    timestep, prompt index and the noises a teacher predicts into one ``TeacherPool``.

    Why one recorder: the single and the pair teachers differ only in how a step's noise is
    predicted; the schedule, the seeded rows and what the pool keeps must be the same."""

    def __init__(self, model: ModelAccess, *, size: int, steps: int, rows: int, seed: int):
        self.model = model
        self.timesteps = trailing_timesteps(len(model.alphas_cumprod), steps)
        self.sigmas = sigmas_for(model.alphas_cumprod, self.timesteps).tolist()
        self.latent = size // model.vae_scale_factor
        self.noise = initial_noise((rows, model.latent_channels, self.latent, self.latent), seed)  # (rows, C, h, w)
        self.parts: dict[str, list[torch.Tensor]] = {}

    def sample(self, first_row: int, count: int, prompt_index: int, predict) -> None:
        """Sample noise rows first_row .. first_row + count - 1 (Euler on the guided noise).

        predict(step, model_input, timestep) -> (guided eps (count, C, h, w), {pool field: tensor}).
        """
        model = self.model

        def step(n, x, sigma, timestep):
            model_input = (x / (1.0 + sigma**2) ** 0.5).to(model.dtype)
            guided, recorded = predict(n, model_input, timestep)
            for key, value in {"inputs": model_input.float(), **recorded,
                               "timesteps": torch.full((count,), timestep, dtype=torch.long),
                               "prompts": torch.full((count,), prompt_index, dtype=torch.long)}.items():
                self.parts.setdefault(key, []).append(value.cpu())
            return x, x - sigma * guided

        rows = self.noise[first_row:first_row + count].to(model.device)
        sample_steps(rows * (1.0 + self.sigmas[0] ** 2) ** 0.5, self.sigmas, self.timesteps, step)

    def pool(self, *, guided: bool) -> TeacherPool:
        values = {key: torch.cat(value) for key, value in self.parts.items()}
        return TeacherPool(**values, guided=torch.full((len(values["timesteps"]),), guided, dtype=torch.bool))


@torch.no_grad()
def teacher_pool(
    model: ModelAccess, loras: list[LoraFile], weights: list[float], prompts: list[str], *,
    size: int, steps: int, trajectories: int, per_forward: int, guidance_scale: float, seed: int, progress: Progress,
) -> TeacherPool:
    """Sample each concept ``trajectories`` times with its own LoRA (classifier-free guided),
    ``per_forward`` trajectories at a time (the memory plan's); each keeps its row of one seeded noise."""
    recorder = _Trajectories(model, size=size, steps=steps, rows=len(loras) * trajectories, seed=seed)
    for i, (lora, weight, prompt) in enumerate(zip(loras, weights, prompts)):
        with LoraRuntime(model.targets(), [lora], [weight]):
            for start in range(0, trajectories, per_forward):
                count = min(per_forward, trajectories - start)
                cond = Conditioning.cat([model.encode([""] * count), model.encode([prompt] * count)])

                def predict(n, model_input, timestep, i=i, cond=cond, count=count):
                    progress.update("teacher", i * steps + n, len(loras) * steps,
                                    message=f"teacher: concept {i + 1}/{len(loras)} with its own LoRA, step {n + 1}/{steps}")
                    t = torch.full((2 * count,), timestep, dtype=torch.long, device=model_input.device)
                    eps_uncond, eps_cond = model.unet_eps(torch.cat([model_input, model_input]), t, cond).float().chunk(2)
                    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                    return guided, {"eps_cond": eps_cond, "eps_uncond": eps_uncond}

                recorder.sample(i * trajectories + start, count, i, predict)
    return recorder.pool(guided=False)


@torch.no_grad()
def pair_teacher_pool(
    model: ModelAccess, loras: list[LoraFile], weights: list[float], triggers: list[str], prompts: list[str],
    pairs: list[tuple[int, int]], *, first_prompt: int, size: int, steps: int, trajectories: int, per_forward: int,
    guidance_scale: float, seed: int, progress: Progress,
) -> TeacherPool:
    """Sample each pair's prompt ``prompts[k]`` with the single-pass composition of its two LoRAs
    (subjects: the triggers), recording the guided noise; its points index ``first_prompt + k``."""
    recorder = _Trajectories(model, size=size, steps=steps, rows=len(pairs) * trajectories, seed=seed + 1)
    modules = cross_attention_modules(model.unet)

    def probe():  # one base-model forward at this size: which resolutions have cross-attention
        probe_latent = torch.zeros(1, model.latent_channels, recorder.latent, recorder.latent,
                                   device=model.device, dtype=model.dtype)
        model.unet_eps(probe_latent, torch.tensor([int(recorder.timesteps[0])], device=model.device), model.encode([""]))

    divisor = map_divisor(modules, probe, recorder.latent, model.vae_scale_factor)
    settings = ComposeSettings(method="masked", guidance_scale=guidance_scale, attention_res_divisor=divisor)
    for k, ((i, j), prompt) in enumerate(zip(pairs, prompts)):
        plan = plan_one_prompt(prompt, [LoraConcept(triggers[i]), LoraConcept(triggers[j])], model.tokenizer)
        lora_sets = pass_lora_sets(plan, {})
        with LoraRuntime(model.targets(), [loras[i], loras[j]], [weights[i], weights[j]]) as runtime:
            for start in range(0, trajectories, per_forward):
                count = min(per_forward, trajectories - start)
                conditioning = encode_passes(model.encode, runtime, plan, lora_sets, "", count)
                engine = MaskedLoraEngine(plan, settings, runtime, lora_sets, modules, steps,
                                          vae_scale_factor=model.vae_scale_factor)

                def predict(n, model_input, timestep, k=k, engine=engine, conditioning=conditioning):
                    progress.update("teacher", k * steps + n, len(pairs) * steps,
                                    message=f"pair teacher: pair {k + 1}/{len(pairs)} composed, step {n + 1}/{steps}")
                    guided = engine.step(n, model_input, torch.tensor(timestep, device=model_input.device),
                                         conditioning, model.unet_eps).prediction.float()
                    return guided, {"eps_cond": guided, "eps_uncond": torch.zeros_like(guided)}

                recorder.sample(k * trajectories + start, count, first_prompt + k, predict)
    return recorder.pool(guided=True)


@dataclass
class _MixedLayer:
    module: nn.Module
    up: torch.Tensor  # (D_out, K) [U_1 .. U_N]
    down: torch.Tensor  # (K, D_in) [D_1; ..; D_N], D_in = in * kh * kw for convs
    mix: torch.Tensor = field(init=False)  # (K, K), trained

    def __post_init__(self):
        self.mix = torch.eye(self.down.shape[0], dtype=torch.float32, device=self.down.device, requires_grad=True)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """U M D x in the layer's compute dtype: (..., D_out) linear, (B, D_out, H', W') conv."""
        up_mix = (self.up @ self.mix).to(x.dtype)
        if isinstance(self.module, nn.Conv2d):
            kernel = self.down.reshape(self.down.shape[0], *self.module.weight.shape[1:]).to(x.dtype)
            return F.conv2d(nn.Conv2d._conv_forward(self.module, x, kernel, None), up_mix[:, :, None, None])
        return F.linear(F.linear(x, self.down.to(x.dtype)), up_mix)


class MixedDeltas:
    """The student: each target's merged delta U M D, hooked onto the model only inside ``attached()``."""

    def __init__(self, targets: dict[str, nn.Module], factors: dict[str, list[LowRank | None]]):
        self.layers = {}
        for target, module in targets.items():
            stacked = LowRank.cat([f for f in factors[target] if f is not None])
            self.layers[target] = _MixedLayer(module, stacked.up, stacked.down)

    def parameters(self) -> list[torch.Tensor]:
        return [layer.mix for layer in self.layers.values()]

    def nbytes(self) -> int:
        return sum(4 * layer.mix.numel() for layer in self.layers.values())

    def delta(self, target: str) -> LowRank:
        layer = self.layers[target]
        return LowRank(layer.up, layer.mix.detach() @ layer.down)

    @contextlib.contextmanager
    def attached(self):
        handles = []
        try:
            for layer in self.layers.values():
                handles.append(layer.module.register_forward_hook(self._hook(layer), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(layer: _MixedLayer):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            return output + layer.output(x).to(output.dtype)
        return hook


class DistillError(ValueError):
    """The training diverged (a non-finite loss): the message says at which step."""


@dataclass
class DistillRun:
    history: list[float]  # the loss per iteration
    untrained: list[str]  # targets no gradient reached (their mix stays the identity: plain stacking)


def distill(
    model: ModelAccess, student: MixedDeltas, pool: TeacherPool, prompts: list[str], *,
    iterations: int, lr: float, batch: int, draws_per_forward: int, guidance_scale: float, seed: int,
    progress: Progress, pair_weight: float,
) -> DistillRun:
    """Train the student's mixes on the pool; returns the loss per iteration and the untrained targets.

    Loss per draw, at its trajectory's model input and timestep: a single point's mean squared
    error of the noise on the concept's prompt plus on the empty prompt; a pair point's of the
    guided noise, divided by the guidance squared (the scale of one noise's error), times
    ``pair_weight`` (below 1, the pairs pull less on what each concept keeps alone). A step's ``batch`` draws run in
    forwards of ``draws_per_forward`` (the memory plan's), their gradients summed, so what
    autograd keeps is bounded by the plan, not by the batch.

    A host that encodes prompts without gradients (Forge's ``get_learned_conditioning`` runs
    under ``torch.inference_mode``, SDXL's conditioner under ``no_grad``) reaches no text-encoder
    mix: those stay at the identity, the concepts' own deltas stacked, and are reported.
    """
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch, len(pool))
    history = []
    parameters = student.parameters()
    reached = [False] * len(parameters)
    # gradients for the mixes only (never the model's weights), even when the caller runs under no_grad
    with torch.inference_mode(False), torch.enable_grad(), student.attached(), GradThroughFrozen():
        for iteration in range(iterations):
            picks = torch.randint(len(pool), (batch,), generator=generator).split(max(1, draws_per_forward))
            grads = [torch.zeros_like(p) for p in parameters]
            value = 0.0
            for pick in picks:
                loss = _loss(model, pool, prompts, pick, guidance_scale, pair_weight) * (len(pick) / batch)
                value += float(loss.detach())
                if not math.isfinite(value):
                    raise DistillError(f"distillation diverged at step {iteration + 1} (loss {value}): lower --distill-lr")
                for k, grad in enumerate(torch.autograd.grad(loss, parameters, allow_unused=True)):
                    if grad is not None:
                        grads[k] += grad
                        reached[k] = True
            for parameter, grad in zip(parameters, grads):
                parameter.grad = grad
            optimizer.step()
            history.append(value)
            progress.update("distill", iteration + 1, iterations,
                            message=f"distilling every layer end to end: step {iteration + 1}/{iterations}, loss {value:.4g}")
    return DistillRun(history, [target for target, hit in zip(student.layers, reached) if not hit])


def _loss(model: ModelAccess, pool: TeacherPool, prompts: list[str], pick: torch.Tensor, guidance_scale: float,
          pair_weight: float) -> torch.Tensor:
    """The mean per-draw loss (see ``distill``) at the picked pool points: one forward of 2 x draws rows."""
    inputs = pool.inputs[pick].to(model.device, model.dtype)
    timesteps = pool.timesteps[pick].to(model.device)
    cond = model.encode([prompts[int(c)] for c in pool.prompts[pick]] + [""] * len(pick))
    eps_cond, eps_uncond = model.unet_eps(torch.cat([inputs, inputs]), timesteps.repeat(2), cond).float().chunk(2)
    target_cond, target_uncond = pool.eps_cond[pick].to(eps_cond.device), pool.eps_uncond[pick].to(eps_cond.device)
    guided = pool.guided[pick].to(eps_cond.device)  # (draws,) pair points

    def per_draw(error: torch.Tensor) -> torch.Tensor:
        return error.square().flatten(1).mean(dim=1)

    single = per_draw(eps_cond - target_cond) + per_draw(eps_uncond - target_uncond)
    composed = per_draw(eps_uncond + guidance_scale * (eps_cond - eps_uncond) - target_cond) * (pair_weight / guidance_scale**2)
    return torch.where(guided, composed, single).mean()
