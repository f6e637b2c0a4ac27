"""Drive the Forge (2.0.1v1.10.1, dfdcbab) stand-in: start it, load scripts, run txt2img, tear down.

    host = ForgeHost(tmp_dir)          # nothing imported yet
    host.start()                       # sys.path, modules.*, backend, sd_forge_lora, tiny model, before_ui
    host.load_scripts("/work/main")    # an extension folder (its scripts/*.py) or script files
    processed = host.txt2img("a cat <lora:x:1>", sampler_name="Euler", steps=3, seed=1)
    host.stop()                        # drop modules/backend/networks/... from sys.modules

Startup follows Forge's order: load_scripts (sd_forge_lora + given scripts) -> model load via
``sd_models.forge_model_reload`` (under inference_mode: every weight is an inference tensor;
model_loaded callbacks) -> before_ui callbacks (registers ExtraNetworkLora) -> runners.

The tiny model: ``backend.diffusion_engine.sd15.StableDiffusion`` around an
``IntegratedUNet2DConditionModel`` (SD1 layout, model_channels 32, channel_mult (1, 2, 2, 2),
2 heads, context_dim 32: 16 attn2 at the real block positions) built inside
``using_forge_operations`` (Linear/Conv2d/GroupNorm/LayerNorm are ForgeOperations classes), a
tiny transformers CLIPTextModel (hidden 32, 2 layers; modules replaced by ForgeOperations ones)
and a 1x1-conv stand-in VAE. Weights are seeded random (cached per seed as plain state dicts).

``ForgeHost(dir, arch="sdxl")``: ``backend.diffusion_engine.sdxl.StableDiffusionXL`` (see that
file) around an ADM UNet in SDXL's layout (channel_mult (1, 2, 4), no attention in the first level,
transformer depth 1 / 2 where SDXL has 2 / 10, linear projections, ``label_emb`` on
adm_in_channels = 64 pooled + 6 * 256 size ids, context 96 = clip_l 32 + clip_g 64), clip_l and
clip_g built as Forge's backend/loader.py builds them (``IntegratedCLIP(CLIPTextModel, config,
add_text_projection=True)``; clip_g's text_projection has weights), tokenizer_2 padding with "!",
VAE scaling 0.13025. ``ForgeHost`` accepts ``arch`` itself and passes on only A1111Host's keywords.
"""
from __future__ import annotations

import os
import sys
import types

import torch

from webui_harness import ldm_tiny as _ldm_tiny
from webui_harness.host import A1111Host

HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))
FORGE_ROOT = os.path.join(HARNESS_DIR, "forge")
LORA_EXT_DIR = os.path.join(FORGE_ROOT, "extensions-builtin", "sd_forge_lora")
LORA_SCRIPT = os.path.join(LORA_EXT_DIR, "scripts", "lora_script.py")

_HARNESS_TOP_NAMES = {"modules", "modules_forge", "backend", "k_diffusion", "networks", "network", "extra_networks_lora",
                      "lora", "preload", "ldm", "ldm_tiny"}

UNET_CONFIG = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 2, 2, 2), num_heads=2,
                   use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=32, use_linear_in_transformer=False)

# SDXL's layout (huggingface_guess SDXL: model_channels 320, channel_mult [1, 2, 4], num_head_channels 64,
# transformer_depth [0, 0, 2, 2, 10, 10], output [0, 0, 0, 2, 2, 2, 10, 10, 10], middle 10, linear proj,
# context_dim 2048, adm_in_channels 2816 = 1280 pooled + 6 * 256 size ids), scaled down: no attention in the
# first level, depth 1 in the second, 2 in the third and the middle; context = clip_l 32 + clip_g 64.
SDXL_CLIP_L_WIDTH = 32
SDXL_CLIP_G_WIDTH = 64
SDXL_UNET_CONFIG = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 2, 4), num_heads=-1,
                        num_head_channels=32, num_classes="sequential", adm_in_channels=SDXL_CLIP_G_WIDTH + 6 * 256,
                        use_spatial_transformer=True, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
                        transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], context_dim=SDXL_CLIP_L_WIDTH + SDXL_CLIP_G_WIDTH,
                        use_linear_in_transformer=True)

SCHEDULER_CONFIG = dict(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        num_train_timesteps=1000)


def gradio_available() -> bool:
    try:
        import gradio  # noqa: F401
    except Exception:
        return False
    return True


_PRISTINE = {}


class EstimatedConfig:
    """What huggingface_guess gives StableDiffusion (model_config): SD15, not inpaint."""
    huggingface_repo = "runwayml/stable-diffusion-v1-5"
    unet_config = UNET_CONFIG

    def inpaint_model(self):
        return False


class EstimatedConfigXL:
    """What huggingface_guess gives StableDiffusionXL (model_list.SDXL), not inpaint."""
    huggingface_repo = "stabilityai/stable-diffusion-xl-base-1.0"
    unet_config = SDXL_UNET_CONFIG

    def inpaint_model(self):
        return False


def _pristine(seed):
    """Plain (non-inference) state dicts for the UNet and the VAE of this seed."""
    if seed not in _PRISTINE:
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
        torch.manual_seed(seed)
        unet = IntegratedUNet2DConditionModel(**UNET_CONFIG)
        vae = IntegratedAutoencoderKL()
        g = torch.Generator().manual_seed(seed + 1234)
        with torch.no_grad():
            for conv in (vae.decoder_conv, vae.encoder_conv):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
                conv.bias.zero_()
        _PRISTINE[seed] = ({k: v.clone() for k, v in unet.state_dict().items()}, {k: v.clone() for k, v in vae.state_dict().items()})
    return _PRISTINE[seed]


def _to_forge_operations(root, manual_cast_enabled=False):
    """Swap a freshly built module tree's Linear / LayerNorm / Embedding for ForgeOperations ones
    with the same weights (names unchanged). Call inside inference_mode."""
    from backend.operations import ForgeOperations, using_forge_operations
    real = {"Linear": torch.nn.Linear, "LayerNorm": torch.nn.LayerNorm, "Embedding": torch.nn.Embedding}
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            new = None
            with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32, manual_cast_enabled=manual_cast_enabled):
                if type(child) is real["Linear"]:
                    new = ForgeOperations.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                elif type(child) is real["LayerNorm"]:
                    new = ForgeOperations.LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine)
                elif type(child) is real["Embedding"]:
                    new = ForgeOperations.Embedding(child.num_embeddings, child.embedding_dim, padding_idx=child.padding_idx)
            if new is not None:
                new.load_state_dict(child.state_dict(), strict=False)
                setattr(module, child_name, new)
    return root


@torch.inference_mode()
def build_tiny_forge_sd1(seed: int = 0):
    """StableDiffusion (Forge engine object) with every weight loaded under inference_mode."""
    from transformers import CLIPTokenizer
    from backend import memory_management
    from backend.diffusion_engine.sd15 import StableDiffusion
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations

    unet_sd, vae_sd = _pristine(seed)
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        unet = IntegratedUNet2DConditionModel(**UNET_CONFIG)
        vae = IntegratedAutoencoderKL()
    unet.load_state_dict(unet_sd, strict=False)
    vae.load_state_dict(vae_sd, strict=False)
    unet.storage_dtype = unet.computation_dtype = unet.dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = memory_management.cpu

    text_model = _ldm_tiny._make_clip_text_model(width=UNET_CONFIG["context_dim"], seed=seed + 1)
    # Forge: IntegratedCLIP(CLIPTextModel, config, add_text_projection=True) under
    # using_forge_operations(manual_cast_enabled=True); SD1 checkpoints have no text_projection, so that
    # ForgeOperations.Linear keeps weight None (and its ``dummy`` parameter).
    text_model = _to_forge_operations(text_model, manual_cast_enabled=True)
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=True):
        text_encoder = IntegratedCLIP(lambda config: text_model, text_model.config, add_text_projection=True)
    tokenizer = CLIPTokenizer.from_pretrained(_ldm_tiny.TOKENIZER_DIR)
    scheduler = types.SimpleNamespace(config=types.SimpleNamespace(**SCHEDULER_CONFIG))

    model = StableDiffusion(EstimatedConfig(), dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                                                    tokenizer=tokenizer, scheduler=scheduler))
    return model


def _pristine_sdxl(seed):
    """Plain state dicts for the SDXL stand-in's UNet, VAE and clip_g text_projection of this seed."""
    key = ("sdxl", seed)
    if key not in _PRISTINE:
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = IntegratedUNet2DConditionModel(**SDXL_UNET_CONFIG)
            vae = IntegratedAutoencoderKL(scaling_factor=0.13025)
        g = torch.Generator().manual_seed(seed + 1234)
        with torch.no_grad():
            for conv in (vae.decoder_conv, vae.encoder_conv):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
                conv.bias.zero_()
            projection = torch.randn(SDXL_CLIP_G_WIDTH, SDXL_CLIP_G_WIDTH, generator=g) / SDXL_CLIP_G_WIDTH ** 0.5
        _PRISTINE[key] = ({k: v.clone() for k, v in unet.state_dict().items()}, {k: v.clone() for k, v in vae.state_dict().items()},
                          {"weight": projection})
    return _PRISTINE[key]


@torch.inference_mode()
def build_tiny_forge_sdxl(seed: int = 0):
    """StableDiffusionXL (Forge engine object) with every weight loaded under inference_mode.

    As Forge's backend/loader.py builds SDXL: the UNet inside ``using_forge_operations``; BOTH text
    encoders as ``IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)`` under
    ``using_forge_operations(manual_cast_enabled=True)`` (text_encoder_2 is a CLIPTextModelWithProjection
    in the diffusers repo, but Forge builds a CLIPTextModel and hangs ``text_projection`` on it; its
    weight comes from the checkpoint for clip_g, stays None for clip_l); ``tokenizer_2`` pads with "!"
    (id 0) as SDXL's does.
    """
    from transformers import CLIPTokenizer
    from backend import memory_management
    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations

    unet_sd, vae_sd, projection_sd = _pristine_sdxl(seed)
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        unet = IntegratedUNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = IntegratedAutoencoderKL(scaling_factor=0.13025)
    unet.load_state_dict(unet_sd, strict=False)
    vae.load_state_dict(vae_sd, strict=False)
    unet.storage_dtype = unet.computation_dtype = unet.dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = memory_management.cpu

    encoders = {}
    with torch.random.fork_rng(devices=[]):
        for name, width, seed_offset in (("clip_l", SDXL_CLIP_L_WIDTH, 1), ("clip_g", SDXL_CLIP_G_WIDTH, 2)):
            text_model = _ldm_tiny._make_clip_text_model(width=width, seed=seed + seed_offset)
            text_model = _to_forge_operations(text_model, manual_cast_enabled=True)
            with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=True):
                encoders[name] = IntegratedCLIP(lambda config, m=text_model: m, text_model.config, add_text_projection=True)
    encoders["clip_g"].transformer.text_projection.load_state_dict(projection_sd)
    tokenizer = CLIPTokenizer.from_pretrained(_ldm_tiny.TOKENIZER_DIR)
    tokenizer_2 = CLIPTokenizer.from_pretrained(_ldm_tiny.TOKENIZER_DIR, pad_token="!")
    scheduler = types.SimpleNamespace(config=types.SimpleNamespace(**SCHEDULER_CONFIG))

    return StableDiffusionXL(EstimatedConfigXL(), dict(unet=unet.eval(), vae=vae.eval(), text_encoder=encoders["clip_l"].eval(),
                                                       text_encoder_2=encoders["clip_g"].eval(), tokenizer=tokenizer,
                                                       tokenizer_2=tokenizer_2, scheduler=scheduler))


ARCHS = {"sd1": ("tiny-sd1", build_tiny_forge_sd1), "sdxl": ("tiny-sdxl", build_tiny_forge_sdxl)}


class ForgeHost(A1111Host):
    """The Forge stand-in: its own start/stop, model loading and layer lookups; scripts, UI and
    generation driven as ``A1111Host`` does (Forge keeps those parts of A1111).

    ``arch``: "sd1" (``StableDiffusion``) or "sdxl" (``StableDiffusionXL``: clip_l + clip_g, ADM UNet)."""

    def __init__(self, data_dir: str, *, arch: str = "sd1", lazy_model: bool = False, **kwargs):
        """lazy_model: like real Forge at start-up, ``shared.sd_model`` stays a ``FakeInitialModel``
        until something calls ``forge_model_reload()`` (a generation does)."""
        if arch not in ARCHS:
            raise ValueError(f"the Forge stand-in builds {sorted(ARCHS)}, not {arch!r}")
        super().__init__(data_dir, **kwargs)  # A1111Host's own keywords only (seed, threads)
        self.arch = arch
        self.lazy_model = lazy_model

    # ------------------------------------------------------------------ lifecycle

    def start(self):
        os.makedirs(self.lora_dir, exist_ok=True)
        self._saved = {
            "sys_path": list(sys.path),
            "modules": set(sys.modules),
            "nn": {n: getattr(torch.nn, n) for n in ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding")},
            "threads": torch.get_num_threads(),
            "env": os.environ.get("A1111_HARNESS_DATA"),
        }
        for name in _HARNESS_TOP_NAMES - {"ldm", "ldm_tiny"}:
            if name in sys.modules:
                raise RuntimeError(f"a module named {name!r} is already imported; the Forge harness needs that name")
        if self.threads:
            torch.set_num_threads(self.threads)
        os.environ["A1111_HARNESS_DATA"] = self.data_dir
        sys.path[:0] = [FORGE_ROOT]

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
            if "backend.memory_management" in sys.modules:
                sys.modules["backend.memory_management"].unload_all_models()
        finally:
            s = self._saved
            for n, cls in s["nn"].items():
                setattr(torch.nn, n, cls)
            torch.set_num_threads(s["threads"])
            if s["env"] is None:
                os.environ.pop("A1111_HARNESS_DATA", None)
            else:
                os.environ["A1111_HARNESS_DATA"] = s["env"]
            sys.path[:] = s["sys_path"]
            roots = self._script_roots()
            for name in list(sys.modules):
                if name in s["modules"] or name.startswith("webui_harness"):
                    continue
                top = name.split(".")[0]
                file = os.path.abspath(getattr(sys.modules[name], "__file__", None) or "")
                if top in _HARNESS_TOP_NAMES or file.startswith(FORGE_ROOT + os.sep) or any(file.startswith(d + os.sep) for d in roots):
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
        """Register the checkpoint, then ``forge_model_reload()`` (inference_mode, model_loaded callbacks)."""
        from safetensors.torch import save_file
        from modules import shared, sd_models

        ckpt_dir = os.path.join(self.data_dir, "models", "Stable-diffusion")
        os.makedirs(ckpt_dir, exist_ok=True)
        name, build = ARCHS[self.arch]
        ckpt = os.path.join(ckpt_dir, f"{name}.safetensors")
        if not os.path.exists(ckpt):
            save_file({"seed": torch.tensor([self.seed])}, ckpt, metadata={"harness": f"tiny forge {self.arch} stand-in"})
        info = sd_models.CheckpointInfo(ckpt)
        info.calculate_shorthash()
        info.register()
        shared.opts.data["sd_model_checkpoint"] = info.title

        def loader():
            sd_model = build(self.seed)
            sd_model.extra_generation_params = {}
            sd_model.comments = []
            sd_model.sd_checkpoint_info = info
            sd_model.filename = info.filename
            sd_model.sd_model_hash = info.calculate_shorthash()
            shared.opts.data["sd_checkpoint_hash"] = info.sha256
            return sd_model

        sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=[], unet_storage_dtype=None,
                                                            harness_loader=loader)
        sd_models.model_data.forge_hash = ''
        if self.lazy_model:
            return None
        sd_model, _ = sd_models.forge_model_reload()
        return sd_model

    # ------------------------------------------------------------------ scripts / ui

    def _load_scripts(self):
        from modules import scripts
        scripts.load_scripts([LORA_SCRIPT, *self.script_paths])

    # ------------------------------------------------------------------ helpers (the rest as A1111Host)

    @property
    def unet_patcher(self):
        """The ORIGINAL UnetPatcher (``forge_objects_original.unet``)."""
        return self.sd_model.forge_objects_original.unet

    @property
    def diffusion_model(self):
        return self.sd_model.forge_objects_original.unet.model.diffusion_model

    @property
    def text_encoder(self):
        """``forge_objects.clip.cond_stage_model.clip_l`` (IntegratedCLIP; ``.transformer`` is the CLIPTextModel)."""
        return self.sd_model.forge_objects_original.clip.cond_stage_model.clip_l

    @property
    def text_encoder_2(self):
        """SDXL: ``forge_objects.clip.cond_stage_model.clip_g`` (IntegratedCLIP)."""
        return self.sd_model.forge_objects_original.clip.cond_stage_model.clip_g

    def parameter_for_kohya_key(self, kohya_module_name: str):
        """(patcher, parameter key) Forge's own key maps give a kohya module name (no ``.lora_up.weight``)."""
        from backend.patcher.lora import model_lora_keys_unet, model_lora_keys_clip
        fo = self.sd_model.forge_objects_original
        unet_map = model_lora_keys_unet(fo.unet.model, {})
        if kohya_module_name in unet_map:
            return fo.unet, unet_map[kohya_module_name]
        clip_map = model_lora_keys_clip(fo.clip.cond_stage_model, {})
        return fo.clip.patcher, clip_map[kohya_module_name]

    def layer_for_kohya_key(self, kohya_module_name: str):
        from backend import utils
        patcher, key = self.parameter_for_kohya_key(kohya_module_name)
        return utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
