"""Streaming statistics of the captured layer features, for the fast solvers and the report.

Per layer the LoRACLR objective (hinge aside) is ``sum_i ||X_i (dW - Delta_i)^T||^2`` plus a
norm, with ``Delta_i = U_i D_i`` low rank. Its minimiser needs ``H = sum_i X_i^T X_i`` and
``P_i = D_i X_i^T X_i`` (rank x D_in), nothing per concept of size D_in^2. Writing
``C_i = X_i D_i^T`` (concept i's LoRA coefficients, (R, r_i)), both are blocks of the Gram of
the stacked matrix ``[X | C]`` whose rows are every concept's rows, with C_i in concept i's
columns and zeros elsewhere: ``H = X^T X`` and ``P_i^T = X^T C_i``.

``InputStats`` keeps that Gram as an upper-triangular factor R (``R^T R = [X | C]^T [X | C]``),
folded in fp32 by QR (TSQR) as rows stream in. Householder QR is backward stable: R is the
exact factor of rows perturbed by about eps32 of their norm, so every statistic derived from
R is the exact statistic of one nearby feature set. That consistency is what an fp32 Gram
lacks: its H and P_i carry independent rounding of eps32 * ||X||^2, and the solve
``B H^-1`` amplifies the mismatch in weakly excited directions without bound. Layers that
read the same input (q/k/v of one attention) share one R, each with its own C columns.
While all rows together are fewer than the columns, the rows themselves are kept (cheaper,
and exact per concept). The memory is (D_in + K)^2 floats per distinct input, K the sum of
the LoRA ranks reading it, whatever the number of rows.

``LayerStats`` is the exact per-concept form (float64 Grams ``G_i``), which the hinge's
refinement needs; the merge builds it only for the rare layers whose hinge the streaming
statistics cannot certify inactive.
"""

from __future__ import annotations

import torch

from ..lora.lowrank import LowRank

TARGET_SLICE = 1 << 20  # output values per concept converted to float64 at a time
SAMPLE_ROWS = 32  # rows per concept a micro-batched capture keeps, to bound distances across batches


def _concepts(concepts: range | None, n_concepts: int) -> range:
    return range(n_concepts) if concepts is None else concepts


class PairSample:
    """The first rows of every concept's first call at one target: distance bounds across micro-batches.

    A capture that runs the concepts in several batches never sees concepts i and j together,
    so it cannot accumulate <Y_i, Y_j>. But a Frobenius norm over all rows is at least its
    value on any aligned subset of them: ||Yhat_i - Y_j|| >= ||Xs_i W^T - Ys_j|| for the same
    few rows of every concept (their first call, so the same sampling step and positions).
    """

    def __init__(self, n_concepts: int):
        self.inputs: list[torch.Tensor | None] = [None] * n_concepts  # (k, D_in) float64 Xs_i
        self.targets: list[torch.Tensor | None] = [None] * n_concepts  # (k, D_out) float64 bias-free Ys_i

    def add(self, concepts: range, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The first rows of a batch's concept blocks: inputs (m, k, D_in), bias-free targets (m, k, D_out)."""
        for offset, concept in enumerate(concepts):
            if self.inputs[concept] is None:
                self.inputs[concept] = inputs[offset].double()
                self.targets[concept] = targets[offset].double()

    def nbytes(self) -> int:
        return sum(8 * (x.numel() + y.numel()) for x, y in zip(self.inputs, self.targets) if x is not None)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if any(x is None for x in self.inputs):
            raise RuntimeError("a micro-batched capture left a concept without sample rows")
        rows = min(x.shape[0] for x in self.inputs)
        return torch.stack([x[:rows] for x in self.inputs]), torch.stack([y[:rows] for y in self.targets])

    def target_distances(self) -> torch.Tensor:
        """(N, N) ||Ys_i - Ys_j||: lower bounds of ||Y_i - Y_j||."""
        _, targets = self._stacked()
        flat = targets.reshape(targets.shape[0], -1)
        return torch.cdist(flat, flat)

    def prediction_distances(self, weight: torch.Tensor) -> torch.Tensor:
        """(N, N) ||Xs_i W^T - Ys_j|| for the merged weight W = W0 + dW (D_out, D_in): lower bounds of ||Yhat_i - Y_j||."""
        inputs, targets = self._stacked()
        predictions = (inputs @ weight.to(inputs).T).reshape(inputs.shape[0], -1)  # differentiable in weight
        return torch.cdist(predictions, targets.reshape(targets.shape[0], -1))


class PairedDistances:
    """||Y_i - Y_j|| for the pairs captured in one batch (from T_ij), sample bounds for the others."""

    def __init__(self, n_concepts: int, device: torch.device | str):
        self.target_inner = torch.zeros(n_concepts, n_concepts, dtype=torch.float64, device=device)
        self.together = torch.zeros(n_concepts, n_concepts, dtype=torch.bool, device=device)
        self.sample: PairSample | None = None  # set by a micro-batched capture

    def add(self, flat_targets: torch.Tensor, concepts: range) -> None:
        """Concept-aligned targets of one batch, flattened (m, values) float64."""
        block = slice(concepts.start, concepts.stop)
        self.target_inner[block, block].addmm_(flat_targets, flat_targets.T)
        self.together[block, block] = True

    def keep_sample(self, concepts: range, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """A micro-batch's first call at this target: inputs (m, r, D_in), bias-free targets (m, r', D_out), r' >= SAMPLE_ROWS or all."""
        if self.sample is None:
            self.sample = PairSample(self.target_inner.shape[0])
        self.sample.add(concepts, inputs[:, :SAMPLE_ROWS], targets[:, :SAMPLE_ROWS])

    def target_distances(self) -> torch.Tensor:
        """(N, N) ||Y_i - Y_j|| where captured together, else a lower bound of it (0 without a sample)."""
        exact = _distances(self.target_inner)
        if bool(self.together.all()):
            return exact
        bound = self.sample.target_distances().to(exact) if self.sample is not None else torch.zeros_like(exact)
        return torch.where(self.together, exact, bound)

    @property
    def sampled(self) -> bool:
        """True when some pairs were never captured together and a sample bounds them."""
        return self.sample is not None and not bool(self.together.all())

    def prediction_bounds(self, weight: torch.Tensor) -> torch.Tensor:
        """(N, N) sample lower bounds of ||Yhat_i - Y_j|| for the pairs never captured together (0 for the others)."""
        bounds = self.sample.prediction_distances(weight)
        return torch.where(self.together, torch.zeros_like(bounds), bounds)


class InputStats:
    """The triangular factor of ``[X | C]`` for one layer input read by one or more targets."""

    def __init__(self, d_in: int, n_concepts: int, device: torch.device | str = "cpu"):
        self.d_in = d_in
        self.n_concepts = n_concepts
        self.device = torch.device(device)
        self.downs: list[list[torch.Tensor | None]] = []  # per column block: per concept D_i (r_i, D_in)
        self.column_blocks: dict[str, list[slice | None]] = {}  # target -> per concept its C_i columns
        self.width = d_in  # columns of [X | C]
        self.rows = 0  # rows per concept
        self._pending: list[tuple[range, torch.Tensor]] = []  # (concepts, (m, r, D_in) rows) not folded yet
        self._pending_rows = 0
        self._triangle: torch.Tensor | None = None  # (width, width) fp32, upper triangular

    def register(self, target: str, downs: list[torch.Tensor | None]) -> None:
        """Add a target reading this input: its concepts' down factors (r_i, D_in), None where absent."""
        if self.rows:
            raise RuntimeError("targets must be registered before rows are added")
        blocks = []
        for down in downs:
            if down is None:
                blocks.append(None)
                continue
            blocks.append(slice(self.width, self.width + down.shape[0]))
            self.width += down.shape[0]
        self.column_blocks[target] = blocks
        self.downs.append([None if d is None else d.to(self.device, torch.float32) for d in downs])

    @property
    def kept(self) -> bool:
        """True while every row is kept as it came (no QR has folded any)."""
        return self._triangle is None

    def nbytes(self) -> int:
        held = sum(chunk.numel() for _, chunk in self._pending) + (0 if self._triangle is None else self._triangle.numel())
        return 4 * held

    def add(self, inputs: torch.Tensor, concepts: range | None = None) -> None:
        """Concept-aligned input rows (m, r, D_in) of ``concepts`` (default: all N, in order).

        A micro-batched capture adds each batch's concepts in turn; every concept must end up
        with the same rows (``rows`` counts those of concept 0).
        """
        concepts = _concepts(concepts, self.n_concepts)
        if inputs.dim() != 3 or inputs.shape[0] != len(concepts) or inputs.shape[2] != self.d_in:
            raise ValueError(f"expected ({len(concepts)}, r, {self.d_in}) input rows, got {tuple(inputs.shape)}")
        self._pending.append((concepts, inputs.detach().to(self.device, torch.float32)))
        self._pending_rows += inputs.shape[0] * inputs.shape[1]
        if 0 in concepts:
            self.rows += inputs.shape[1]
        if self._pending_rows >= self.width:
            self._fold()

    def _augmented(self, inputs: torch.Tensor, concepts: range) -> torch.Tensor:
        """(m*r, width) rows of [X | C] for concept-aligned inputs (m, r, D_in) of ``concepts``."""
        m, r, _ = inputs.shape
        rows = inputs.new_zeros(m, r, self.width)
        rows[:, :, :self.d_in] = inputs
        for downs, blocks in zip(self.downs, self.column_blocks.values()):
            for offset, concept in enumerate(concepts):
                down, block = downs[concept], blocks[concept]
                if down is not None:
                    rows[offset, :, block] = inputs[offset] @ down.T
        return rows.reshape(m * r, self.width)

    def _fold(self) -> None:
        """QR of [R; pending rows] in pieces of at most ``width`` rows, so the work space stays bounded."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        step = max(1, self.width // self.n_concepts)  # rows per concept in one piece
        for concepts, chunk in pending:
            for start in range(0, chunk.shape[1], step):
                piece = self._augmented(chunk[:, start:start + step], concepts)
                stacked = piece if self._triangle is None else torch.cat([self._triangle, piece])
                triangle = torch.linalg.qr(stacked, mode="r").R
                if triangle.shape[0] < self.width:  # fewer rows than columns so far: pad to square
                    triangle = torch.cat([triangle, triangle.new_zeros(self.width - triangle.shape[0], self.width)])
                self._triangle = triangle

    def kept_rows(self) -> torch.Tensor | None:
        """(N, R, D_in) fp32 rows while kept, else None."""
        if not self.kept:
            return None
        per_concept: list[list[torch.Tensor]] = [[] for _ in range(self.n_concepts)]
        for concepts, chunk in self._pending:
            for offset, concept in enumerate(concepts):
                per_concept[concept].append(chunk[offset])
        if not self._pending:
            return torch.zeros(self.n_concepts, 0, self.d_in, device=self.device)
        return torch.stack([torch.cat(chunks) for chunks in per_concept])

    def factor(self, target: str) -> torch.Tensor:
        """float64 T (m, D_in + K_t) with T^T T = [X | C_t]^T [X | C_t], C_t one target's columns in concept order."""
        blocks = [block for block in self.column_blocks[target] if block is not None]
        index = torch.cat([torch.arange(self.d_in)] + [torch.arange(b.start, b.stop) for b in blocks]).to(self.device)
        if self._triangle is not None and self._pending:
            self._fold()
        if self.kept:
            rows = self.kept_rows()
            matrix = self._augmented(rows, range(self.n_concepts)) if rows.shape[1] else rows.new_zeros(0, self.width)
        else:
            matrix = self._triangle
        return matrix.index_select(1, index).double()


class TargetStats:
    """What one target needs beyond its shared ``InputStats``: the targets' inner products T_ij.

    T_ij = <O_i, O_j> of the concepts' aligned LoRA-applied outputs as the layer gave them (any
    layout, bias included), N x N in float64: the hinge's certificate needs the distances
    ||Y_i - Y_j|| between concepts' targets, which no per-concept statistic gives (they pair rows
    of different concepts), and the bias cancels in them. Pairs a micro-batched capture never
    saw together get sample bounds instead (``PairedDistances``).
    """

    def __init__(self, target: str, weight: torch.Tensor, inputs: InputStats):
        self.target = target
        self.inputs = inputs
        self.n_concepts = inputs.n_concepts
        self.d_out = int(weight.shape[0])
        self._weight = weight  # the model's own, never copied: a pass holds many layers
        self.pairs = PairedDistances(self.n_concepts, inputs.device)

    @property
    def target_inner(self) -> torch.Tensor:
        return self.pairs.target_inner

    @property
    def base_weight(self) -> torch.Tensor:
        """(D_out, D_in) view of the layer's weight."""
        return self._weight.detach().reshape(self.d_out, -1)

    @classmethod
    def from_features(
        cls,
        base_weight: torch.Tensor,
        inputs: list[torch.Tensor],
        factors: list[LowRank | None],
        chunk_rows: int = 4096,
        batches: list[range] | None = None,
    ) -> "TargetStats":
        """Streamed statistics of raw aligned inputs X_i (R, D_in), fp32, targets from the concept factors.

        ``batches``: concept micro-batches fed one after the other, as a capture that cannot
        batch every concept would (default: all together).
        """
        if len({x.shape[0] for x in inputs}) != 1 or len(factors) != len(inputs):
            raise ValueError("inputs must be aligned (same row count), one factor (or None) per input")
        shared = InputStats(base_weight.shape[1], len(inputs), base_weight.device)
        shared.register("layer", [None if f is None else f.down for f in factors])
        stats = cls("layer", base_weight, shared)
        base = base_weight.float()
        for concepts in batches or [range(len(inputs))]:
            for start in range(0, inputs[0].shape[0], chunk_rows):
                x = torch.stack([inputs[i][start:start + chunk_rows] for i in concepts]).float()  # (m, r, D_in)
                y = x @ base.T
                for offset, i in enumerate(concepts):
                    if factors[i] is not None:
                        y[offset] += (x[offset] @ factors[i].down.float().T) @ factors[i].up.float().T
                if start == 0 and len(concepts) < len(inputs):
                    stats.pairs.keep_sample(concepts, x, y)
                shared.add(x, concepts)
                stats.add_targets(y, concepts)
        return stats

    @property
    def rows(self) -> int:
        return self.inputs.rows

    def add_targets(self, outputs: torch.Tensor, concepts: range | None = None) -> None:
        """A concept-aligned batch output (m*k, ...) of ``concepts``, in float64 slices: a layer's whole output never doubles."""
        concepts = _concepts(concepts, self.n_concepts)
        flat = outputs.detach().reshape(len(concepts), -1)
        for start in range(0, flat.shape[1], TARGET_SLICE):
            self.pairs.add(flat[:, start:start + TARGET_SLICE].to(self.inputs.device, torch.float64), concepts)

    def target_distances(self) -> torch.Tensor:
        """(N, N) ||Y_i - Y_j|| (lower bounds for pairs never captured together)."""
        return self.pairs.target_distances()

    def exact(self, factors: list[LowRank | None]) -> "LayerStats | None":
        """The exact per-concept statistics, when the raw rows are still kept (targets rebuilt from them)."""
        rows = self.inputs.kept_rows()
        if rows is None:
            return None
        base = self.base_weight.float()
        targets = rows @ base.T  # (N, R, D_out) bias-free Y_i = X_i (W0 + Delta_i)^T
        for i, factor in enumerate(factors):
            if factor is not None:
                targets[i] += (rows[i] @ factor.down.to(rows).T) @ factor.up.to(rows).T
        stats = LayerStats(base, self.n_concepts)
        stats.add(list(rows), list(targets))  # every pair rebuilt from the rows: exact
        return stats


def _distances(target_inner: torch.Tensor) -> torch.Tensor:
    sq_norms = target_inner.diagonal()
    return (sq_norms[:, None] + sq_norms[None, :] - 2 * target_inner).clamp_min(0).sqrt()


class LayerStats:
    """Exact per-concept statistics of N concepts' aligned blocks for one weight (D_out, D_in), float64.

    G_i = X_i^T X_i (or the rows themselves while all concepts' rows are fewer than D_in) and
    T_ij = <Y_i, Y_j>. Targets Y_i must be bias-free and equal X_i (W0 + Delta_i)^T.
    Memory N * D_in^2: built only for a layer whose hinge needs refining. A micro-batched
    capture adds each batch's concepts in turn (Grams at once, T_ij within the batch).
    """

    def __init__(self, base_weight: torch.Tensor, n_concepts: int):
        if base_weight.dim() != 2:
            raise ValueError(f"base weight must be a (D_out, D_in) matrix, got shape {tuple(base_weight.shape)}")
        if n_concepts < 2:
            raise ValueError(f"LayerStats needs at least two concepts, got {n_concepts}")
        self.n_concepts = n_concepts
        self.base_weight = base_weight.detach().to(torch.float64)  # (D_out, D_in)
        self.d_out = int(base_weight.shape[0])
        self.grams: torch.Tensor | None = None  # (N, D_in, D_in) once the rows are too many to keep
        self.pairs = PairedDistances(n_concepts, base_weight.device)
        self.rows = 0  # rows per concept (aligned, so one count)
        self._input_rows: torch.Tensor | None = torch.zeros(
            n_concepts, 0, base_weight.shape[1], dtype=torch.float64, device=base_weight.device
        )  # (N, R, D_in) while kept

    @property
    def device(self) -> torch.device:
        return self.base_weight.device

    @property
    def target_inner(self) -> torch.Tensor:
        return self.pairs.target_inner

    def add(self, input_chunks: list[torch.Tensor], target_chunks: list[torch.Tensor], concepts: range | None = None) -> None:
        """Accumulate one aligned chunk: concept i's input rows (r, D_in) and target rows (r, D_out)."""
        concepts = _concepts(concepts, self.n_concepts)
        d_out, d_in = self.base_weight.shape
        if len(input_chunks) != len(concepts) or len(target_chunks) != len(concepts):
            raise ValueError(
                f"expected {len(concepts)} input and target chunks, got {len(input_chunks)} and {len(target_chunks)}"
            )
        rows = input_chunks[0].shape[0]
        for i, (x, y) in enumerate(zip(input_chunks, target_chunks)):
            if tuple(x.shape) != (rows, d_in) or tuple(y.shape) != (rows, d_out):
                raise ValueError(
                    f"concept {i}: chunks must be ({rows}, {d_in}) inputs and ({rows}, {d_out}) targets "
                    f"(rows aligned across concepts), got {tuple(x.shape)} and {tuple(y.shape)}"
                )
        targets = torch.stack(target_chunks).to(self.device, torch.float64).reshape(len(concepts), -1)  # (m, r*D_out)
        self.pairs.add(targets, concepts)
        self.add_rows(torch.stack(input_chunks).to(self.device, torch.float64), concepts)

    def add_rows(self, inputs: torch.Tensor, concepts: range | None = None) -> None:
        """Aligned input rows (m, r, D_in) float64 of ``concepts`` (default all)."""
        concepts = _concepts(concepts, self.n_concepts)
        everyone = len(concepts) == self.n_concepts
        if everyone and self._input_rows is not None and self.n_concepts * (self.rows + inputs.shape[1]) <= self.base_weight.shape[1]:
            self._input_rows = torch.cat([self._input_rows, inputs], dim=1)
        else:
            if self.grams is None:
                kept = self._input_rows
                self.grams = kept.transpose(1, 2) @ kept
                self._input_rows = None
            self.grams[concepts.start:concepts.stop].baddbmm_(inputs.transpose(1, 2), inputs)
        if 0 in concepts:
            self.rows += inputs.shape[1]

    @classmethod
    def from_features(
        cls,
        base_weight: torch.Tensor,
        inputs: list[torch.Tensor],
        deltas: list[torch.Tensor | None],
        chunk_rows: int = 4096,
        batches: list[range] | None = None,
    ) -> LayerStats:
        """Statistics of raw aligned inputs X_i (R, D_in), targets computed from the concept deltas (``batches``: as above)."""
        stats = cls(base_weight, len(inputs))
        if len(deltas) != len(inputs):
            raise ValueError(f"got {len(deltas)} concept deltas for {len(inputs)} concept inputs")
        if len({x.shape[0] for x in inputs}) != 1:
            raise ValueError(f"concept inputs must have the same row count, got {[x.shape[0] for x in inputs]}")
        weights = [base_weight if delta is None else base_weight + delta.to(base_weight) for delta in deltas]
        for concepts in batches or [range(len(inputs))]:
            for start in range(0, inputs[0].shape[0], chunk_rows):
                chunks = [inputs[i][start:start + chunk_rows].to(base_weight) for i in concepts]
                targets = [x @ weights[i].T for x, i in zip(chunks, concepts)]
                if start == 0 and len(concepts) < len(inputs):
                    stats.pairs.keep_sample(concepts, torch.stack(chunks), torch.stack(targets))
                stats.add(chunks, targets, concepts)
        return stats

    def _rows(self) -> torch.Tensor | None:
        """(N, R, D_in) raw rows while they are kept, else None."""
        return self._input_rows if self._input_rows is not None and self._input_rows.shape[1] else None

    def gram_sum_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors (columns) of sum_i G_i, from the rows themselves when few."""
        rows = self._rows()
        if rows is None:
            if self.grams is None:
                d_in = self.base_weight.shape[1]
                return torch.linalg.eigh(torch.zeros(d_in, d_in, dtype=torch.float64, device=self.device))
            return torch.linalg.eigh(self.grams.sum(0))
        _, singular_values, right_vectors = torch.linalg.svd(rows.reshape(-1, rows.shape[-1]), full_matrices=False)
        return singular_values.square(), right_vectors.T

    def times_gram(self, i: int, matrix: torch.Tensor) -> torch.Tensor:
        """matrix @ G_i for a (k, D_in) matrix."""
        rows = self._rows()
        if rows is None:
            return matrix @ self.gram(i)
        return (matrix @ rows[i].T) @ rows[i]

    def quadratic_forms(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(N,) tr(left G_i right^T) for (D_out, D_in) matrices, i.e. <X_i left^T, X_i right^T>."""
        rows = self._rows()
        if rows is None:
            return self.grams.reshape(self.n_concepts, -1) @ (left.T @ right).reshape(-1)
        return ((rows @ left.T) * (rows @ right.T)).sum(dim=(1, 2))

    def gram(self, i: int) -> torch.Tensor:
        """G_i = X_i^T X_i, (D_in, D_in) float64."""
        rows = self._rows()
        if rows is not None:
            return rows[i].T @ rows[i]
        if self.grams is None:
            d_in = self.base_weight.shape[1]
            return torch.zeros(d_in, d_in, dtype=torch.float64, device=self.device)
        return self.grams[i]

    def target_distances(self) -> torch.Tensor:
        """(N, N) ||Y_i - Y_j|| from T (float64: the expansion's cancellation stays far below fp32 input rounding)."""
        return self.pairs.target_distances()
