"""Streaming sufficient statistics of one layer's captured features, for the fast solvers.

Everything the LoRACLR loss needs, except the hinge's exact negatives, is a quadratic form of
dW in the per-concept Grams G_i = X_i^T X_i; the hinge's bound additionally needs the N x N
target inner products T_ij = <Y_i, Y_j>, which per-concept Grams cannot give because they
pair rows of different concepts (hence the aligned chunks). Memory is N*D_in^2 + N^2 numbers,
whatever the number of rows.

Accumulation is float64: activation Grams have condition numbers of 1e6 and more, and the
solver inverts them on their whole range, so fp32 rounding (about r * 6e-8 of ||G|| per chunk
of r rows) would swamp their small-eigenvalue directions; likewise the surrogate compares
residual norms about 1e-6 of ||Y||^2. The cost is one D_in^2 float64 product per row chunk.
"""

from __future__ import annotations

import torch


class LayerStats:
    """G_i, T_ij and the row count of N concepts' aligned feature blocks for one weight (D_out, D_in).

    Targets Y_i must be bias-free and equal X_i (W0 + Delta_i)^T (the concept's LoRA applied).
    """

    def __init__(self, base_weight: torch.Tensor, n_concepts: int):
        if base_weight.dim() != 2:
            raise ValueError(f"base weight must be a (D_out, D_in) matrix, got shape {tuple(base_weight.shape)}")
        if n_concepts < 2:
            raise ValueError(f"LayerStats needs at least two concepts, got {n_concepts}")
        self.n_concepts = n_concepts
        self.base_weight = base_weight.detach().to(torch.float64)  # (D_out, D_in)
        d_in = base_weight.shape[1]
        self.grams = torch.zeros(n_concepts, d_in, d_in, dtype=torch.float64, device=base_weight.device)
        self.target_inner = torch.zeros(n_concepts, n_concepts, dtype=torch.float64, device=base_weight.device)
        self.rows = 0  # rows per concept (aligned, so one count)
        # While all concepts' rows together are fewer than D_in, the rows themselves are the
        # cheaper representation of the Grams (products cost R instead of D_in per row of G).
        self._input_rows: torch.Tensor | None = torch.zeros(
            n_concepts, 0, d_in, dtype=torch.float64, device=base_weight.device
        )  # (N, R, D_in) while kept, None once dropped

    @property
    def device(self) -> torch.device:
        return self.base_weight.device

    def add(self, input_chunks: list[torch.Tensor], target_chunks: list[torch.Tensor]) -> None:
        """Accumulate one aligned chunk: concept i's input rows (r, D_in) and target rows (r, D_out)."""
        d_out, d_in = self.base_weight.shape
        if len(input_chunks) != self.n_concepts or len(target_chunks) != self.n_concepts:
            raise ValueError(
                f"expected {self.n_concepts} input and target chunks, got {len(input_chunks)} and {len(target_chunks)}"
            )
        rows = input_chunks[0].shape[0]
        for i, (x, y) in enumerate(zip(input_chunks, target_chunks)):
            if tuple(x.shape) != (rows, d_in) or tuple(y.shape) != (rows, d_out):
                raise ValueError(
                    f"concept {i}: chunks must be ({rows}, {d_in}) inputs and ({rows}, {d_out}) targets "
                    f"(rows aligned across concepts), got {tuple(x.shape)} and {tuple(y.shape)}"
                )
        inputs = torch.stack(input_chunks).to(self.device, torch.float64)  # (N, r, D_in)
        self.grams.baddbmm_(inputs.transpose(1, 2), inputs)
        if self._input_rows is not None:
            kept = self.n_concepts * (self.rows + rows) <= d_in
            self._input_rows = torch.cat([self._input_rows, inputs], dim=1) if kept else None
        targets = torch.stack(target_chunks).to(self.device, torch.float64).reshape(self.n_concepts, -1)  # (N, r*D_out)
        self.target_inner.addmm_(targets, targets.T)
        self.rows += rows

    @classmethod
    def from_features(
        cls,
        base_weight: torch.Tensor,
        inputs: list[torch.Tensor],
        deltas: list[torch.Tensor | None],
        chunk_rows: int = 4096,
    ) -> LayerStats:
        """Statistics of raw aligned inputs X_i (R, D_in), targets computed from the concept deltas."""
        stats = cls(base_weight, len(inputs))
        if len(deltas) != len(inputs):
            raise ValueError(f"got {len(deltas)} concept deltas for {len(inputs)} concept inputs")
        if len({x.shape[0] for x in inputs}) != 1:
            raise ValueError(f"concept inputs must have the same row count, got {[x.shape[0] for x in inputs]}")
        weights = [base_weight if delta is None else base_weight + delta.to(base_weight) for delta in deltas]
        for start in range(0, inputs[0].shape[0], chunk_rows):
            chunks = [x[start:start + chunk_rows].to(base_weight) for x in inputs]
            stats.add(chunks, [x @ w.T for x, w in zip(chunks, weights)])
        return stats

    def _rows(self) -> torch.Tensor | None:
        """(N, R, D_in) raw rows while they are kept, else None."""
        return self._input_rows if self._input_rows is not None and self._input_rows.shape[1] else None

    def gram_sum_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors (columns) of sum_i G_i, from the rows themselves when few."""
        rows = self._rows()
        if rows is None:
            return torch.linalg.eigh(self.grams.sum(0))
        _, singular_values, right_vectors = torch.linalg.svd(rows.reshape(-1, rows.shape[-1]), full_matrices=False)
        return singular_values.square(), right_vectors.T

    def times_gram(self, i: int, matrix: torch.Tensor) -> torch.Tensor:
        """matrix @ G_i for a (D_out, D_in) matrix."""
        rows = self._rows()
        if rows is None:
            return matrix @ self.grams[i]
        return (matrix @ rows[i].T) @ rows[i]

    def quadratic_forms(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(N,) tr(left G_i right^T) for (D_out, D_in) matrices, i.e. <X_i left^T, X_i right^T>."""
        rows = self._rows()
        if rows is None:
            return self.grams.reshape(self.n_concepts, -1) @ (left.T @ right).reshape(-1)
        return ((rows @ left.T) * (rows @ right.T)).sum(dim=(1, 2))

    def gram(self, i: int) -> torch.Tensor:
        """G_i = X_i^T X_i, (D_in, D_in) float64."""
        return self.grams[i]

    def target_distances(self) -> torch.Tensor:
        """(N, N) ||Y_i - Y_j|| from T (float64: the expansion's cancellation stays far below fp32 input rounding)."""
        sq_norms = self.target_inner.diagonal()
        return (sq_norms[:, None] + sq_norms[None, :] - 2 * self.target_inner).clamp_min(0).sqrt()
