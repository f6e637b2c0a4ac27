"""Apply LoRAs to a live model as extra forward terms, never touching its weights.

Why hooks and not merging: the engines switch LoRA sets per UNet pass (CLoRA runs one pass
per LoRA) and even per batch row (the merge captures several concepts' features in one
batch); merging weights in and out for each would be slow, lossy in fp16, and would leave
the model changed if anything failed half-way. A forward hook runs from ``Module.__call__``,
so it keeps working when a host replaces ``forward`` at class level (A1111 replaces
``nn.Linear.forward`` and ``CrossAttention.forward``).

Row sets: ``set_rows(row_sets)`` gives the k = batch / len(row_sets) consecutive batch rows
``[r*k, (r+1)*k)`` the LoRA set ``row_sets[r]``. Lay a multi-pass batch out pass-major, so
that with CFG each pass's (uncond, cond) pair sits together and k = 2 picks it up on its
own. A host that orders the batch cond-block then uncond-block instead passes the sets
twice (``row_sets + row_sets``), giving k = 1 per pass within each block.

Regions: ``regions(scale)`` multiplies each LoRA's output, row by row and position by
position, by what ``scale(target, lora, term)`` returns for it (a tensor that broadcasts to
``term``, or None for 1). ``term`` is the LoRA's rank-r intermediate (or its output when it
has no low-rank form): (B, L, r) for a linear layer on L tokens, (B, r, H, W) for a conv, so
a per-position multiplier costs r values per position and the layer's own work is unchanged.
Composition uses it to keep each subject LoRA inside its subject's region in one UNet pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .lora.base import COMPONENTS, LoraFile, LoraModule

_Factors = tuple[torch.Tensor, torch.Tensor | None]  # (down, up) low rank, or (delta, None)
RegionScale = Callable[[str, int, torch.Tensor], "torch.Tensor | None"]  # (target, LoRA index, term) -> multiplier


class LoraMismatchError(ValueError):
    """A LoRA layer the model lacks or whose shape does not fit the model's: usually another architecture."""


def check_fits(lora: LoraFile, targets: Mapping[str, nn.Module]) -> None:
    """The one check of a LoRA against a model: every layer exists there with a shape it fits."""
    unknown = [target for target in lora.modules if target not in targets]
    if unknown:
        raise LoraMismatchError(
            f"{lora.path}: layer {unknown[0]!r} is not in this model "
            f"({len(unknown)} of {len(lora.modules)} layers unknown: a LoRA for another architecture?)"
        )
    for target, lora_module in lora.modules.items():
        _is_conv, shape = _base_weight_shape(target, targets[target])
        if not shapes_fit(shape, lora_module.weight_shape):
            raise LoraMismatchError(
                f"{lora.path}: {target} has weight shape {tuple(shape)} in this model "
                f"but {tuple(lora_module.weight_shape)} in the LoRA (a LoRA for another architecture?)"
            )


@dataclass(eq=False)
class _Entry:
    """One LoRA's module at one target, with its factors cast once per (device, dtype)."""

    source: str  # the LoRA file, for error messages
    module: LoraModule
    multiplier: float
    cache: dict[tuple[torch.device, torch.dtype], _Factors] = field(default_factory=dict)


@dataclass(eq=False)
class _Site:
    """One hooked model module and the LoRAs (by index) that adapt it."""

    target: str
    module: nn.Module
    is_conv: bool
    weight_shape: tuple[int, ...]  # (out, in) or (out, in/groups, kh, kw)
    entries: dict[int, _Entry] = field(default_factory=dict)

    @property
    def low_rank_ok(self) -> bool:
        """A grouped conv's delta is not the product of a grouped down and a 1x1 up conv."""
        return not self.is_conv or self.module.groups == 1


@dataclass(frozen=True)
class _Group:
    """Row sets sharing one LoRA set: their positions in ``row_sets`` and the LoRA indices."""

    loras: tuple[int, ...]
    positions: tuple[int, ...]


@dataclass(eq=False)
class _Plan:
    """What each hook applies; ``n_row_sets == 0`` means one group for the whole batch."""

    groups: tuple[_Group, ...]
    n_row_sets: int
    row_index: dict[tuple[int, int, torch.device], torch.Tensor] = field(default_factory=dict)

    def rows(self, group_number: int, rows_per_set: int, device: torch.device) -> torch.Tensor:
        """(n,) batch row indices of one group, built once per (batch layout, device)."""
        key = (group_number, rows_per_set, device)
        index = self.row_index.get(key)
        if index is None:
            positions = torch.tensor(self.groups[group_number].positions, device=device)
            offsets = torch.arange(rows_per_set, device=device)
            index = (positions[:, None] * rows_per_set + offsets).reshape(-1)
            self.row_index[key] = index
        return index


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a host's own linear layer that does not subclass it (Forge's operations.Linear)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features")
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
    )


def is_adaptable(module: nn.Module) -> bool:
    """A layer a LoRA can adapt: linear or Conv2d."""
    return isinstance(module, nn.Conv2d) or is_linear(module)


def _base_weight_shape(target: str, module: nn.Module) -> tuple[bool, tuple[int, ...]]:
    """(is_conv, weight shape) from the layer's own sizes, so packed/quantised weights still work."""
    if isinstance(module, nn.Conv2d):
        return True, (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if is_linear(module):
        return False, (module.out_features, module.in_features)
    raise TypeError(f"{target}: a LoRA can only be applied to Linear or Conv2d, not {type(module).__name__}")


def shapes_fit(base: tuple[int, ...], lora: tuple[int, ...]) -> bool:
    """Equal, or equal up to a 1x1 kernel: linear and 1x1 conv layers are the same map."""
    return tuple(base) == tuple(lora) or tuple(base) + (1, 1) == tuple(lora) or tuple(base) == tuple(lora) + (1, 1)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor: inference tensors cannot be saved for backward (Forge loads under inference_mode)."""
    return tensor.clone() if tensor.is_inference() else tensor


class LoraRuntime:
    """Hooks that add the outputs of chosen LoRAs to the targeted layers' outputs.

    targets: canonical target name -> the model's Linear/Conv2d module.
    loras: the LoRA files, referred to by their index in this list everywhere else.
    weights: one multiplier per LoRA (default 1.0).
    component_weights: per LoRA, an extra multiplier per component
        (``{"text_encoder": 0.5, "unet": 1.0}``); missing components keep 1.0.

    Every LoRA is active until ``set_active``/``set_rows`` say otherwise. The model's
    weights are never written; ``remove()`` (or leaving the ``with`` block) removes the hooks.
    attach=False builds everything but hooks nothing until ``attach()``/``attached()``: a
    WebUI host keeps the hooks on only while its own code runs (one sampler step), so an
    error or interrupt anywhere else cannot leave them behind.
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        loras: list[LoraFile],
        weights: list[float] | None = None,
        component_weights: list[Mapping[str, float]] | None = None,
        *,
        attach: bool = True,
    ):
        weights = [1.0] * len(loras) if weights is None else list(weights)
        component_weights = [{}] * len(loras) if component_weights is None else list(component_weights)
        if len(weights) != len(loras) or len(component_weights) != len(loras):
            raise ValueError(
                f"{len(loras)} LoRAs but {len(weights)} weights and {len(component_weights)} component weights"
            )
        for lora, per_component in zip(loras, component_weights):
            for component in per_component:
                if component not in COMPONENTS:
                    raise ValueError(f"{lora.path}: unknown component {component!r} (expected one of {COMPONENTS})")

        self.loras = list(loras)
        sites: dict[str, _Site] = {}
        for index, (lora, weight, per_component) in enumerate(zip(loras, weights, component_weights)):
            check_fits(lora, targets)
            for target, lora_module in lora.modules.items():
                site = sites.get(target)
                if site is None:
                    is_conv, shape = _base_weight_shape(target, targets[target])
                    site = sites[target] = _Site(target, targets[target], is_conv, shape)
                multiplier = float(weight) * float(per_component.get(target.split(".", 1)[0], 1.0))
                if multiplier != 0.0:
                    site.entries[index] = _Entry(lora.path, lora_module, multiplier)

        self._sites = {target: site for target, site in sites.items() if site.entries}
        self._plan = self._uniform_plan(range(len(loras)))
        self._region: RegionScale | None = None
        self._handles = []
        if attach:
            self.attach()

    @property
    def targets(self) -> tuple[str, ...]:
        """Names of the hooked modules (those some LoRA adapts with a non-zero multiplier)."""
        return tuple(self._sites)

    def set_active(self, indices: Iterable[int]) -> None:
        """Apply these LoRAs to every batch row; ``set_active([])`` applies none."""
        self._plan = self._uniform_plan(indices)

    def set_rows(self, row_sets: list[Iterable[int]]) -> None:
        """Batch rows [r*k, (r+1)*k) get LoRA set ``row_sets[r]``, k = batch / len(row_sets).

        Rows with equal sets form one group, so each LoRA's factors run once per group.
        A batch size that is not a multiple of ``len(row_sets)`` raises at the forward.
        """
        if not row_sets:
            raise ValueError("set_rows needs at least one row set")
        sets = [self._checked(indices) for indices in row_sets]
        positions: dict[tuple[int, ...], list[int]] = {}
        for position, loras in enumerate(sets):
            positions.setdefault(loras, []).append(position)
        if len(positions) == 1:
            self._plan = _Plan((_Group(sets[0], ()),), 0)
            return
        groups = tuple(_Group(loras, tuple(where)) for loras, where in positions.items() if loras)
        self._plan = _Plan(groups, len(sets))

    @contextmanager
    def active(self, indices: Iterable[int]) -> Iterator["LoraRuntime"]:
        """``set_active`` for the duration of a block, then the previous state again."""
        previous = self._plan
        self.set_active(indices)
        try:
            yield self
        finally:
            self._plan = previous

    @contextmanager
    def rows(self, row_sets: list[Iterable[int]]) -> Iterator["LoraRuntime"]:
        """``set_rows`` for the duration of a block, then the previous state again."""
        previous = self._plan
        self.set_rows(row_sets)
        try:
            yield self
        finally:
            self._plan = previous

    @contextmanager
    def regions(self, scale: RegionScale | None) -> Iterator["LoraRuntime"]:
        """Scale each LoRA's output per row and position by ``scale`` for a block (module docstring;
        None: no scaling, e.g. one layer's call inside a regional pass).

        Applies with ``set_active`` plans; combined with row sets it raises at the forward.
        """
        previous = self._region
        self._region = scale
        try:
            yield self
        finally:
            self._region = previous

    def attach(self) -> None:
        """Hook the targeted layers (no-op when already hooked)."""
        if not self._handles:
            self._handles = [
                site.module.register_forward_hook(partial(self._hook, site), with_kwargs=True)
                for site in self._sites.values()
            ]

    def detach(self) -> None:
        """Unhook every layer, keeping the cast factors for the next ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def attached(self) -> Iterator["LoraRuntime"]:
        """Hooks on for the duration of a block, then off again, also on errors."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def remove(self) -> None:
        """Remove every hook and drop the cast factors; the model is as it was before."""
        self.detach()
        for site in self._sites.values():
            for entry in site.entries.values():
                entry.cache.clear()

    def __enter__(self) -> "LoraRuntime":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _checked(self, indices: Iterable[int]) -> tuple[int, ...]:
        loras = tuple(sorted(set(indices)))
        for index in loras:
            if not 0 <= index < len(self.loras):
                raise IndexError(f"LoRA index {index} out of range: this runtime has {len(self.loras)} LoRAs")
        return loras

    def _uniform_plan(self, indices: Iterable[int]) -> _Plan:
        return _Plan((_Group(self._checked(indices), ()),), 0)

    def _hook(self, site: _Site, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        plan = self._plan
        x = args[0] if args else kwargs["input"]
        # With no autograd graph to keep, the LoRA terms go into the layer's fresh output in
        # place: out of place, a wide layer's batch output (the merge's batch of N concepts)
        # would exist two or three times over.
        in_place = not torch.is_grad_enabled() and output.is_contiguous() and output.dtype == x.dtype
        region = self._region
        if plan.n_row_sets == 0:
            entries = [(i, site.entries[i]) for i in plan.groups[0].loras if i in site.entries]
            if not entries:
                return None
            if in_place:
                self._add_lora_output(site, entries, x, output, region)
                return output
            return output + self._lora_output(site, entries, x, region).to(output.dtype)

        if region is not None:
            raise ValueError(f"{site.target}: LoRA regions cannot be combined with row sets")
        batch = x.shape[0]
        if batch % plan.n_row_sets:
            raise ValueError(
                f"{site.target}: batch of {batch} rows is not a multiple of the {plan.n_row_sets} row sets"
            )
        rows_per_set = batch // plan.n_row_sets
        if in_place:  # each row set is a contiguous block of the batch
            for group in plan.groups:
                entries = [(i, site.entries[i]) for i in group.loras if i in site.entries]
                for position in group.positions if entries else ():
                    start = position * rows_per_set
                    self._add_lora_output(site, entries, x.narrow(0, start, rows_per_set),
                                          output.narrow(0, start, rows_per_set))
            return output
        row_indices, row_outputs = [], []
        for group_number, group in enumerate(plan.groups):
            entries = [(i, site.entries[i]) for i in group.loras if i in site.entries]
            if not entries:
                continue
            rows = plan.rows(group_number, rows_per_set, x.device)
            row_indices.append(rows)
            row_outputs.append(self._lora_output(site, entries, x.index_select(0, rows)))
        if not row_outputs:
            return None
        return output.index_add(0, torch.cat(row_indices), torch.cat(row_outputs).to(output.dtype))

    def _lora_output(self, site: _Site, entries: list[tuple[int, _Entry]], x: torch.Tensor,
                     region: RegionScale | None = None) -> torch.Tensor:
        """Sum of the entries' outputs on x: (B, ..., out) linear, (B, out, H', W') conv."""
        total = None
        for index, entry in entries:
            first, up = self._factors(site, entry, x)
            term = self._scaled(site, index, self._first(site, first, x), region)
            out = term if up is None else self._up(site, term, up)
            total = out if total is None else total + out
        return total

    def _add_lora_output(self, site: _Site, entries: list[tuple[int, _Entry]], x: torch.Tensor,
                         output: torch.Tensor, region: RegionScale | None = None) -> None:
        """output += the entries' outputs on x, in place; a linear's never exists as a separate tensor."""
        for index, entry in entries:
            first, up = self._factors(site, entry, x)
            if site.is_conv or (up is None and region is not None):
                output.add_(self._lora_output(site, [(index, entry)], x, region))
                continue
            flat = output.view(-1, output.shape[-1])  # (rows, out)
            if up is None:
                flat.addmm_(x.reshape(-1, x.shape[-1]), first.T)
            else:
                term = self._scaled(site, index, F.linear(x, first), region)
                flat.addmm_(term.reshape(-1, first.shape[0]), up.T)

    @staticmethod
    def _scaled(site: _Site, index: int, term: torch.Tensor, region: RegionScale | None) -> torch.Tensor:
        scale = None if region is None else region(site.target, index, term)
        return term if scale is None else term * scale.to(term.dtype)

    @staticmethod
    def _first(site: _Site, first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The down projection (rank-r term), or the whole delta's output when there is no up."""
        return nn.Conv2d._conv_forward(site.module, x, first, None) if site.is_conv else F.linear(x, first)

    @staticmethod
    def _up(site: _Site, term: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(term, up) if site.is_conv else F.linear(term, up)

    def _factors(self, site: _Site, entry: _Entry, x: torch.Tensor) -> _Factors:
        key = (x.device, x.dtype)
        factors = entry.cache.get(key)
        if factors is None:
            with torch.inference_mode(False), torch.no_grad():
                factors = self._cast(site, entry, x.device, x.dtype)
            entry.cache[key] = factors
        return factors

    @staticmethod
    def _cast(site: _Site, entry: _Entry, device: torch.device, dtype: torch.dtype) -> _Factors:
        """Factors shaped for the base layer, multiplier folded into up (or the delta)."""
        pair = entry.module.low_rank() if site.low_rank_ok else None
        if pair is None:
            delta = entry.module.delta_weight().to(device=device, dtype=dtype).reshape(site.weight_shape)
            return _plain(delta * entry.multiplier if entry.multiplier != 1.0 else delta), None
        up, down = (t.to(device=device, dtype=dtype) for t in pair)
        out_features, rank = site.weight_shape[0], down.shape[0]
        if site.is_conv:
            down = down.reshape(rank, *site.weight_shape[1:])  # (r, in, kh, kw)
            up = up.reshape(out_features, rank, 1, 1)
        else:
            down = down.reshape(rank, site.weight_shape[1])  # (r, in)
            up = up.reshape(out_features, rank)
        if entry.multiplier != 1.0:
            up = up * entry.multiplier
        return _plain(down), _plain(up)
