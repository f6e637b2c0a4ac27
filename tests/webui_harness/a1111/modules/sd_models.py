"""modules.sd_models: checkpoint info, safetensors readers and no-op (re)loading.

The harness "loads" its tiny model with ``webui_harness.host.load_tiny_model`` which follows
``load_model``'s tail: hijack -> shared.sd_model -> model_loaded callbacks -> empty prompt cond.
"""
import hashlib
import json
import os

from modules import shared, errors, hashes, paths

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoint_alisases = checkpoint_aliases


def model_hash(filename):
    """Old 8-hex hash of 64 KiB at offset 1 MiB (same recipe as the real one)."""
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return 'NOFILE'


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        name = os.path.basename(filename)
        self.metadata = {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        self.shorthash = self.sha256[0:10]
        self.title = f'{self.name} [{self.shorthash}]'
        self.short_title = f'{self.name_for_extra} [{self.shorthash}]'
        return self.shorthash


def select_checkpoint():
    return getattr(shared.sd_model, "sd_checkpoint_info", None)


def get_closet_checkpoint_match(search_string):
    return checkpoint_aliases.get(search_string)


def read_metadata_from_safetensors(filename):
    """The ``__metadata__`` dict of a safetensors header; values that look like JSON objects are decoded."""
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res = {}
        try:
            header = json.loads(json_start + file.read(metadata_len - 2))
            for k, v in header.get("__metadata__", {}).items():
                res[k] = v
                if isinstance(v, str) and v[0:1] == '{':
                    try:
                        res[k] = json.loads(v)
                    except Exception:
                        pass
        except Exception:
            errors.report(f"Error reading metadata from file: {filename}", exc_info=True)
        return res


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    import safetensors.torch
    import torch
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        return safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return sd.get("state_dict", sd)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    return shared.sd_model


def unload_model_weights(sd_model=None, info=None):
    pass


def apply_token_merging(sd_model, token_merging_ratio):
    pass


def apply_alpha_schedule_override(sd_model, p=None):
    pass


class SkipWritingToConfig:
    skip = False

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def set_model_type(model, state_dict):
    """As the real loader (load_model_weights) flags the model from its class and state dict."""
    model.is_sd1 = False
    model.is_sd2 = False
    model.is_sdxl = False
    model.is_ssd = False
    model.is_sd3 = False

    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3 = True
    elif hasattr(model, 'conditioner'):
        model.is_sdxl = True

        if 'model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight' not in state_dict.keys():
            model.is_ssd = True
    elif hasattr(model.cond_stage_model, 'model'):
        model.is_sd2 = True
    else:
        model.is_sd1 = True


def get_empty_cond(sd_model):
    from modules import processing, extra_networks
    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    d = sd_model.get_learned_conditioning([""]) if hasattr(sd_model, 'get_learned_conditioning') else sd_model.cond_stage_model([""])
    if isinstance(d, dict):
        d = d['crossattn']
    return d
