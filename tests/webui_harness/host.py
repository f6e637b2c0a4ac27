"""Drive the A1111 stand-in: start it, load script files, run txt2img, tear everything down.

    host = A1111Host(tmp_dir)          # nothing imported yet (arch="sdxl": the tiny sgm SDXL model)
    host.start()                       # sys.path, modules.*, built-in Lora, tiny model, before_ui
    host.load_scripts("/work/main")    # an extension folder (its scripts/*.py) or script files
    processed = host.txt2img("a cat <lora:x:1>", sampler_name="Euler", steps=3, seed=1)
    host.stop()                        # undo every global patch, drop modules/networks/... from sys.modules

Startup follows the WebUI's order: load_scripts (built-in Lora + the given scripts) ->
load model (hijack, shared.sd_model, model_loaded callbacks, empty-prompt cond) ->
before_ui callbacks (registers ExtraNetworkLora) -> runners initialized (txt2img / img2img).
``build_ui()`` (gradio only) creates the AlwaysVisible scripts' controls and the ui_tabs.

``arch="sdxl"`` loads ``webui_harness.sgm_tiny.build_tiny_sdxl`` instead, the way the real
loader handles an SDXL checkpoint: set_model_type (is_sdxl), sd_models_xl.extend_sdxl
(alphas_cumprod, parameterization, ``conditioner.wrapped``), then the SDXL hijack (embedders
wrapped, ``cond_stage_model`` = the conditioner).
"""
from __future__ import annotations

import copy
import os
import sys
import types

import torch

from webui_harness import ldm_tiny as _ldm_tiny
from webui_harness import sgm_tiny as _sgm_tiny

HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))
A1111_ROOT = os.path.join(HARNESS_DIR, "a1111")
LORA_EXT_DIR = os.path.join(A1111_ROOT, "extensions-builtin", "Lora")
LORA_SCRIPT = os.path.join(LORA_EXT_DIR, "scripts", "lora_script.py")

# Top-level module names the harness brings in (besides everything under HARNESS_DIR).
_HARNESS_TOP_NAMES = {"modules", "k_diffusion", "ldm", "ldm_tiny", "sgm", "networks", "network", "network_lora", "lora_patches",
                      "extra_networks_lora", "ui_extra_networks_lora", "lora", "preload"}


def gradio_available() -> bool:
    try:
        import gradio  # noqa: F401
    except Exception:
        return False
    return True


# Built models per seed, never hijacked; each host gets a deep copy (building costs ~1 s).
_PRISTINE_MODELS = {}
_PRISTINE_SDXL_MODELS = {}

ARCHS = ("sd1", "sdxl")


def package(name):
    """The module ``name`` in sys.modules, an empty package made for it if there is none."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    return mod


def _install_ldm_aliases():
    """``import ldm_tiny`` / ``ldm.modules.attention`` / ``ldm.modules.diffusionmodules.openaimodel``
    -> webui_harness.ldm_tiny (one module object for the whole session, so cached models keep
    their classes)."""
    ldm_tiny = _ldm_tiny
    sys.modules["ldm_tiny"] = ldm_tiny

    ldm = package("ldm")
    ldm.modules = package("ldm.modules")
    ldm.modules.diffusionmodules = package("ldm.modules.diffusionmodules")
    for name, parent, attr in (("ldm.modules.attention", ldm.modules, "attention"),
                               ("ldm.modules.diffusionmodules.openaimodel", ldm.modules.diffusionmodules, "openaimodel")):
        sys.modules[name] = ldm_tiny
        setattr(parent, attr, ldm_tiny)


def _install_sgm_aliases():
    """``sgm.models.diffusion`` / ``sgm.modules.attention`` / ``sgm.modules.encoders.modules`` /
    ``sgm.modules.diffusionmodules.{openaimodel,wrappers,denoiser_scaling,discretizer}``
    -> webui_harness.sgm_tiny; ``sgm.modules.GeneralConditioner`` as sgm/modules/__init__.py exports."""
    sgm_tiny = _sgm_tiny

    sgm = package("sgm")
    sgm.models = package("sgm.models")
    sgm.modules = package("sgm.modules")
    sgm.modules.GeneralConditioner = sgm_tiny.GeneralConditioner
    sgm.modules.diffusionmodules = package("sgm.modules.diffusionmodules")
    sgm.modules.encoders = package("sgm.modules.encoders")
    for name, parent, attr in (("sgm.models.diffusion", sgm.models, "diffusion"),
                               ("sgm.modules.attention", sgm.modules, "attention"),
                               ("sgm.modules.encoders.modules", sgm.modules.encoders, "modules"),
                               ("sgm.modules.diffusionmodules.openaimodel", sgm.modules.diffusionmodules, "openaimodel"),
                               ("sgm.modules.diffusionmodules.wrappers", sgm.modules.diffusionmodules, "wrappers"),
                               ("sgm.modules.diffusionmodules.denoiser_scaling", sgm.modules.diffusionmodules, "denoiser_scaling"),
                               ("sgm.modules.diffusionmodules.discretizer", sgm.modules.diffusionmodules, "discretizer")):
        sys.modules[name] = sgm_tiny
        setattr(parent, attr, sgm_tiny)


class A1111Host:
    def __init__(self, data_dir: str, *, seed: int = 0, threads: int | None = 1, arch: str = "sd1"):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
        self.arch = arch
        self.data_dir = os.path.abspath(data_dir)
        self.lora_dir = os.path.join(self.data_dir, "models", "Lora")
        self.seed = seed
        self.threads = threads
        self.script_paths: list[str] = []
        self.ui_built = False
        self.demo = None
        self._saved = None

    # ------------------------------------------------------------------ lifecycle

    def start(self):
        os.makedirs(self.lora_dir, exist_ok=True)
        self._saved = {
            "sys_path": list(sys.path),
            "modules": set(sys.modules),
            "linear_forward": torch.nn.Linear.forward,
            "linear_load": torch.nn.Linear._load_from_state_dict,
            "conv_forward": torch.nn.Conv2d.forward,
            "conv_load": torch.nn.Conv2d._load_from_state_dict,
            "mha_forward": torch.nn.MultiheadAttention.forward,
            "mha_load": torch.nn.MultiheadAttention._load_from_state_dict,
            "threads": torch.get_num_threads(),
            "env": os.environ.get("A1111_HARNESS_DATA"),
        }
        for name in _HARNESS_TOP_NAMES:
            if name in sys.modules:
                raise RuntimeError(f"a module named {name!r} is already imported; the A1111 harness needs that name")
        if self.threads:
            torch.set_num_threads(self.threads)
        os.environ["A1111_HARNESS_DATA"] = self.data_dir
        sys.path[:0] = [A1111_ROOT]
        _install_ldm_aliases()
        _install_sgm_aliases()

        from modules import shared, extra_networks
        shared.cmd_opts.lora_dir = self.lora_dir
        shared.cmd_opts.data_dir = self.data_dir
        extra_networks.initialize()
        extra_networks.register_default_extra_networks()

        self._load_scripts()
        self.load_model()
        from modules import script_callbacks
        script_callbacks.before_ui_callback()
        self._init_runners()
        return self

    def stop(self):
        if self._saved is None:
            return
        try:
            if "modules.script_callbacks" in sys.modules:
                sys.modules["modules.script_callbacks"].script_unloaded_callback()
            if "ldm_tiny" in sys.modules:
                sys.modules["ldm_tiny"].undo_optimizations()
            _sgm_tiny.undo_optimizations()
        finally:
            s = self._saved
            torch.nn.Linear.forward = s["linear_forward"]
            torch.nn.Linear._load_from_state_dict = s["linear_load"]
            torch.nn.Conv2d.forward = s["conv_forward"]
            torch.nn.Conv2d._load_from_state_dict = s["conv_load"]
            torch.nn.MultiheadAttention.forward = s["mha_forward"]
            torch.nn.MultiheadAttention._load_from_state_dict = s["mha_load"]
            torch.set_num_threads(s["threads"])
            if s["env"] is None:
                os.environ.pop("A1111_HARNESS_DATA", None)
            else:
                os.environ["A1111_HARNESS_DATA"] = s["env"]
            sys.path[:] = s["sys_path"]
            for name in list(sys.modules):
                if name in s["modules"] or name.startswith("webui_harness"):
                    continue
                top = name.split(".")[0]
                file = getattr(sys.modules[name], "__file__", None) or ""
                if top in _HARNESS_TOP_NAMES or os.path.abspath(file).startswith(HARNESS_DIR + os.sep) \
                        or any(os.path.abspath(file).startswith(d + os.sep) for d in self._script_roots()):
                    del sys.modules[name]
            self._saved = None

    def _script_roots(self):
        roots = []
        for p in self.script_paths:
            p = os.path.abspath(p)
            folder = p if os.path.isdir(p) else os.path.dirname(p)
            if os.path.basename(folder) == "scripts":
                folder = os.path.dirname(folder)
            roots.append(os.path.join(folder, "scripts"))
        return roots

    # ------------------------------------------------------------------ model

    def load_model(self):
        """What sd_models.load_model does after building: hijack (wrap CLIP, sdp attention),
        checkpoint info, shared.sd_model, model_loaded callbacks, cond_stage_model_empty_prompt.
        SDXL: set_model_type and extend_sdxl first, as load_model_weights does."""
        import ldm_tiny
        from safetensors.torch import save_file
        from modules import shared, sd_models, sd_hijack, script_callbacks, devices

        ckpt_dir = os.path.join(self.data_dir, "models", "Stable-diffusion")
        os.makedirs(ckpt_dir, exist_ok=True)
        ckpt = os.path.join(ckpt_dir, f"tiny-{self.arch}.safetensors")
        if not os.path.exists(ckpt):
            save_file({"seed": torch.tensor([self.seed])}, ckpt, metadata={"harness": f"tiny {self.arch} stand-in"})

        if self.arch == "sdxl":
            from modules import sd_models_xl
            if self.seed not in _PRISTINE_SDXL_MODELS:
                _PRISTINE_SDXL_MODELS[self.seed] = _sgm_tiny.build_tiny_sdxl(seed=self.seed)
            pristine = _PRISTINE_SDXL_MODELS[self.seed]
            tokenizer = _sgm_tiny.get_tokenizer()  # read-only: shared, not copied
            sd_model = copy.deepcopy(pristine, memo={id(tokenizer): tokenizer})
            sd_models.set_model_type(sd_model, {k: None for k in sd_model.state_dict()})
            sd_model.is_sdxl_inpaint = sd_model.is_sdxl and sd_model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
            sd_models_xl.extend_sdxl(sd_model)
            sd_model.cond_stage_model_empty_prompt = None
            sd_model.latent_channels = 4
        else:
            if self.seed not in _PRISTINE_MODELS:
                _PRISTINE_MODELS[self.seed] = ldm_tiny.build_tiny_sd1(seed=self.seed)
            pristine = _PRISTINE_MODELS[self.seed]
            tokenizer = pristine.cond_stage_model.tokenizer  # read-only: shared, not copied
            sd_model = copy.deepcopy(pristine, memo={id(tokenizer): tokenizer})
        info = sd_models.CheckpointInfo(ckpt)
        sd_model.sd_model_hash = info.calculate_shorthash()
        sd_model.sd_model_checkpoint = info.filename
        sd_model.sd_checkpoint_info = info
        info.register()
        shared.opts.data["sd_model_checkpoint"] = info.title

        sd_hijack.model_hijack.hijack(sd_model)
        sd_model.eval()
        shared.sd_model = sd_model
        script_callbacks.model_loaded_callback(sd_model)
        with devices.autocast(), torch.no_grad():
            sd_model.cond_stage_model_empty_prompt = sd_models.get_empty_cond(sd_model)
        return sd_model

    # ------------------------------------------------------------------ scripts / ui

    def _load_scripts(self):
        from modules import scripts
        scripts.load_scripts([LORA_SCRIPT, *self.script_paths])

    def _init_runners(self):
        from modules import scripts
        scripts.scripts_txt2img.initialize_scripts(is_img2img=False)
        scripts.scripts_img2img.initialize_scripts(is_img2img=True)
        scripts.scripts_current = scripts.scripts_txt2img
        self.ui_built = False

    def load_scripts(self, *paths: str):
        """Reload like the WebUI's "reload scripts": script_unloaded callbacks, then load the
        built-in Lora script plus ``paths`` (extension folders, ``scripts`` folders or files),
        model_loaded callbacks for the current model, before_ui, fresh runners."""
        from modules import script_callbacks, shared
        self.script_paths = [os.path.join(p, "scripts") if os.path.isdir(os.path.join(p, "scripts")) else p for p in paths]
        script_callbacks.script_unloaded_callback()
        self._load_scripts()
        script_callbacks.model_loaded_callback(shared.sd_model)
        script_callbacks.before_ui_callback()
        self._init_runners()
        return self.scripts_txt2img

    @property
    def scripts_txt2img(self):
        from modules import scripts
        return scripts.scripts_txt2img

    def find_script(self, title_or_class):
        for s in self.scripts_txt2img.scripts:
            if s.__class__ is title_or_class or s.__class__.__name__ == title_or_class or s.title() == title_or_class:
                return s
        raise KeyError(title_or_class)

    def build_ui(self):
        """(gradio) ui_settings callbacks, then a Blocks with the txt2img AlwaysVisible scripts'
        ui(False) (args_from/args_to assigned), then ui_tabs callbacks. Returns (demo, tabs)."""
        import gradio as gr
        from modules import script_callbacks
        script_callbacks.ui_settings_callback()
        with gr.Blocks() as demo:
            self.scripts_txt2img.prepare_ui()
            self.scripts_txt2img.setup_ui()
            tabs = script_callbacks.ui_tabs_callback()
        self.demo = demo
        self.ui_built = True
        return demo, tabs

    def app_started(self, demo=None):
        """Create a FastAPI app and run the app_started callbacks with (demo, app); returns the app."""
        from fastapi import FastAPI
        from modules import script_callbacks
        app = FastAPI()
        script_callbacks.app_started_callback(demo if demo is not None else self.demo, app)
        return app

    def script_args(self, values: dict | None = None) -> list:
        """p.script_args for txt2img: ``[0, <script controls>...]`` (0 = no selectable script).

        After build_ui(): every control's default ``.value``, then ``values`` ({script title /
        class / class name: [args]}) written over that script's slice. Without UI (no gradio):
        args_from/args_to are assigned here from the lengths in ``values`` (scripts not listed
        get no arguments), in alwayson order."""
        values = dict(values or {})
        runner = self.scripts_txt2img
        resolved = {}
        for key, v in values.items():
            resolved[self.find_script(key)] = list(v)
        if self.ui_built:
            args = [0] + [getattr(c, "value", None) for c in runner.inputs[1:]]
            for script, v in resolved.items():
                assert len(v) == script.args_to - script.args_from, f"{script.title()}: expected {script.args_to - script.args_from} args, got {len(v)}"
                args[script.args_from:script.args_to] = v
            return args
        args = [0]
        for script in runner.alwayson_scripts:
            v = resolved.get(script, [])
            script.args_from = len(args)
            args += v
            script.args_to = len(args)
        return args

    # ------------------------------------------------------------------ generation

    def make_txt2img(self, prompt: str = "", negative_prompt: str = "", *, script_args=None, **kwargs):
        """StableDiffusionProcessingTxt2Img as modules.txt2img builds it, with harness-friendly
        defaults (64x64, 3 steps, Euler, seed 1, cfg 7); ``scripts``/``script_args`` are set
        after construction as the real code does."""
        from modules import processing, shared
        params = dict(width=64, height=64, steps=3, sampler_name="Euler", seed=1, cfg_scale=7.0, batch_size=1, n_iter=1,
                      do_not_save_samples=True, do_not_save_grid=True)
        params.update(kwargs)
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, outpath_samples=os.path.join(self.data_dir, "outputs"),
                                                       outpath_grids=os.path.join(self.data_dir, "outputs"), prompt=prompt,
                                                       negative_prompt=negative_prompt, **params)
        p.scripts = self.scripts_txt2img
        p.script_args = tuple(script_args if script_args is not None else self.script_args())
        return p

    def run(self, p):
        """modules.txt2img.txt2img's core under wrap_gradio_gpu_call's bookkeeping: queue_lock,
        state.begin(), scripts.run (selectable) or process_images, p.close(), state.end(), and
        the flags reset (interrupted/skipped) that wrap_gradio_call does afterwards."""
        from modules import call_queue, processing, shared
        with call_queue.queue_lock:
            shared.state.begin(job="txt2img")
            try:
                processed = p.scripts.run(p, *p.script_args) if p.scripts is not None else None
                if processed is None:
                    processed = processing.process_images(p)
            finally:
                p.close()
                shared.state.end()
                shared.state.skipped = False
                shared.state.interrupted = False
                shared.state.stopping_generation = False
        return processed

    def txt2img(self, prompt: str = "", negative_prompt: str = "", *, script_args=None, **kwargs):
        return self.run(self.make_txt2img(prompt, negative_prompt, script_args=script_args, **kwargs))

    # ------------------------------------------------------------------ helpers

    @property
    def shared(self):
        from modules import shared
        return shared

    @property
    def sd_model(self):
        return self.shared.sd_model

    @property
    def unet(self):
        return self.shared.sd_model.model.diffusion_model

    def module_by_layer_name(self, network_layer_name: str):
        return self.shared.sd_model.network_layer_mapping[network_layer_name]

    def layer_for_kohya_key(self, kohya_module_name: str):
        """The tiny model's layer a kohya module name (``lora_unet_down_blocks_0_...``, no
        ``.lora_up.weight`` suffix) maps to, by the built-in Lora's own key conversion."""
        import networks
        mapping = self.shared.sd_model.network_layer_mapping
        key = networks.convert_diffusers_name_to_compvis(kohya_module_name, False)
        if key not in mapping:  # load_network's fallback for SDXL's ldm-named UNet keys
            key = kohya_module_name.replace("lora_unet", "diffusion_model")
        return mapping[key]

    def refresh_loras(self):
        import networks
        networks.list_available_networks()
        return networks.available_networks

    def errors(self):
        from modules import errors
        return list(errors.exception_records)
