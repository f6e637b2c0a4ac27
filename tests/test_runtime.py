"""LoraRuntime against the reference it must equal: the same model with the deltas merged in."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lib_loraclr.lora.base import LoraFile, LoraModule
from lib_loraclr.runtime import LoraMismatchError, LoraRuntime

ATOL = 1e-5


@dataclass
class LowRank(LoraModule):
    """Minimal low-rank module (kind left empty so the shared registry stays untouched)."""

    up: torch.Tensor = None  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor = None  # (r, in) or (r, in, kh, kw)
    scale: float = 1.0
    low_rank_calls: int = 0
    delta_calls: int = 0

    @property
    def weight_shape(self):
        return (self.up.shape[0], *self.down.shape[1:])

    def delta_weight(self):
        self.delta_calls += 1
        return dense(self)

    def low_rank(self):
        self.low_rank_calls += 1
        return self.up * self.scale, self.down


@dataclass
class Dense(LoraModule):
    """Minimal module with no low-rank form, like LoHa/LoKr/full."""

    delta: torch.Tensor = None

    @property
    def weight_shape(self):
        return tuple(self.delta.shape)

    def delta_weight(self):
        return self.delta


def dense(module: LoraModule) -> torch.Tensor:
    if isinstance(module, Dense):
        return module.delta
    return (module.up.flatten(1) @ module.down.flatten(1)).reshape(module.weight_shape) * module.scale


def low_rank_for(target: str, layer: nn.Module, rank: int = 2, seed: int = 0) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels // layer.groups, *layer.kernel_size, generator=generator)
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
    else:
        down = torch.randn(rank, layer.in_features, generator=generator)
        up = torch.randn(layer.out_features, rank, generator=generator)
    return LowRank(target, up=up * 0.3, down=down * 0.3, scale=0.5)


def lora_file(name: str, modules: list[LoraModule]) -> LoraFile:
    return LoraFile(f"/loras/{name}.safetensors", "kohya", "sd1", {m.target: m for m in modules})


def merged(model: nn.Module, targets: dict[str, nn.Module], loras, multipliers) -> nn.Module:
    """Deep copy of model with multiplier * delta added to each adapted weight."""
    copy_model = copy.deepcopy(model)
    names = {id(module): name for name, module in model.named_modules()}
    copy_modules = dict(copy_model.named_modules())
    with torch.no_grad():
        for lora, multiplier in zip(loras, multipliers):
            for target, module in lora.modules.items():
                weight = copy_modules[names[id(targets[target])]].weight
                weight += multiplier(target) * dense(module).reshape(weight.shape).to(weight.dtype)
    return copy_model


def const(value):
    return lambda target: value


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    return model, {"unet.fc1": model[0], "unet.fc2": model[2]}


def convnet(**conv_args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, **conv_args), nn.SiLU(), nn.Conv2d(6, 4, 1))
    return model, {"unet.conv1": model[0], "unet.conv2": model[2]}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


GRAD_MODES = pytest.mark.parametrize("grad", [True, False], ids=["autograd", "in-place"])


@GRAD_MODES
def test_linear_matches_merged(grad):
    model, targets = mlp()
    lora = lora_file("a", [low_rank_for(name, layer) for name, layer in targets.items()])
    x = torch.randn(3, 5, 8)
    with LoraRuntime(targets, [lora], weights=[0.7]), torch.set_grad_enabled(grad):
        out = model(x)
    expected = merged(model, targets, [lora], [const(0.7)])(x)
    assert not torch.allclose(expected, model(x), atol=1e-3)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert all(m.delta_calls == 0 for m in lora.modules.values())


@pytest.mark.parametrize(
    "conv_args",
    [
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": 1, "stride": 2},
        {"kernel_size": 3, "padding": 2, "dilation": 2, "padding_mode": "reflect"},
    ],
)
@GRAD_MODES
def test_conv_matches_merged(conv_args, grad):
    model, targets = convnet(**conv_args)
    lora = lora_file("a", [low_rank_for(name, layer, seed=1) for name, layer in targets.items()])
    x = torch.randn(2, 4, 9, 9)
    with LoraRuntime(targets, [lora]), torch.set_grad_enabled(grad):
        out = model(x)
    torch.testing.assert_close(out, merged(model, targets, [lora], [const(1.0)])(x), atol=ATOL, rtol=ATOL)
    assert all(m.delta_calls == 0 for m in lora.modules.values())


@GRAD_MODES
def test_dense_kinds_and_grouped_conv_match_merged(grad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, groups=2), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 4, 7, 7)
    model(x)
    targets = {"unet.conv": model[0], "unet.grouped": model[1], "unet.fc": model[3]}
    grouped = low_rank_for("unet.grouped", model[1])
    lora = lora_file(
        "dense",
        [
            Dense("unet.conv", delta=torch.randn(6, 4, 3, 3) * 0.1),
            grouped,
            Dense("unet.fc", delta=torch.randn(5, model[3].in_features) * 0.1),
        ],
    )
    with LoraRuntime(targets, [lora], weights=[1.5]), torch.set_grad_enabled(grad):
        out = model(x)
    torch.testing.assert_close(out, merged(model, targets, [lora], [const(1.5)])(x), atol=ATOL, rtol=ATOL)
    assert grouped.low_rank_calls == 0 and grouped.delta_calls == 1


def test_linear_shaped_lora_on_1x1_conv_and_back():
    model, targets = convnet(kernel_size=3, padding=1)
    conv_factors = low_rank_for("unet.conv2", targets["unet.conv2"])
    as_linear = LowRank("unet.conv2", up=conv_factors.up.flatten(1), down=conv_factors.down.flatten(1), scale=0.5)
    lora = lora_file("linear_shaped", [as_linear])
    x = torch.randn(2, 4, 6, 6)
    with LoraRuntime(targets, [lora]):
        out = model(x)
    torch.testing.assert_close(out, merged(model, targets, [lora], [const(1.0)])(x), atol=ATOL, rtol=ATOL)

    mlp_model, mlp_targets = mlp()
    linear_factors = low_rank_for("unet.fc1", mlp_targets["unet.fc1"])
    as_conv = LowRank("unet.fc1", up=linear_factors.up[..., None, None], down=linear_factors.down[..., None, None])
    conv_lora = lora_file("conv_shaped", [as_conv])
    x = torch.randn(3, 8)
    with LoraRuntime(mlp_targets, [conv_lora]):
        out = mlp_model(x)
    expected = merged(mlp_model, mlp_targets, [conv_lora], [const(1.0)])(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_several_loras_with_component_weights():
    model, _ = mlp()
    targets = {"text_encoder.fc1": model[0], "unet.fc2": model[2]}
    both = lora_file("both", [low_rank_for(name, layer, seed=2) for name, layer in targets.items()])
    unet_only = lora_file("unet_only", [Dense("unet.fc2", delta=torch.randn(8, 16) * 0.1)])
    x = torch.randn(4, 8)
    runtime = LoraRuntime(
        targets, [both, unet_only], weights=[0.8, 1.2], component_weights=[{"text_encoder": 0.5, "unet": 2.0}, {}]
    )
    with runtime:
        out = model(x)
    multipliers = [lambda t: 0.8 * (0.5 if t.startswith("text_encoder") else 2.0), const(1.2)]
    torch.testing.assert_close(out, merged(model, targets, [both, unet_only], multipliers)(x), atol=ATOL, rtol=ATOL)


def test_zero_component_weight_hooks_nothing_there():
    model, _ = mlp()
    targets = {"text_encoder.fc1": model[0], "unet.fc2": model[2]}
    lora = lora_file("a", [low_rank_for(name, layer) for name, layer in targets.items()])
    with LoraRuntime(targets, [lora], component_weights=[{"text_encoder": 0.0}]) as runtime:
        assert runtime.targets == ("unet.fc2",)
        assert not model[0]._forward_hooks_with_kwargs
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        LoraRuntime(targets, [lora], component_weights=[{"vae": 1.0}])


def three_loras(targets):
    return [
        lora_file(f"l{i}", [low_rank_for(name, layer, seed=10 * i + j) for j, (name, layer) in enumerate(targets.items())])
        for i in range(3)
    ]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rows_per_set", [1, 2, 3])
@GRAD_MODES
def test_rows_equal_separate_passes(kind, rows_per_set, grad):
    model, targets = mlp() if kind == "linear" else convnet(kernel_size=3, padding=1, stride=2)
    model = model.double()
    loras = three_loras(targets)
    row_sets = [{0}, {1, 2}, set(), {0}, {2}]
    shape = (5, 8) if kind == "linear" else (4, 7, 7)
    x = torch.randn(len(row_sets) * rows_per_set, *shape, dtype=torch.float64)
    with LoraRuntime(targets, loras, weights=[1.0, 0.6, -0.4]) as runtime, torch.set_grad_enabled(grad):
        runtime.set_rows(row_sets)
        batched = model(x)
        for position, loras_here in enumerate(row_sets):
            rows = slice(position * rows_per_set, (position + 1) * rows_per_set)
            runtime.set_active(loras_here)
            separate = model(x[rows])
            assert torch.allclose(batched[rows], separate, rtol=1e-12, atol=1e-12), (position, loras_here)
        runtime.set_active([])
        base = model(x)
    assert not torch.allclose(batched[:rows_per_set], base[:rows_per_set], atol=1e-3)
    assert torch.equal(batched[2 * rows_per_set : 3 * rows_per_set], base[2 * rows_per_set : 3 * rows_per_set])


@pytest.mark.parametrize("row_sets", [None, [{0}, {1, 2}, set(), {0}]], ids=["uniform", "row sets"])
def test_without_autograd_the_layer_output_takes_the_terms_in_place(row_sets):
    """No copy of a layer's output is made when no graph is recorded (the merge's wide batches)."""
    model, targets = mlp()
    loras = three_loras(targets)
    seen = {}
    model[2].register_forward_hook(lambda module, args, output: seen.update(ptr=output.data_ptr()))
    x = torch.randn(4, 6, 8)
    with LoraRuntime(targets, loras) as runtime:
        if row_sets:
            runtime.set_rows(row_sets)
        with torch.no_grad():
            out = model(x)
        assert out.data_ptr() == seen["ptr"]
        out_graph = model(x)
        assert out_graph.data_ptr() != seen["ptr"]
    torch.testing.assert_close(out, out_graph, atol=1e-6, rtol=1e-6)


def test_cfg_layout_pass_major():
    """Two passes with CFG: batch [uncond0, cond0, uncond1, cond1] and row_sets [{}, {0}]."""
    model, targets = mlp()
    loras = three_loras(targets)
    x = torch.randn(4, 6, 8)
    with LoraRuntime(targets, loras) as runtime:
        with runtime.rows([set(), {0}]):
            batched = model(x)
        with runtime.active([0]):
            pass1 = model(x[2:])
    torch.testing.assert_close(batched[:2], model(x[:2]), rtol=0, atol=0)
    torch.testing.assert_close(batched[2:], pass1, rtol=1e-6, atol=1e-6)


def test_rows_batch_not_multiple_raises():
    model, targets = mlp()
    with LoraRuntime(targets, three_loras(targets)) as runtime:
        runtime.set_rows([{0}, {1}, {2}])
        with pytest.raises(ValueError, match=r"unet.fc1: batch of 4 rows is not a multiple of the 3 row sets"):
            model(torch.randn(4, 8))
        with pytest.raises(ValueError, match="at least one"):
            runtime.set_rows([])
        with pytest.raises(IndexError, match="LoRA index 3 out of range"):
            runtime.set_rows([{3}])


def test_rows_all_equal_is_set_active():
    model, targets = mlp()
    x = torch.randn(4, 8)
    with LoraRuntime(targets, three_loras(targets)) as runtime:
        runtime.set_rows([{0, 1}, {0, 1}])
        batched = model(x)
        runtime.set_active([1, 0])
        assert torch.equal(batched, model(x))


def test_empty_set_is_bit_identical_and_default_is_all():
    model, targets = mlp()
    loras = three_loras(targets)
    x = torch.randn(3, 8)
    base = model(x)
    with LoraRuntime(targets, loras) as runtime:
        all_on = model(x)
        runtime.set_active([])
        assert torch.equal(model(x), base)
        runtime.set_rows([set(), set(), set()])
        assert torch.equal(model(x), base)
        runtime.set_active([0, 1, 2])
        assert torch.equal(model(x), all_on)
    expected = merged(model, targets, loras, [const(1.0)] * 3)(x)
    torch.testing.assert_close(all_on, expected, atol=ATOL, rtol=ATOL)


def test_active_context_restores_previous_state():
    model, targets = mlp()
    x = torch.randn(2, 8)
    with LoraRuntime(targets, three_loras(targets)) as runtime:
        runtime.set_active([1])
        only_1 = model(x)
        with pytest.raises(RuntimeError):
            with runtime.active([0, 2]):
                assert not torch.equal(model(x), only_1)
                raise RuntimeError("inside")
        assert torch.equal(model(x), only_1)
        with pytest.raises(IndexError, match="LoRA index -1 out of range"):
            runtime.set_active([-1])


def test_remove_restores_model_exactly():
    model, targets = convnet(kernel_size=3, padding=1)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(2, 4, 6, 6)
    base = model(x)
    runtime = LoraRuntime(targets, three_loras(targets))
    assert not torch.allclose(model(x), base, atol=1e-3)
    runtime.remove()
    runtime.remove()
    assert torch.equal(model(x), base)
    assert no_hooks(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, params_before[name]), name


def test_exception_in_forward_still_removes_hooks():
    model, targets = mlp()
    with pytest.raises(RuntimeError, match="shape"):
        with LoraRuntime(targets, three_loras(targets)):
            assert not no_hooks(model)
            model(torch.randn(2, 3))  # wrong width: the base layer raises
    assert no_hooks(model)


class TinyAttention(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        raise AssertionError("replaced at class level below")


def attention_forward(self, x):
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    return self.to_out[0](torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)


def linear_forward(self, input):
    return torch.addmm(self.bias, input.reshape(-1, input.shape[-1]), self.weight.t()).reshape(*input.shape[:-1], -1)


def test_class_level_forward_replacement(monkeypatch):
    """A1111 replaces nn.Linear.forward and CrossAttention.forward after the model is built."""
    torch.manual_seed(0)
    model = TinyAttention()
    monkeypatch.setattr(TinyAttention, "forward", attention_forward)
    monkeypatch.setattr(nn.Linear, "forward", linear_forward)
    targets = {f"unet.attn.{name}": layer for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    lora = lora_file("attn", [low_rank_for(name, layer, seed=i) for i, (name, layer) in enumerate(targets.items())])
    x = torch.randn(2, 5, 8)
    base = model(x)
    with LoraRuntime(targets, [lora]):
        out = model(x)
    torch.testing.assert_close(out, merged(model, targets, [lora], [const(1.0)])(x), atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out, base, atol=1e-3)
    assert torch.equal(model(x), base)


def test_gradient_wrt_input_matches_merged():
    model, targets = convnet(kernel_size=3, padding=1)
    lora = lora_file("a", [low_rank_for(name, layer) for name, layer in targets.items()])
    for module in lora.modules.values():
        module.up.requires_grad_(True)
    x = torch.randn(2, 4, 6, 6)
    x_runtime = x.clone().requires_grad_(True)
    with LoraRuntime(targets, [lora]):
        (model(x_runtime) ** 2).sum().backward()
    x_merged = x.clone().requires_grad_(True)
    (merged(model, targets, [lora], [const(1.0)])(x_merged) ** 2).sum().backward()
    torch.testing.assert_close(x_runtime.grad, x_merged.grad, atol=1e-4, rtol=1e-5)
    assert all(module.up.grad is None for module in lora.modules.values())


def test_factors_cast_once_in_inference_mode_then_usable_for_backward():
    """Forge runs under inference_mode; a later backward must not meet inference tensors."""
    model, targets = mlp()
    with torch.inference_mode():  # the file's tensors too were loaded under inference_mode
        lora = lora_file("a", [low_rank_for(name, layer) for name, layer in targets.items()])
    x = torch.randn(2, 8)
    with LoraRuntime(targets, [lora]):
        with torch.inference_mode():
            model(x)
        x_grad = x.clone().requires_grad_(True)
        model(x_grad).sum().backward()
        model.double()(x.double())
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0
    assert all(m.low_rank_calls == 2 for m in lora.modules.values())  # float32 once, float64 once


def test_inactive_lora_never_prepared():
    model, targets = mlp()
    loras = three_loras(targets)
    with LoraRuntime(targets, loras) as runtime:
        runtime.set_rows([{0}, {0}, {1}])
        for _ in range(3):
            model(torch.randn(6, 8))
    assert [m.low_rank_calls for m in loras[0].modules.values()] == [1, 1]
    assert [m.low_rank_calls for m in loras[1].modules.values()] == [1, 1]
    assert [m.low_rank_calls for m in loras[2].modules.values()] == [0, 0]


def test_unknown_target_names_file_and_target():
    model, targets = mlp()
    lora = lora_file("sdxl_thing", [LowRank("text_encoder_2.fc", up=torch.zeros(16, 1), down=torch.zeros(1, 8))])
    with pytest.raises(LoraMismatchError, match=r"/loras/sdxl_thing.safetensors: layer 'text_encoder_2.fc' is not in this model \(1 of 1"):
        LoraRuntime(targets, [lora])
    assert no_hooks(model)


def test_shape_mismatch_names_file_target_and_shapes():
    model, targets = mlp()
    good = lora_file("good", [low_rank_for("unet.fc1", targets["unet.fc1"])])
    bad = lora_file("sd2_thing", [LowRank("unet.fc2", up=torch.zeros(8, 1), down=torch.zeros(1, 24))])
    with pytest.raises(LoraMismatchError, match=r"sd2_thing.safetensors: unet.fc2 .*\(8, 16\).*\(8, 24\)"):
        LoraRuntime(targets, [good, bad])
    assert no_hooks(model)


def test_unsupported_module_type():
    layer_norm = nn.LayerNorm(8)
    lora = lora_file("ln", [Dense("unet.norm", delta=torch.zeros(8))])
    with pytest.raises(TypeError, match="unet.norm: a LoRA can only be applied to Linear or Conv2d, not LayerNorm"):
        LoraRuntime({"unet.norm": layer_norm}, [lora])
