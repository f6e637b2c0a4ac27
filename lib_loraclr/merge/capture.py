"""Layer-input capture for the merge: every concept runs in one batch, row block i = concept i.

Running the concepts in lockstep keeps their feature rows aligned (same prompt template,
same token slots, same sampling step), which is what the loss compares, and lets the
collector accumulate the cross-concept inner products <Y_i, Y_j> that per-concept
statistics cannot give. When one batch of every concept would not fit the memory budget,
the concepts run in micro-batches (``start_batch``): the rows stay aligned (a concept's
features do not depend on its batch-mates), the statistics are per concept anyway, and the
pairs never batched together get bounds from a few sampled rows (``PairSample``). Capture is
seeded, so a second pass over other layers (or for the report) sees identical features.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.lowrank import LowRank
from .stats import SAMPLE_ROWS, InputStats, LayerStats, TargetStats

# Siblings that read one tensor: self-attention q/k/v (UNet attn1, CLIP), cross-attention k/v.
_SHARED_INPUT = (
    (re.compile(r"(\.attn1\.to_)[qkv]$"), r"\1qkv"),
    (re.compile(r"(\.self_attn\.)[qkv](_proj)$"), r"\1qkv\2"),
    (re.compile(r"(\.attn2\.to_)[kv]$"), r"\1kv"),
)


def input_key(target: str) -> str:
    """One name for all targets that read the same input tensor (q/k/v of one attention)."""
    for pattern, replacement in _SHARED_INPUT:
        if pattern.search(target):
            return pattern.sub(replacement, target)
    return target


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


def concept_blocks(rows: torch.Tensor, n_concepts: int, name: str) -> torch.Tensor:
    """(B, R, D) batch rows -> (N, B/N * R, D): concept i owns batch rows [i*B/N, (i+1)*B/N)."""
    if rows.shape[0] % n_concepts:
        raise RuntimeError(f"batch {rows.shape[0]} of {name} is not a multiple of {n_concepts} concepts")
    return rows.reshape(n_concepts, -1, rows.shape[-1])


class LayerHooks:
    """Forward hooks on a set of targets; ``observe(name, module, x, output, source)`` gets each call.

    Register it after the LoRA runtime's hooks so the observed output is the concept's
    LoRA-applied output Y_i. The output is passed as it came: copying a wide layer's batch
    output (bias removed, rows laid out) would double the capture's largest activation.
    ``concepts`` are the concepts of the batch now running, in row-block order (all N unless
    the capture runs in micro-batches); ``calls`` counts each target's calls in that batch.
    """

    def __init__(self, targets: dict[str, nn.Module], n_concepts: int):
        self.targets = targets
        self.n_concepts = n_concepts
        self.concepts = range(n_concepts)
        self.calls: dict[str, int] = {}
        self._handles = []

    def start_batch(self, concepts: range) -> None:
        """The forwards that follow run these concepts only."""
        self.concepts = concepts
        self.calls.clear()

    @property
    def micro_batched(self) -> bool:
        return len(self.concepts) < self.n_concepts

    def observe(self, name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor, source: torch.Tensor) -> None:
        """x: (m, R, D_in) fp32 blocks of ``concepts``; output: the layer's own output, as it came (bias included)."""
        raise NotImplementedError

    def target_rows(self, name: str, module: nn.Module, output: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """(m, R, D_out) fp32 bias-free blocks of an output, or their first ``rows`` (a copy: only where needed)."""
        laid_out = output.flatten(2).transpose(1, 2) if isinstance(module, nn.Conv2d) else output
        blocks = concept_blocks(laid_out.reshape(laid_out.shape[0], -1, laid_out.shape[-1]), len(self.concepts), name)
        blocks = blocks[:, :rows].float()
        return blocks - module.bias.detach().float() if module.bias is not None else blocks

    def _hook(self, name: str):
        def hook(module, args, output):
            # Forge runs its text encoder under inference_mode: the statistics must stay
            # ordinary tensors, or their in-place accumulation fails outside it.
            with torch.inference_mode(False), torch.no_grad():
                x = concept_blocks(input_rows(module, args[0].detach()).float(), len(self.concepts), name)
                self.observe(name, module, x, output.detach(), args[0])
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

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


class StatsCollector(LayerHooks):
    """Streams each target's features into statistics.

    ``mode``: "stream" (``TargetStats`` over one shared ``InputStats`` per input),
    "exact" (per-concept ``LayerStats``, for the hinge's refinement) or "raw" (the row blocks
    themselves, on the CPU, for the reference solver).
    """

    def __init__(
        self,
        targets: dict[str, nn.Module],
        factors: dict[str, list[LowRank | None]],
        n_concepts: int,
        mode: str = "stream",
        device: torch.device | str | None = None,
    ):
        super().__init__(targets, n_concepts)
        self.mode = mode
        self.stats: dict[str, TargetStats | LayerStats] = {}
        self.raw_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
        self._inputs: dict[str, InputStats] = {}
        self._members: dict[str, set[str]] = {}
        self._round: dict[str, tuple] = {}  # input key -> (source tensor key, targets seen)
        for name, module in targets.items():
            weight = module.weight
            if mode == "stream":
                key = input_key(name)
                if key not in self._inputs:
                    self._inputs[key] = InputStats(weight[0].numel(), n_concepts, device or weight.device)
                    self._members[key] = set()
                self._inputs[key].register(name, [None if f is None else f.down for f in factors[name]])
                self._members[key].add(name)
                self.stats[name] = TargetStats(name, weight, self._inputs[key])
            elif mode == "exact":
                self.stats[name] = LayerStats(layer_matrix(module).to(device or weight.device), n_concepts)

    def nbytes(self) -> int:
        samples = sum(s.pairs.sample.nbytes() for s in self.stats.values() if s.pairs.sample is not None)
        return samples + sum(inputs.nbytes() for inputs in self._inputs.values())

    def observe(self, name, module, x, output, source):
        if self.mode == "raw":
            if self.micro_batched:
                raise RuntimeError("the reference solver's raw rows need every concept in one batch")
            self.raw_inputs[name].append(x.cpu())
            return
        stats = self.stats[name]
        if self.micro_batched and not self.calls.get(name):  # the batch's first call here
            stats.pairs.keep_sample(self.concepts, x, self.target_rows(name, module, output, SAMPLE_ROWS))
        if self.mode == "exact":
            stats.add(list(x), list(self.target_rows(name, module, output)), self.concepts)
            return
        key = input_key(name)
        source_key = (source.data_ptr(), tuple(source.shape))
        current, seen = self._round.get(key, (None, self._members[key]))
        if seen >= self._members[key]:  # every sibling has seen the last input: a new one starts
            self._inputs[key].add(x, self.concepts)
            self._round[key] = (source_key, {name})
        elif source_key == current and name not in seen:
            seen.add(name)
        else:
            raise RuntimeError(
                f"{name} does not read the same input as {sorted(seen)}; their statistics cannot be shared"
            )
        stats.add_targets(output, self.concepts)

    def raw(self, name: str) -> list[torch.Tensor]:
        """Concept i's raw input rows (R, D_in), every captured chunk."""
        return list(torch.cat(self.raw_inputs[name], dim=1))

    def close_target(self, name: str) -> None:
        """Free what only this target needed; its shared input goes once all its readers are done."""
        self.stats.pop(name, None)
        self.raw_inputs.pop(name, None)
        key = input_key(name)
        if key in self._members:
            self._members[key].discard(name)
            if not self._members[key]:
                del self._inputs[key], self._members[key]
                self._round.pop(key, None)
