"""modules.sd_samplers: the registry and create_sampler(name, model)."""
from modules import sd_samplers_kdiffusion, sd_samplers_timesteps, sd_samplers_common, shared

samples_to_image_grid = None
sample_to_image = sd_samplers_common.sample_to_image

all_samplers = [
    *sd_samplers_kdiffusion.samplers_data_k_diffusion,
    *sd_samplers_timesteps.samplers_data_timesteps,
]
all_samplers_map = {x.name: x for x in all_samplers}

samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map = {}
samplers_hidden = set()


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    if model.is_sdxl and config.options.get("no_sdxl", False):
        raise Exception(f"Sampler {config.name} is not supported for SDXL")
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def set_samplers():
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]


def fix_p_invalid_sampler_and_scheduler(p):
    if p.sampler_name not in all_samplers_map:
        p.sampler_name = samplers_map.get((p.sampler_name or "").lower(), all_samplers[0].name)


set_samplers()
del shared
