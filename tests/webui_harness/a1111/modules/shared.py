"""modules.shared: global state of the WebUI (opts, cmd_opts, state, sd_model, device ...).

Gradio is not imported here (the real module does): ``demo`` stays None and
``gradio_theme`` is not provided.
"""
import os
import sys

from modules import shared_cmd_options, options, util, devices, shared_state, shared_options
from modules.paths_internal import models_path, script_path, data_path, sd_configs_path, sd_default_config, sd_model_file, default_sd_model_file, extensions_dir, extensions_builtin_dir  # noqa: F401

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

batch_cond_uncond = True
parallel_processing_allowed = True
styles_filename = [os.path.join(data_path, 'styles.csv')]
config_filename = cmd_opts.ui_settings_file
hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}

demo = None
device = devices.device
weight_load_location = None
xformers_available = False
hypernetworks = {}
loaded_hypernetworks = []

state = shared_state.State()

options_templates = dict(shared_options.options_templates)
restricted_opts = shared_options.restricted_opts
opts = options.Options(options_templates, restricted_opts)

sd_model = None
settings_components = None
tab_names = []

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
sd_upscalers = []
face_restorers = []
clip_model = None
progress_print_out = sys.stdout


class _TotalTQDM:
    def reset(self):
        pass

    def update(self):
        pass

    def updateTotal(self, new_total):
        pass

    def clear(self):
        pass


class _PromptStyles:
    """shared.prompt_styles with no styles defined."""
    styles = {}

    def apply_styles_to_prompt(self, prompt, styles):
        return prompt

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return prompt

    def extract_styles_from_prompt(self, prompt, negative_prompt):
        return [], prompt, negative_prompt


total_tqdm = _TotalTQDM()
prompt_styles = _PromptStyles()
mem_mon = None
interrogator = None

options_section = options.options_section
OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML

natural_sort_key = util.natural_sort_key
listfiles = util.listfiles
walk_files = util.walk_files
ldm_print = util.ldm_print


def reload_hypernetworks():
    pass


def list_samplers():
    from modules import sd_samplers
    return sd_samplers.all_samplers


hf_endpoint = os.getenv('HF_ENDPOINT', 'https://huggingface.co')
