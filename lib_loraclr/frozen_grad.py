"""Gradients through a model whose weights are inference tensors (Forge), without copying them.

Forge loads every weight under ``torch.inference_mode()``. Autograd refuses to save an
inference tensor for backward, and ``F.linear(x, weight)`` with ``x`` requiring grad saves
``weight``; Forge's transformer blocks also add residuals in place (``x += n``), which breaks
the graph. CLoRA needs d(loss)/d(latent) through part of the UNet, so inside
``GradThroughFrozen``:

- linear and conv calls on a frozen (inference) weight run through autograd functions that
  keep the weight as a plain reference for their backward (the weight needs no gradient,
  so nothing of it has to be saved) instead of ``save_for_backward``;
- the same for a cast copy of a frozen weight (Forge's manual cast: bf16/fp8 storage computed
  in fp16/fp32, ``weight.to(dtype=x.dtype)`` in each layer's forward): the backward keeps the
  stored weight and casts it again, so the graph never holds a second copy of the UNet;
- any other call that would save an inference tensor (the norms' small affine weights) gets
  an ordinary copy of it;
- ``x += n`` (and ``-=``, ``*=``, ``/=``) on tensors in the graph becomes out of place.

Outside the ``with`` block nothing is changed. Costs no weight copy of the linear/conv layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ``x += n`` reaches a TorchFunctionMode as ``Tensor.add_``; its result is what Python rebinds
# ``x`` to, so returning a new tensor makes the statement out of place. A bare ``x.add_(n)``
# whose result is ignored would lose the update: Forge's UNet has none on the path CLoRA
# differentiates (its one, ``sim.add_(mask)``, runs only with an attention mask).
_IN_PLACE = {
    torch.Tensor.add_: torch.add,
    torch.Tensor.sub_: torch.sub,
    torch.Tensor.mul_: torch.mul,
    torch.Tensor.div_: torch.div,
}


# Attribute set on a cast copy of a frozen weight: the stored tensor it was cast from.
_CAST_FROM = "_loraclr_cast_from"


def _stored(weight: torch.Tensor) -> torch.Tensor:
    """What a backward may keep for ``weight``: the frozen tensor itself, or the one it was cast from."""
    return getattr(weight, _CAST_FROM, weight)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight, bias):
        ctx.weight = _stored(weight)  # a reference, not save_for_backward: inference tensors may not be saved
        return F.linear(hidden_states, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.matmul(ctx.weight.to(grad_output.device, grad_output.dtype)), None, None


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight, bias, stride, padding, dilation, groups):
        ctx.weight = _stored(weight)
        ctx.input_shape = hidden_states.shape
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(hidden_states, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        stride, padding, dilation, groups = ctx.conv
        grad_input = torch.nn.grad.conv2d_input(
            ctx.input_shape, ctx.weight.to(grad_output.device, grad_output.dtype), grad_output, stride, padding,
            dilation, groups,
        )
        return grad_input, None, None, None, None, None, None


def _needs_grad(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _is_frozen(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_inference()


def _is_frozen_weight(value) -> bool:
    """A frozen tensor, or a cast copy of one (marked when the cast ran inside the mode)."""
    return _is_frozen(value) or hasattr(value, _CAST_FROM)


def _plain(value):
    return value.clone() if _is_frozen(value) else value


class GradThroughFrozen(TorchFunctionMode):
    """Use as ``with GradThroughFrozen():`` around a forward/backward that must differentiate
    through inference-tensor weights (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func is torch.Tensor.to and args and _is_frozen(args[0]):
            cast = func(*args, **kwargs)
            if cast is not args[0] and not cast.is_inference():
                setattr(cast, _CAST_FROM, args[0])
            return cast
        if args and hasattr(args[0], _CAST_FROM) and getattr(func, "__name__", "").endswith("_"):
            delattr(args[0], _CAST_FROM)  # changed in place: no longer a plain cast of the stored weight
        values = list(args) + list(kwargs.values())
        if func in _IN_PLACE and _needs_grad(values):
            return _IN_PLACE[func](*args, **kwargs)
        if not any(_is_frozen_weight(v) for v in values) or not _needs_grad(values):
            return func(*args, **kwargs)
        if func is F.linear and _frozen_weight_call(args, kwargs, 3):
            hidden_states, weight, bias = _bound(args, kwargs, ("input", "weight", "bias"), (None,))
            return _FrozenLinear.apply(hidden_states, weight, bias)
        if func in (F.conv2d, torch.conv2d) and _frozen_weight_call(args, kwargs, 7):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = _bound(args, kwargs, names, (None, 1, 0, 1, 1))
            if not isinstance(bound[4], str):
                return _FrozenConv2d.apply(*bound)
        return func(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})


def _frozen_weight_call(args, kwargs, arity: int) -> bool:
    """True when only the weight/bias are frozen (or cast from frozen) and the input is an ordinary tensor."""
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    hidden_states = args[0] if args else kwargs.get("input")
    return _is_frozen_weight(weight) and not _is_frozen_weight(hidden_states) and len(args) <= arity


def _bound(args, kwargs, names, defaults) -> list:
    """Positional + keyword arguments -> the full positional list of ``names``."""
    values = list(args) + [kwargs.get(name) for name in names[len(args):]]
    first_default = len(names) - len(defaults)
    for i in range(len(args), len(names)):
        if names[i] not in kwargs and i >= first_default:
            values[i] = defaults[i - first_default]
    return values
