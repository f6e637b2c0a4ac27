"""modules.sd_models (Forge): CheckpointInfo & co from the A1111 stand-in, plus Forge's
``model_data`` (SdModelData), ``forge_model_reload`` (decorated with inference_mode; returns the
already loaded model: the harness loads it once in ``ForgeHost.load_model``),
``apply_token_merging`` and the no-op legacy loaders."""
import math

import torch

from modules import _inherit

_inherit("sd_models", globals())

from backend import memory_management  # noqa: E402


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        r = len(prompt.strip('!,. ').replace(' ', ',').split(','))
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ''

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()


def get_empty_cond(sd_model):
    pass


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


def unload_model_weights(sd_model=None, info=None):
    memory_management.unload_all_models()


def apply_token_merging(sd_model, token_merging_ratio):
    if token_merging_ratio <= 0:
        return
    raise NotImplementedError("token merging is not simulated by the harness")


@torch.inference_mode()
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    loader = model_data.forge_loading_parameters.get('harness_loader')
    if loader is None:
        raise ValueError('You do not have any model! Please download at least one model in [models/Stable-diffusion].')
    sd_model = loader()
    model_data.set_sd_model(sd_model)
    from modules import script_callbacks
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
