"""Gradients through inference-tensor weights and in-place residuals (how Forge holds its UNet)."""

import copy

import pytest
import torch
from torch import nn

from lib_loraclr.frozen_grad import GradThroughFrozen


class Block(nn.Module):
    """Conv, group norm, layer norm, linear and in-place residual adds, as Forge's blocks have."""

    def __init__(self):
        super().__init__()
        self.in_place = True
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):
        h = self.norm(self.conv(x))
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        n = self.proj(self.ln(tokens))
        if self.in_place:  # as Forge's BasicTransformerBlock
            tokens += n
            h = tokens.transpose(1, 2).reshape(h.shape)
            h += torch.nn.functional.silu(h)
        else:
            tokens = tokens + n
            h = tokens.transpose(1, 2).reshape(h.shape)
            h = h + torch.nn.functional.silu(h)
        return self.out(h)


def frozen_copy(module: nn.Module) -> nn.Module:
    """The same module with every parameter an inference tensor, as Forge loads them."""
    frozen = copy.deepcopy(module)
    with torch.inference_mode():
        for sub in frozen.modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None:
                    sub._parameters[name] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
    return frozen


def input_grad(module, x):
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(leaf).square().sum(), leaf)
    return grad


def test_gradient_through_frozen_weights_equals_the_ordinary_gradient():
    torch.manual_seed(0)
    block = Block()
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    frozen = frozen_copy(block)
    assert all(p.is_inference() for p in frozen.parameters())
    x = torch.randn(2, 4, 6, 6)
    block.in_place = False
    expected = input_grad(block, x)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors|inplace operation"):
        input_grad(frozen, x)
    with GradThroughFrozen():
        got = input_grad(frozen, x)
    torch.testing.assert_close(got, expected)
    assert all(p.is_inference() for p in frozen.parameters())


def test_outside_grad_the_mode_changes_nothing():
    torch.manual_seed(1)
    frozen = frozen_copy(Block())
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        plain = frozen(x)
        with GradThroughFrozen():
            inside = frozen(x)
    assert torch.equal(plain, inside)


class ManualCastLinear(nn.Module):
    """Forge's ``operations.Linear`` with manual cast: bf16 storage, cast to the input's dtype in
    every forward (``weights_manual_cast``); ``casts`` records weak references to the copies."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.inference_mode():
            self.weight = linear.weight.detach().to(torch.bfloat16).clone()
            self.bias = linear.bias.detach().to(torch.bfloat16).clone()
        self.casts = []

    def forward(self, x):
        import weakref

        weight, bias = self.weight.to(device=x.device, dtype=x.dtype), self.bias.to(device=x.device, dtype=x.dtype)
        self.casts.append(weakref.ref(weight))
        return torch.nn.functional.linear(x, weight, bias)


def test_cast_copies_of_frozen_weights_are_not_kept_for_backward_and_the_gradient_is_exact():
    """The graph keeps the stored (bf16) weight, never its fp32 cast: after the forward every cast
    copy is gone, and the gradient equals the one through ordinary fp32 weights cast from it."""
    import gc

    torch.manual_seed(3)
    layers = [nn.Linear(16, 16) for _ in range(3)]
    model = nn.Sequential(*[ManualCastLinear(layer) for layer in layers])
    reference = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
    with torch.no_grad():
        for ours, plain in zip(model, reference):
            plain.weight.copy_(ours.weight.float())
            plain.bias.copy_(ours.bias.float())
    x = torch.randn(4, 16)
    expected = input_grad(reference, x)
    leaf = x.clone().requires_grad_(True)
    with GradThroughFrozen():
        loss = model(leaf).square().sum()
        gc.collect()
        assert all(cast() is None for layer in model for cast in layer.casts), "a cast copy is held by the graph"
        (got,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(got, expected)
