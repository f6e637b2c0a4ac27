"""modules.devices on CPU: float32 everywhere; autocast helpers are no-op contexts."""
import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
force_fp16 = False


class NansException(Exception):
    pass


def get_optimal_device():
    return cpu


def get_optimal_device_name():
    return "cpu"


def get_device_for(task):
    return cpu


def torch_gc():
    pass


def torch_npu_set_device():
    pass


def cond_cast_unet(input):
    return input


def cond_cast_float(input):
    return input


def randn(seed, shape, generator=None):
    if generator is None:
        generator = torch.Generator(device=cpu).manual_seed(int(seed))
    return torch.randn(shape, generator=generator, device=cpu)


def randn_local(seed, shape):
    return torch.randn(shape, generator=torch.Generator(device=cpu).manual_seed(int(seed)), device=cpu)


def randn_like(x):
    return torch.randn_like(x)


def randn_without_seed(shape, generator=None):
    return torch.randn(shape, generator=generator, device=cpu)


def manual_seed(seed):
    torch.manual_seed(seed)


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def test_for_nans(x, where):
    pass


def first_time_calculation():
    pass
