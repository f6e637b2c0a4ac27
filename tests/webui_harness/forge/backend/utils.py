"""backend.utils: attribute helpers used by the patchers and the LoRA loader."""
import torch


def tensor2parameter(x):
    if isinstance(x, torch.nn.Parameter):
        return x
    return torch.nn.Parameter(x, requires_grad=False)


def get_attr(obj, attr):
    attrs = attr.split(".")
    for name in attrs:
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    attrs = attr.split(".")
    parent = obj
    name = None
    for name in attrs:
        parent = obj
        obj = getattr(obj, name)
    return parent, name, obj


def set_attr(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], torch.nn.Parameter(value, requires_grad=False))
    return prev


def set_attr_raw(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], value)
    return prev


def load_torch_file(ckpt, safe_load=False, device=None):
    if device is None:
        device = torch.device("cpu")
    if ckpt.lower().endswith(".safetensors"):
        import safetensors.torch
        return safetensors.torch.load_file(ckpt, device=device.type)
    sd = torch.load(ckpt, map_location=device, weights_only=True)
    return sd.get("state_dict", sd)


def dtype_to_element_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def nested_compute_size(obj, element_size):
    if isinstance(obj, dict):
        return sum(nested_compute_size(v, element_size) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nested_compute_size(v, element_size) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * element_size
    return 0


def nested_move_to_device(obj, **kwargs):
    if isinstance(obj, dict):
        return {k: nested_move_to_device(v, **kwargs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nested_move_to_device(v, **kwargs) for v in obj]
    if isinstance(obj, tuple):
        return tuple(nested_move_to_device(v, **kwargs) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.to(**kwargs)
    return obj


def fp16_fix(x):
    return x
