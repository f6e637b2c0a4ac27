"""A weight delta kept as two factors, so a merge never holds a dense (D_out, D_in) per concept.

Every LoRA module is low rank or nearly so, and the merge's solution is too: the fast
solver's delta is ``sum_i U_i M_i`` (its rows lie in the span of the concepts' up factors),
so factors flow from the file through the solver into the writer without a dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LoraModule


@dataclass
class LowRank:
    """delta = up @ down: up (D_out, K), down (K, D_in) with D_in = in * kh * kw for convs."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    def dense(self) -> torch.Tensor:
        """(D_out, D_in) in the factors' dtype; only for one layer at a time."""
        return self.up @ self.down

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.up.to(*args, **kwargs), self.down.to(*args, **kwargs))

    def scaled(self, factor: float) -> "LowRank":
        return LowRank(self.up * factor, self.down)

    @staticmethod
    def cat(parts: list["LowRank"]) -> "LowRank":
        """The sum of the parts as one factor pair: [U_1 .. U_N] @ [D_1; ..; D_N]."""
        return LowRank(torch.cat([p.up for p in parts], dim=1), torch.cat([p.down for p in parts], dim=0))

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD (u (D_out, k), s (k,), vh (k, D_in)) of up @ down without forming it.

        QR of both factors, then the SVD of the small (K, K) core: exact, and it costs
        (D_out + D_in) K^2 instead of an SVD of the dense matrix.
        """
        q_up, r_up = torch.linalg.qr(self.up)  # (D_out, K), (K, K)
        q_down, r_down = torch.linalg.qr(self.down.T)  # (D_in, K), (K, K)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        return q_up @ u, s, vh @ q_down.T


def module_factors(module: LoraModule, multiplier: float = 1.0) -> LowRank:
    """A module's delta (matrix form, scale and multiplier folded in) as fp32 factors.

    LoRA/LoCon give their own factors. LoHa, LoKr and full diffs have none, so their delta is
    densified once (this layer only) and cut to its numerical rank by SVD: exact to fp32.
    """
    factors = module.low_rank()
    if factors is not None:
        up, down = factors
        return LowRank(up.flatten(1) * multiplier, down.flatten(1))
    dense = module.delta_weight().flatten(1).float() * multiplier  # (D_out, D_in)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    tolerance = (s[0] if s.numel() else 0.0) * max(dense.shape) * torch.finfo(torch.float32).eps
    keep = max(int((s > tolerance).sum()), 1)
    return LowRank((u[:, :keep] * s[:keep]).contiguous(), vh[:keep].contiguous())
