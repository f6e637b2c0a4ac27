"""backend.memory_management on a CPU-only machine: everything lives on the CPU, nothing is swapped.

``load_models_gpu`` keeps the real side effects that matter to extensions: object patches are
applied (``forge_patch_model``) and LoRA patches are merged (``refresh_loras``) each time a
patcher is "loaded" (UNet in ``sampling_prepare``, CLIP in ``get_learned_conditioning``).
"""
import torch

cpu = torch.device('cpu')
total_vram = 0
total_ram = 24 * 1024
signal_empty_cache = False
current_loaded_models = []
XFORMERS_IS_AVAILABLE = False


def get_torch_device():
    return cpu


def is_intel_xpu():
    return False


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    total = 0
    for p in list(module.parameters()) + list(module.buffers()):
        total += p.nelement() * p.element_size()
    if return_split:
        return total, 0, total
    return total


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    @property
    def real_model(self):
        return self.model.model

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.model.forge_patch_model(self.device)
        self.model.refresh_loras()
        return self.model.model

    def model_unload(self, avoid_model_moving=False):
        self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    to_unload = [i for i, m in enumerate(current_loaded_models) if model.is_clone(m.model)]
    for i in reversed(to_unload):
        current_loaded_models.pop(i).model_unload()


def free_memory(memory_required, device, keep_loaded=[], free_all=False):
    return


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for m in models:
        loaded = LoadedModel(m)
        if loaded in current_loaded_models:
            current_loaded_models.pop(current_loaded_models.index(loaded)).model_unload()
        else:
            unload_model_clones(m)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def cleanup_models():
    return


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def soft_empty_cache(force=False):
    global signal_empty_cache
    signal_empty_cache = False


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def get_free_memory(dev=None, torch_free_too=False):
    free = 16 * 1024 ** 3
    return (free, free) if torch_free_too else free


def unet_offload_device():
    return cpu


def unet_inital_load_device(parameters, dtype):
    return cpu


def unet_dtype(device=None, model_params=0, supported_dtypes=None):
    return torch.float32


def get_computation_dtype(inference_device, parameters=0, supported_dtypes=None):
    return torch.float32


def text_encoder_device():
    return cpu


def text_encoder_offload_device():
    return cpu


def text_encoder_dtype(device=None):
    return torch.float32


def intermediate_device():
    return cpu


def vae_device():
    return cpu


def vae_offload_device():
    return cpu


def vae_dtype(device=None, allowed_dtypes=[]):
    return torch.float32


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def xformers_enabled():
    return False


def xformers_enabled_vae():
    return False


def pytorch_attention_enabled():
    return True


def cpu_mode():
    return True


def is_device_cpu(device):
    return True


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False
