"""backend.operations: ForgeOperations layers and ``using_forge_operations``.

As in Forge, models are built inside ``using_forge_operations()``, which swaps ``torch.nn.Linear``,
``Conv2d``, ``GroupNorm``, ``LayerNorm``, ``Embedding`` (...) for these classes. Note that
``ForgeOperations.Linear`` is a plain ``torch.nn.Module`` (NOT a ``torch.nn.Linear`` subclass):
its weight/bias appear only when a state dict is loaded. Every forward goes through
``get_weight_and_bias`` (which applies "online" LoRA patches, ``forge_online_loras``).
"""
import contextlib

import torch

bnb_avaliable = False
current_device = None
current_dtype = None
current_manual_cast_enabled = False
current_bnb_dtype = None


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None, bias_fn=None):
    from backend.patcher.lora import merge_lora_to_weight
    patches = getattr(layer, 'forge_online_loras', None)
    weight_patches = patches.get('weight', None) if patches is not None else None
    bias_patches = patches.get('bias', None) if patches is not None else None

    weight = layer.weight
    if weight is not None:
        if weight_fn is not None:
            weight = weight_fn(weight)
        if weight_args is not None:
            weight = weight.to(**weight_args)
        if weight_patches is not None:
            weight = merge_lora_to_weight(patches=weight_patches, weight=weight, key="online weight lora", computation_dtype=weight.dtype)

    bias = layer.bias
    if bias is not None:
        if bias_fn is not None:
            bias = bias_fn(bias)
        if bias_args is not None:
            bias = bias.to(**bias_args)
        if bias_patches is not None:
            bias = merge_lora_to_weight(patches=bias_patches, weight=bias, key="online bias lora", computation_dtype=bias.dtype)
    return weight, bias


def weights_manual_cast(layer, x, skip_weight_dtype=False, skip_bias_dtype=False, weight_fn=None, bias_fn=None):
    target = dict(device=x.device) if skip_weight_dtype else dict(device=x.device, dtype=x.dtype)
    weight, bias = get_weight_and_bias(layer, target, target, weight_fn=weight_fn, bias_fn=bias_fn)
    return weight, bias, None


@contextlib.contextmanager
def main_stream_worker(weight, bias, signal):
    yield


def cleanup_cache():
    return


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.dummy = torch.nn.Parameter(torch.empty(1, device=current_device, dtype=current_dtype))
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = current_manual_cast_enabled

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            if hasattr(self, 'dummy'):
                if prefix + 'weight' in state_dict:
                    self.weight = torch.nn.Parameter(state_dict[prefix + 'weight'].to(self.dummy))
                if prefix + 'bias' in state_dict:
                    self.bias = torch.nn.Parameter(state_dict[prefix + 'bias'].to(self.dummy))
                del self.dummy
            else:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, signal = weights_manual_cast(self, x)
            else:
                weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *args, **kwargs):
            kwargs['device'] = current_device
            kwargs['dtype'] = current_dtype
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled

        def reset_parameters(self):
            return None

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, signal = weights_manual_cast(self, x)
            else:
                weight, bias = get_weight_and_bias(self)
            return self._conv_forward(x, weight, bias)

    class GroupNorm(torch.nn.GroupNorm):
        def __init__(self, *args, **kwargs):
            kwargs['device'] = current_device
            kwargs['dtype'] = current_dtype
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled

        def reset_parameters(self):
            return None

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, signal = weights_manual_cast(self, x)
                return torch.nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)
            return super().forward(x)

    class LayerNorm(torch.nn.LayerNorm):
        def __init__(self, *args, **kwargs):
            kwargs['device'] = current_device
            kwargs['dtype'] = current_dtype
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled

        def reset_parameters(self):
            return None

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, signal = weights_manual_cast(self, x)
                return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
            return super().forward(x)

    class Embedding(torch.nn.Embedding):
        def __init__(self, *args, **kwargs):
            kwargs['device'] = current_device
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled
            self.bias = None

        def reset_parameters(self):
            self.bias = None
            return None

        def forward(self, x):
            return super().forward(x)


# Forge names the SD layers by these classes (``backend.operations.ForgeOperations.Linear``).
Linear = ForgeOperations.Linear
Conv2d = ForgeOperations.Conv2d

_OP_NAMES = ['Linear', 'Conv2d', 'GroupNorm', 'LayerNorm', 'Embedding']


@contextlib.contextmanager
def using_forge_operations(operations=None, device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    global current_device, current_dtype, current_manual_cast_enabled, current_bnb_dtype
    current_device, current_dtype, current_manual_cast_enabled, current_bnb_dtype = device, dtype, manual_cast_enabled, bnb_dtype
    operations = operations or ForgeOperations
    backups = {name: getattr(torch.nn, name) for name in _OP_NAMES}
    try:
        for name in _OP_NAMES:
            setattr(torch.nn, name, getattr(operations, name))
        yield
    finally:
        for name in _OP_NAMES:
            setattr(torch.nn, name, backups[name])


def shift_manual_cast(model, enabled):
    for m in model.modules():
        if hasattr(m, 'parameters_manual_cast'):
            m.parameters_manual_cast = enabled


@contextlib.contextmanager
def automatic_memory_management():
    yield
