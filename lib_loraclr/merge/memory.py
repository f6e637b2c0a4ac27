"""The merge's memory budget: how much its statistics may hold, and which layers share a capture pass.

The statistics of every layer of a full-width SDXL do not fit beside the model on a 32 GB
machine, so the (seeded, hence repeatable) capture runs once per group of layers whose
statistics fit the budget. Sizes are exact for what the statistics allocate (see
``stats.InputStats``); activations and the written file are estimated and reserved. When
even one batch of every concept's UNet activations would not leave room for statistics,
the concepts are sampled in micro-batches (``concept_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import input_key
from .stats import SAMPLE_ROWS

GIB = 2 ** 30
DEFAULT_CAP = 4 * GIB  # the merge's own memory beyond the model, unless the user allows more
FLOAT = 4  # bytes of the fp32 statistics
# A UNet forward holds about this many fp32 copies of its widest hooked layer's input and
# output per batch row at its peak (skip connections, GEGLU halves, the hooks' row views).
# Measured on full-width SD1.5 at 512 px, batch 12: about 4.5 (see README, Memory).
ACTIVATION_COPIES = 5
# Autograd keeps about this many fp32 copies of *every* hooked layer's input and output per
# batch row for the backward (``--method distill``). Measured on full-width SD1.5 (see README, Memory).
BACKWARD_COPIES = 2
# What a distillation holds besides that backward (the teacher's and the text encoder's work,
# the pool, the allocator's slack): 1.3-1.45 GiB measured on full-width SD1.5 at 64-384 px.
DISTILL_MARGIN = 3 * GIB // 2


def available_bytes(device: torch.device) -> int:
    """Free memory of the device the statistics live on (RAM: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def default_budget(device: torch.device) -> int:
    """Half of what is free now, at most ``DEFAULT_CAP``."""
    return int(min(DEFAULT_CAP, 0.5 * available_bytes(device)))


def budget_bytes(max_memory_gb: float | None, device: torch.device) -> int:
    return default_budget(device) if max_memory_gb is None else int(max_memory_gb * GIB)


@dataclass
class InputCost:
    """The planner's unit: targets that must share a pass (one input's readers, or one target alone)."""

    key: str
    targets: list[str]
    nbytes: int  # what its statistics hold at most
    fold_bytes: int  # transient work space while folding rows into the factor


def activation_bytes(targets: dict[str, torch.nn.Module], rows_per_forward: dict[str, int]) -> int:
    """Estimated peak activations of one concept's forward (one batch row)."""
    return max(
        (ACTIVATION_COPIES * FLOAT * rows_per_forward.get(t, 0) * (m.weight[0].numel() + m.weight.shape[0])
         for t, m in targets.items()),
        default=0,
    )


def backward_bytes(targets: dict[str, torch.nn.Module], rows_per_forward: dict[str, int]) -> int:
    """Estimated activations one batch row's forward keeps for its backward: every layer's, not the widest."""
    return sum(BACKWARD_COPIES * FLOAT * rows_per_forward.get(t, 0) * (m.weight[0].numel() + m.weight.shape[0])
               for t, m in targets.items())


def distill_size(per_draw: int, size: int, room: int, multiple: int = 64) -> int:
    """The largest image size <= ``size`` (a multiple of ``multiple``) at which one training draw's
    backward fits ``room``; ``per_draw`` is that backward at ``size``, and it grows with the pixels."""
    if per_draw <= room or size <= multiple:
        return size
    return max(multiple, int(size * (max(room, 0) / per_draw) ** 0.5) // multiple * multiple)


def concept_batches(n_concepts: int, per_concept: int, budget: int) -> list[range]:
    """Concepts per forward: all at once if their activations take at most half the budget, else even micro-batches."""
    size = n_concepts if per_concept == 0 else max(1, min(n_concepts, budget // 2 // per_concept))
    count = -(-n_concepts // size)
    bounds = [round(k * n_concepts / count) for k in range(count + 1)]
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def stream_costs(
    targets: dict[str, torch.nn.Module],
    ranks: dict[str, int],
    n_concepts: int,
    rows: dict[str, int] | None = None,
    micro_batched: bool = False,
) -> list[InputCost]:
    """Per distinct input (in model order): the bytes of its ``InputStats`` and of its readers' LoRA factors.

    ``ranks[target]`` is the sum of the concepts' ranks there; ``rows[target]`` the rows per
    concept a capture will feed (None: unknown, assume the factor is needed); a micro-batched
    capture adds each reader's ``PairSample``.
    """
    groups: dict[str, InputCost] = {}
    widths: dict[str, int] = {}
    d_ins: dict[str, int] = {}
    for name, module in targets.items():
        key = input_key(name)
        weight = module.weight
        d_ins[key] = int(weight[0].numel())
        widths[key] = widths.get(key, d_ins[key]) + ranks[name]
        groups.setdefault(key, InputCost(key, [], 0, 0)).targets.append(name)
    for key, cost in groups.items():
        width, d_in = widths[key], d_ins[key]
        total_rows = None if rows is None else n_concepts * max(rows.get(t, 0) for t in cost.targets)
        if total_rows is not None and total_rows < width:
            cost.nbytes = FLOAT * total_rows * d_in  # the rows stay as they are
        else:
            cost.nbytes = FLOAT * (width * width + width * d_in)  # triangle + pending rows
            cost.fold_bytes = FLOAT * 3 * width * width
        cost.nbytes += 8 * n_concepts * n_concepts * len(cost.targets)  # target inner products
        for name in cost.targets:  # the pass's fp32 LoRA factors
            d_out = targets[name].weight.shape[0]
            cost.nbytes += FLOAT * ranks[name] * (d_in + d_out)
            if micro_batched:
                cost.nbytes += 8 * n_concepts * SAMPLE_ROWS * (d_in + d_out)
    return list(groups.values())


def exact_bytes(module: torch.nn.Module, n_concepts: int) -> int:
    """``LayerStats`` of one target: N float64 Grams (or fewer rows) and the base weight."""
    d_out, d_in = module.weight.shape[0], module.weight[0].numel()
    return 8 * (n_concepts * d_in * d_in + d_out * d_in)


def plan_passes(costs: list[InputCost], budget: int) -> list[list[str]]:
    """Consecutive inputs packed into passes whose statistics fit ``budget``; targets per pass.

    An input larger than the budget on its own still gets a pass (it cannot be split).
    """
    passes: list[list[str]] = []
    current: list[str] = []
    used = fold = 0  # bytes held, largest transient fold in the pass
    for cost in costs:
        if current and used + cost.nbytes + max(fold, cost.fold_bytes) > budget:
            passes.append(current)
            current, used, fold = [], 0, 0
        current.extend(cost.targets)
        used += cost.nbytes
        fold = max(fold, cost.fold_bytes)
    if current:
        passes.append(current)
    return passes
