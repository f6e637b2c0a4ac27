"""One ``LoraModule`` subclass per module type found in LoRA files.

Each class says which tensor roles (kohya/LyCORIS suffix names) make it up, so the reader
picks the class by the suffixes a key group has (``module_class_for``); adding a type is
adding a class here. Formulas follow LyCORIS and A1111's built-in Lora extension:
scale = alpha / rank, and alpha missing means scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import LoraModule

ALPHA = "alpha"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


MAX_DELTA_ELEMENTS = 2**26  # one layer's dense delta: 256 MiB in fp32; SD's largest layer has 63M weights
MAX_DELTA_VALUE = 1e4  # a weight change this large is no LoRA a model could use (weights are O(1))


class ShapeError(ValueError):
    """Tensors of one module that cannot form a delta; the reader adds the file and key."""


def _restored_shape(shape: tuple[int, ...], kernel: tuple[int, int] | None) -> tuple[int, ...]:
    """LyCORIS stores some conv factors flattened: (out, in*kh*kw) -> (out, in, kh, kw)."""
    if len(shape) == 2 and kernel is not None and shape[1] % (kernel[0] * kernel[1]) == 0:
        return (shape[0], shape[1] // (kernel[0] * kernel[1]), *kernel)
    return shape


def _restore_kernel(delta: torch.Tensor, kernel: tuple[int, int] | None) -> torch.Tensor:
    return delta.reshape(_restored_shape(tuple(delta.shape), kernel))


def _dims(tensors: dict[str, torch.Tensor], role: str, *allowed: int) -> tuple[int, ...]:
    """The shape of ``role``, refused unless it has one of the ``allowed`` numbers of dims and no empty dim."""
    shape = tuple(tensors[role].shape)
    if len(shape) not in allowed:
        raise ShapeError(f"{role} has shape {shape}; expected {' or '.join(f'{n}-D' for n in allowed)}")
    if 0 in shape:
        raise ShapeError(f"{role} has shape {shape}: an empty dimension (rank 0?)")
    return shape


def _peak(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().max())


def _product_bound(a: torch.Tensor, b: torch.Tensor, inner: int) -> float:
    """An upper bound of |(a @ b)_ij|: inner * max|a| * max|b|, without forming the product."""
    return inner * _peak(a) * _peak(b)


@dataclass(eq=False)
class TensorModule(LoraModule):
    """A module built from named tensors of a file; subclasses declare their role sets.

    ``role_sets``: the allowed sets of required roles (alternatives); ``optional_roles``
    may be present in addition. ``kernel`` is the conv kernel size known from the target
    name, used only where the file stores conv factors flattened.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    kernel: tuple[int, int] | None = None
    role_sets: ClassVar[tuple[frozenset[str], ...]] = ()
    optional_roles: ClassVar[frozenset[str]] = frozenset({ALPHA})

    @classmethod
    def matches(cls, roles: set[str]) -> bool:
        return frozenset(roles - cls.optional_roles) in cls.role_sets

    def _t(self, role: str) -> torch.Tensor | None:
        return self.tensors.get(role)

    @property
    def alpha(self) -> float:
        alpha = self._t(ALPHA)
        return float(self.rank) if alpha is None else float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The delta's shape, from the factors' shapes alone (nothing is allocated)."""
        raise NotImplementedError

    def value_bound(self) -> float:
        """An upper bound of the delta's largest |value|, from the factors alone."""
        raise NotImplementedError

    def check_shapes(self) -> None:
        """Raise ``ShapeError`` unless the tensors form a delta of a plausible size and magnitude.

        Runs before any delta is built: a file of a few bytes can declare factors whose
        product would need gigabytes.
        """
        shape = self.weight_shape
        elements = math.prod(shape)
        if elements > MAX_DELTA_ELEMENTS:
            raise ShapeError(f"its delta would have shape {shape} ({elements:.3g} weights), more than any SD layer "
                             f"({MAX_DELTA_ELEMENTS:.3g})")
        if self.rank < 1:
            raise ShapeError("rank 0")
        alpha = self._t(ALPHA)
        if alpha is not None and (alpha.numel() != 1 or not float(alpha) > 0):
            raise ShapeError(f"alpha must be one positive number, got {alpha.tolist()}")
        bound = self.value_bound()
        if not bound <= MAX_DELTA_VALUE:
            raise ShapeError(f"its weight change could reach {bound:.3g} per weight, far beyond any model's weights "
                             f"(at most {MAX_DELTA_VALUE:g} is accepted): a corrupt file?")


@dataclass(eq=False)
class LoraUpDown(TensorModule):
    """Classic LoRA / LoCon: delta = scale * up @ down.

    Linear: up (out, r), down (r, in). Conv: up (out, r, 1, 1), down (r, in, kh, kw).
    With a Tucker core (``lora_mid``, LyCORIS "use_tucker"): down (r, in, 1, 1),
    mid (r, r, kh, kw), delta[o,i,k,l] = sum_nm up[o,n] mid[n,m,k,l] down[m,i].
    """

    kind: ClassVar[str] = "lora"
    role_sets = (frozenset({"lora_up.weight", "lora_down.weight"}),)
    optional_roles = frozenset({ALPHA, "lora_mid.weight"})

    @property
    def rank(self) -> int:
        return int(self.tensors["lora_down.weight"].shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Factor shapes must chain: up (out, r[,1,1]), [mid (r, r, kh, kw)], down (r, in[, kh, kw])."""
        t = self.tensors
        up, down = _dims(t, "lora_up.weight", 2, 4), _dims(t, "lora_down.weight", 2, 4)
        mid = _dims(t, "lora_mid.weight", 4) if "lora_mid.weight" in t else None
        inner = down[0] if mid is None else mid[0]
        if up[1] != inner or up[2:] not in ((), (1, 1)) or (mid is not None and (mid[1] != down[0] or down[2:] not in ((), (1, 1)))):
            raise ShapeError(f"up {up}, down {down}" + ("" if mid is None else f", mid {mid}") + " do not chain")
        return (up[0], down[1], *(mid if mid is not None else down)[2:])

    def value_bound(self) -> float:
        t = self.tensors
        up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
        bound = _product_bound(up, down, down.shape[0])
        if mid is not None:
            bound *= mid.shape[0] * _peak(mid)
        return self.scale * bound

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up * scale, down) in fp32, applicable as two layers in sequence.

        Conv: down (r, in, kh, kw) runs with the base conv's stride/padding, then
        up (out, r, 1, 1). A Tucker core is folded into down, which is exact.
        """
        up = _f32(self.tensors["lora_up.weight"]) * self.scale
        down = _f32(self.tensors["lora_down.weight"])
        mid = self._t("lora_mid.weight")
        if mid is not None:
            down = torch.einsum("nmkl,mi->nikl", _f32(mid), down.flatten(1))  # (r, in, kh, kw)
        return up, down

    def delta_weight(self) -> torch.Tensor:
        up, down = self.low_rank()
        return (up.flatten(1) @ down.flatten(1)).reshape(self.weight_shape)


def _tucker(core: torch.Tensor, up_t: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: core (r, r, kh, kw), up_t (r, out), down (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,io,jn->onkl", _f32(core), _f32(up_t), _f32(down))


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up (out, r) @ down (r, in[, kh, kw]) with down's trailing dims kept."""
    return (_f32(up).flatten(1) @ _f32(down).flatten(1)).reshape(up.shape[0], *down.shape[1:])


@dataclass(eq=False)
class LoHa(TensorModule):
    """LoHa: delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product).

    With Tucker cores hada_t1/t2 (r, r, kh, kw), w*_a is (r, out) and w*_b is (r, in).
    """

    kind: ClassVar[str] = "loha"
    _PAIRS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    role_sets = (_PAIRS, _PAIRS | {"hada_t1", "hada_t2"})

    @property
    def rank(self) -> int:
        return int(self.tensors["hada_w1_b"].shape[0])

    def _factor(self, n: int) -> torch.Tensor:
        a, b, t = self.tensors[f"hada_w{n}_a"], self.tensors[f"hada_w{n}_b"], self._t(f"hada_t{n}")
        return _product(a, b) if t is None else _tucker(t, a, b)

    def _factor_shape(self, n: int) -> tuple[int, ...]:
        a, b = _dims(self.tensors, f"hada_w{n}_a", 2), _dims(self.tensors, f"hada_w{n}_b", 2, 4)
        if f"hada_t{n}" not in self.tensors:
            if a[1] != b[0]:
                raise ShapeError(f"hada_w{n}_a {a} and hada_w{n}_b {b} do not chain")
            return (a[0], *b[1:])
        core = _dims(self.tensors, f"hada_t{n}", 4)
        if len(b) != 2 or core[0] != a[0] or core[1] != b[0]:
            raise ShapeError(f"hada_t{n} {core}, hada_w{n}_a {a}, hada_w{n}_b {b} do not chain")
        return (a[1], b[1], *core[2:])

    def _factor_bound(self, n: int) -> float:
        a, b, t = self.tensors[f"hada_w{n}_a"], self.tensors[f"hada_w{n}_b"], self._t(f"hada_t{n}")
        if t is None:
            return _product_bound(a, b, b.shape[0])
        return t.shape[0] * t.shape[1] * _peak(t) * _peak(a) * _peak(b)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Both Hadamard factors must have the same shape (no broadcasting)."""
        first, second = self._factor_shape(1), self._factor_shape(2)
        if first != second:
            raise ShapeError(f"the two Hadamard factors have shapes {first} and {second}")
        return _restored_shape(first, self.kernel)

    def value_bound(self) -> float:
        return self.scale * self._factor_bound(1) * self._factor_bound(2)

    def delta_weight(self) -> torch.Tensor:
        return _restore_kernel(self._factor(1) * self._factor(2) * self.scale, self.kernel)


@dataclass(eq=False)
class LoKr(TensorModule):
    """LoKr: delta = scale * kron(w1, w2), each factor full or a low-rank product.

    w1 (a, c) or w1_a (a, r) @ w1_b (r, c); w2 (b, d[, kh, kw]) or w2_a (b, r) @ w2_b
    (r, d[, kh, kw]) or, with Tucker core lokr_t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d).
    As in LyCORIS, scale = alpha / rank only when some factor is decomposed, else 1.
    """

    kind: ClassVar[str] = "lokr"
    role_sets = tuple(
        frozenset(w1 | w2)
        for w1 in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
        for w2 in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
    )
    optional_roles = frozenset({ALPHA, "lokr_t2"})

    @property
    def decomposed(self) -> bool:
        return "lokr_w1_b" in self.tensors or "lokr_w2_b" in self.tensors

    @property
    def rank(self) -> int:
        """The decomposition rank; for two full factors, the rank bound of kron (product of ranks)."""
        for role in ("lokr_w1_b", "lokr_w2_b"):
            if role in self.tensors:
                return int(self.tensors[role].shape[0])
        w1, w2 = self.tensors["lokr_w1"], self.tensors["lokr_w2"]
        return min(w1.shape) * min(w2.shape[0], w2[0].numel())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.decomposed else 1.0

    def _parts(self) -> tuple[tuple[int, ...], float, tuple[int, ...], float]:
        """(w1 shape, bound of |w1|, w2 shape, bound of |w2|) from the stored factors."""
        t = self.tensors
        if "lokr_w1" in t:
            w1, w1_bound = _dims(t, "lokr_w1", 2), _peak(t["lokr_w1"])
        else:
            a, b = _dims(t, "lokr_w1_a", 2), _dims(t, "lokr_w1_b", 2)
            if a[1] != b[0]:
                raise ShapeError(f"lokr_w1_a {a} and lokr_w1_b {b} do not chain")
            w1, w1_bound = (a[0], b[1]), _product_bound(t["lokr_w1_a"], t["lokr_w1_b"], b[0])
        if "lokr_w2" in t:
            w2, w2_bound = _dims(t, "lokr_w2", 2, 4), _peak(t["lokr_w2"])
        elif "lokr_t2" in t:
            core, a, b = _dims(t, "lokr_t2", 4), _dims(t, "lokr_w2_a", 2), _dims(t, "lokr_w2_b", 2)
            if core[0] != a[0] or core[1] != b[0]:
                raise ShapeError(f"lokr_t2 {core}, lokr_w2_a {a}, lokr_w2_b {b} do not chain")
            w2 = (a[1], b[1], *core[2:])
            w2_bound = core[0] * core[1] * _peak(t["lokr_t2"]) * _peak(t["lokr_w2_a"]) * _peak(t["lokr_w2_b"])
        else:
            a, b = _dims(t, "lokr_w2_a", 2), _dims(t, "lokr_w2_b", 2, 4)
            if a[1] != b[0]:
                raise ShapeError(f"lokr_w2_a {a} and lokr_w2_b {b} do not chain")
            w2, w2_bound = (a[0], *b[1:]), _product_bound(t["lokr_w2_a"], t["lokr_w2_b"], b[0])
        return w1, w1_bound, w2, w2_bound

    @property
    def weight_shape(self) -> tuple[int, ...]:
        w1, _, w2, _ = self._parts()
        return _restored_shape((w1[0] * w2[0], w1[1] * w2[1], *w2[2:]), self.kernel)

    def value_bound(self) -> float:
        _, w1_bound, _, w2_bound = self._parts()
        return self.scale * w1_bound * w2_bound

    def delta_weight(self) -> torch.Tensor:
        t = self.tensors
        w1 = _f32(t["lokr_w1"]) if "lokr_w1" in t else _product(t["lokr_w1_a"], t["lokr_w1_b"])
        if "lokr_w2" in t:
            w2 = _f32(t["lokr_w2"])
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = _product(t["lokr_w2_a"], t["lokr_w2_b"])
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
        return _restore_kernel(torch.kron(w1, w2.contiguous()) * self.scale, self.kernel)


@dataclass(eq=False)
class FullDiff(TensorModule):
    """A stored full weight difference ``diff`` (base weight shape).

    ``diff_b`` (a bias difference) is kept in ``tensors`` but not part of ``delta_weight``:
    nothing downstream merges biases.
    """

    kind: ClassVar[str] = "full"
    role_sets = (frozenset({"diff"}),)
    optional_roles = frozenset({ALPHA, "diff_b"})

    @property
    def rank(self) -> int:
        diff = self.tensors["diff"]
        return min(int(diff.shape[0]), diff[0].numel())

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        shape = _dims(self.tensors, "diff", 2, 4)
        if "diff_b" in self.tensors and tuple(self.tensors["diff_b"].shape) != shape[:1]:
            raise ShapeError(f"diff_b has shape {tuple(self.tensors['diff_b'].shape)}, diff {shape}")
        return shape

    def value_bound(self) -> float:
        return _peak(self.tensors["diff"])

    def delta_weight(self) -> torch.Tensor:
        return _f32(self.tensors["diff"]).clone()


def module_class_for(roles: set[str]) -> type[TensorModule] | None:
    """The registered module class whose role sets match ``roles`` exactly, or None."""
    for cls in LoraModule.registry.values():
        if issubclass(cls, TensorModule) and cls.matches(roles):
            return cls
    return None
