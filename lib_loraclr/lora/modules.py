"""One ``LoraModule`` subclass per module type found in LoRA files.

Each class says which tensor roles (kohya/LyCORIS suffix names) make it up, so the reader
picks the class by the suffixes a key group has (``module_class_for``); adding a type is
adding a class here. Formulas follow LyCORIS and A1111's built-in Lora extension:
scale = alpha / rank, and alpha missing means scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import LoraModule

ALPHA = "alpha"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _restore_kernel(delta: torch.Tensor, kernel: tuple[int, int] | None) -> torch.Tensor:
    """LyCORIS stores some conv factors flattened: (out, in*kh*kw) -> (out, in, kh, kw)."""
    if delta.dim() == 2 and kernel is not None and delta.shape[1] % (kernel[0] * kernel[1]) == 0:
        return delta.reshape(delta.shape[0], -1, *kernel)
    return delta


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
        return tuple(self.delta_weight().shape)

    def check_shapes(self) -> None:
        """Raise (RuntimeError/ValueError) when the tensors cannot form a delta."""
        self.delta_weight()


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
        up, down, mid = self._t("lora_up.weight"), self._t("lora_down.weight"), self._t("lora_mid.weight")
        kernel = tuple((mid if mid is not None else down).shape[2:])
        return (int(up.shape[0]), int(down.shape[1]), *kernel)

    def check_shapes(self) -> None:
        """Factor shapes must chain: up (out, r[,1,1]), [mid (r, r, kh, kw)], down (r, in, ...)."""
        up, down, mid = self._t("lora_up.weight"), self._t("lora_down.weight"), self._t("lora_mid.weight")
        inner = down.shape[0] if mid is None else mid.shape[0]
        if up.shape[1] != inner or (mid is not None and mid.shape[1] != down.shape[0]):
            raise ValueError(
                f"up {tuple(up.shape)}, down {tuple(down.shape)}"
                + ("" if mid is None else f", mid {tuple(mid.shape)}")
            )

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

    def delta_weight(self) -> torch.Tensor:
        return _f32(self.tensors["diff"]).clone()


def module_class_for(roles: set[str]) -> type[TensorModule] | None:
    """The registered module class whose role sets match ``roles`` exactly, or None."""
    for cls in LoraModule.registry.values():
        if issubclass(cls, TensorModule) and cls.matches(roles):
            return cls
    return None
