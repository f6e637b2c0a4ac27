"""Tests of the Forge 2.0.1v1.10.1 stand-in itself (tests/webui_harness/forge, forge_host.py)."""
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import requires_gradio
from webui_harness.forge_host import ForgeHost

RECORDER = textwrap.dedent('''
    import torch
    from modules import scripts, script_callbacks

    EVENTS = []


    class Recorder(scripts.Script):
        events = EVENTS

        def title(self):
            return "Recorder"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            import gradio as gr
            enabled = gr.Checkbox(value=True, label="enabled")
            strength = gr.Slider(value=0.5, minimum=0, maximum=1, label="strength")
            self.infotext_fields = [(strength, "Recorder strength")]
            return [enabled, strength]

        def setup(self, p, *args):
            EVENTS.append(("setup", args))

        def before_process(self, p, *args):
            EVENTS.append(("before_process", args))

        def process(self, p, *args):
            EVENTS.append(("process", args, torch.is_inference_mode_enabled()))
            p.extra_generation_params["Recorder strength"] = args[1] if len(args) > 1 else None

        def before_process_batch(self, p, *args, **kwargs):
            EVENTS.append(("before_process_batch", args, sorted(kwargs)))

        def after_extra_networks_activate(self, p, *args, **kwargs):
            EVENTS.append(("after_extra_networks_activate", args, sorted(kwargs)))

        def process_batch(self, p, *args, **kwargs):
            EVENTS.append(("process_batch", args, sorted(kwargs)))

        def process_before_every_sampling(self, p, *args, **kwargs):
            EVENTS.append(("process_before_every_sampling", args, sorted(kwargs), tuple(kwargs["x"].shape),
                           torch.is_inference_mode_enabled()))

        def post_sample(self, p, ps, *args):
            EVENTS.append(("post_sample", args, tuple(ps.samples.shape)))

        def postprocess_batch(self, p, *args, **kwargs):
            EVENTS.append(("postprocess_batch", args, sorted(kwargs)))

        def postprocess_image(self, p, pp, *args):
            EVENTS.append(("postprocess_image", args, pp.image.size))

        def postprocess(self, p, processed, *args):
            EVENTS.append(("postprocess", args, len(processed.images)))


    def on_denoiser(params):
        EVENTS.append(("cfg_denoiser", tuple(params.x.shape), tuple(params.text_cond.shape), tuple(params.text_uncond.shape),
                       tuple(params.image_cond.shape), tuple(params.sigma.shape), type(params.denoiser).__name__,
                       params.denoiser.step))


    def on_denoised(params):
        EVENTS.append(("cfg_denoised",))


    def on_after_cfg(params):
        EVENTS.append(("cfg_after_cfg", tuple(params.x.shape)))


    script_callbacks.on_cfg_denoiser(on_denoiser)
    script_callbacks.on_cfg_denoised(on_denoised)
    script_callbacks.on_cfg_after_cfg(on_after_cfg)
''')

PATCHER = textwrap.dedent('''
    import torch
    from modules import scripts

    CALLS = []


    class Patcher(scripts.Script):
        calls = CALLS

        def title(self):
            return "Patcher"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process_before_every_sampling(self, p, enabled=True, **kwargs):
            if not enabled:
                return
            unet = p.sd_model.forge_objects.unet.clone()

            def attn2_replace(q, k, v, extra_options):
                CALLS.append(("attn2", tuple(q.shape), tuple(k.shape), tuple(v.shape), dict(extra_options),
                              torch.is_inference_mode_enabled()))
                b, _, inner = q.shape
                h = extra_options["n_heads"]
                d = extra_options["dim_head"]
                qh, kh, vh = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
                probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)
                return (probs @ vh).transpose(1, 2).reshape(b, -1, h * d)

            def wrapper(apply_model, args):
                CALLS.append(("wrapper", sorted(args), tuple(args["input"].shape), list(args["cond_or_uncond"]),
                              sorted(args["c"]), torch.is_inference_mode_enabled()))
                return apply_model(args["input"], args["timestep"], **args["c"])

            def attn2_patch(n, context, value, extra_options):
                CALLS.append(("attn2_patch", tuple(n.shape), tuple(context.shape), value is context, extra_options["block"]))
                return n, context, value

            def post_cfg(args):
                CALLS.append(("post_cfg", tuple(args["denoised"].shape)))
                return args["denoised"]

            for number in (1, 2, 4, 5, 7, 8):
                unet.set_model_attn2_replace(attn2_replace, "input", number)
            unet.set_model_attn2_replace(attn2_replace, "middle", 0)
            for number in range(3, 12):
                unet.set_model_attn2_replace(attn2_replace, "output", number)
            unet.set_model_attn2_patch(attn2_patch)
            unet.set_model_unet_function_wrapper(wrapper)
            unet.set_model_sampler_post_cfg_function(post_cfg)
            p.sd_model.forge_objects.unet = unet
''')


def write_extension(root, name="recorder-ext", body=RECORDER, filename="recorder.py"):
    ext = os.path.join(str(root), name)
    os.makedirs(os.path.join(ext, "scripts"), exist_ok=True)
    with open(os.path.join(ext, "scripts", filename), "w", encoding="utf-8") as f:
        f.write(body)
    return ext


def pixels(processed):
    return np.stack([np.asarray(im) for im in processed.images])


# -------------------------------------------------------------------------------------- tests


def test_model_is_forge_shaped(forge):
    import modules_forge  # noqa: F401  (how extensions detect Forge)
    import modules_forge.main_entry  # noqa: F401
    from modules_forge import forge_version
    assert forge_version.version == "2.0.1v1.10.1"
    from modules import shared
    from backend.nn.unet import IntegratedUNet2DConditionModel, CrossAttention
    from backend.operations import ForgeOperations
    from backend.patcher.unet import UnetPatcher

    sd_model = shared.sd_model
    assert type(sd_model).__name__ == "StableDiffusion" and type(sd_model).__module__ == "backend.diffusion_engine.sd15"
    assert not hasattr(sd_model, "model") and sd_model.cond_stage_model is None and sd_model.first_stage_model is None
    assert sd_model.is_sd1 and not sd_model.is_sdxl and not sd_model.is_sd2 and hasattr(sd_model, "forge_objects")
    unet_patcher = sd_model.forge_objects.unet
    assert isinstance(unet_patcher, UnetPatcher) and type(unet_patcher.model).__name__ == "KModel"
    unet = unet_patcher.model.diffusion_model
    assert isinstance(unet, IntegratedUNet2DConditionModel)
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 16 and attn2[0] == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert attn2[6] == "middle_block.1.transformer_blocks.0.attn2" and attn2[-1] == "output_blocks.11.1.transformer_blocks.0.attn2"
    cross = unet.input_blocks[1][1].transformer_blocks[0].attn2
    assert isinstance(cross, CrossAttention) and cross.heads == 2 and cross.dim_head == 16 and not hasattr(cross, "scale")
    assert type(cross.to_k) is ForgeOperations.Linear and not isinstance(cross.to_k, torch.nn.Linear)
    assert cross.to_k.weight.shape == (32, 32) and isinstance(cross.to_out[0], ForgeOperations.Linear)
    # every weight is an inference tensor (loaded under inference_mode)
    assert all(p.is_inference() for p in unet.parameters())
    assert unet_patcher.model.predictor.sigmas.shape == (1000,)

    te = sd_model.forge_objects.clip.cond_stage_model.clip_l
    assert type(te).__name__ == "IntegratedCLIP"
    q = te.transformer.text_model.encoder.layers[0].self_attn.q_proj
    assert type(q) is ForgeOperations.Linear and q.weight.is_inference() and q.parameters_manual_cast
    assert type(te.transformer.text_projection) is ForgeOperations.Linear and te.transformer.text_projection.weight is None
    keys = sd_model.forge_objects.clip.cond_stage_model.state_dict().keys()
    assert "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "clip_l.transformer.text_model.embeddings.token_embedding.wrapped.weight" in keys

    cond = sd_model.get_learned_conditioning(["a cat"])
    assert isinstance(cond, torch.Tensor) and cond.shape == (1, 77, 32) and cond.is_inference()
    assert sd_model.get_learned_conditioning([" ".join(["cat"] * 80)]).shape == (1, 154, 32)
    image = sd_model.decode_first_stage(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 3, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert sd_model.sd_checkpoint_info.name_for_extra == "tiny-sd1" and len(sd_model.sd_model_hash) == 10
    assert sd_model.current_lora_hash == "[]"


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_txt2img_deterministic_per_seed(forge, sampler):
    first = forge.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=11)
    again = forge.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=11)
    other = forge.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=12)
    assert first.images[0].size == (64, 64)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert np.asarray(first.images[0]).std() > 1
    assert f"Sampler: {sampler}" in first.info and "Seed: 11" in first.info and "Version: f2.0.1v1.10.1" in first.info
    assert forge.errors() == []


def test_hooks_fire_in_forge_order(forge, tmp_path):
    from modules import infotext_utils
    forge.load_scripts(write_extension(tmp_path))
    script = forge.find_script("Recorder")
    processed = forge.txt2img("a cat", "ugly", steps=2, seed=3, script_args=forge.script_args({"Recorder": [True, 0.25]}))
    names = [e[0] for e in script.events]
    assert names == [
        "setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
        "process_before_every_sampling",
        "cfg_denoiser", "cfg_after_cfg", "cfg_denoiser", "cfg_after_cfg",  # on_cfg_denoised is never called in Forge
        "post_sample", "postprocess_batch", "postprocess_image", "postprocess",
    ]
    by_name = {e[0]: e for e in reversed(script.events)}
    assert by_name["process"][2] is False  # process() runs outside inference mode
    assert by_name["process_before_every_sampling"][2:] == (["c", "noise", "uc", "x"], (1, 4, 8, 8), True)
    # Forge's CFGDenoiser reports the sampler's own batch (not cond+uncond rows)
    assert by_name["cfg_denoiser"][1:] == ((1, 4, 8, 8), (1, 77, 32), (1, 77, 32), (1, 5, 1, 1), (1,), "CFGDenoiserKDiffusion", 0)
    assert by_name["post_sample"][2] == (1, 4, 8, 8)
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert params["Prompt"] == "a cat" and params["Negative prompt"] == "ugly" and params["Recorder strength"] == "0.25"
    assert forge.errors() == []


TARGETS = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def _write_lora(host, name="tiny", extra=None, metadata=None):
    """A kohya SD1 LoRA (alpha 1, rank 2) for two layers of the tiny model, with tests/lora_fixtures.py."""
    import lora_fixtures as lf
    shapes = {t: tuple(host.layer_for_kohya_key(lf.kohya_key(t, "sd1")).weight.shape) for t in TARGETS}
    modules = {t: lf.lora_factors(shape[0], shape[1], 2, alpha=1.0, seed=i) for i, (t, shape) in enumerate(shapes.items())}
    modules.update(extra or {})
    path = lf.write_kohya_file(os.path.join(host.lora_dir, f"{name}.safetensors"), modules, "sd1",
                               metadata=metadata or {"ss_output_name": name, "ss_network_module": "networks.lora"})
    return path, modules


def test_lora_tag_patches_through_forge_path(forge):
    import lora_fixtures as lf
    import networks
    path, modules = _write_lora(forge)
    forge.refresh_loras()
    assert networks.available_networks["tiny"].filename == path
    assert networks.available_networks["tiny"].sd_version.name == "Unknown"  # Forge: no SD1 guess from kohya metadata

    sd_model = forge.sd_model
    patcher, key = forge.parameter_for_kohya_key(lf.kohya_key(TARGETS[0], "sd1"))
    assert key == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    to_k = forge.layer_for_kohya_key(lf.kohya_key(TARGETS[0], "sd1"))
    q_proj = forge.layer_for_kohya_key(lf.kohya_key(TARGETS[1], "sd1"))
    original_k, original_q = to_k.weight, q_proj.weight
    w0_k, w0_q = to_k.weight.clone(), q_proj.weight.clone()

    plain = forge.txt2img("a cat", seed=5)
    with_lora = forge.txt2img("a cat <lora:tiny:0.5>", seed=5)
    assert [n.name for n in networks.loaded_networks] == ["tiny"]
    assert sd_model.forge_objects_after_applying_lora.unet is not sd_model.forge_objects_original.unet
    (identifier, patches), = sd_model.forge_objects_after_applying_lora.unet.lora_patches.items()
    assert identifier == (path, 0.5, 1.0, False) and key in patches
    factors = modules[TARGETS[0]]
    delta = 0.5 * 0.5 * factors["lora_up.weight"] @ factors["lora_down.weight"]  # multiplier * alpha / rank
    assert to_k.weight is not original_k and to_k.weight.is_inference()  # a new Parameter, merged under inference_mode
    torch.testing.assert_close(to_k.weight, w0_k + delta)
    assert not torch.equal(q_proj.weight, w0_q)
    assert 'Lora hashes: "tiny: ' in with_lora.info
    assert not np.array_equal(pixels(plain), pixels(with_lora))

    again = forge.txt2img("a cat", seed=5)
    assert networks.loaded_networks == [] and sd_model.current_lora_hash == "[]"
    assert sd_model.forge_objects_after_applying_lora.unet is sd_model.forge_objects_original.unet
    assert to_k.weight is original_k and q_proj.weight is original_q
    assert np.array_equal(pixels(plain), pixels(again))
    assert forge.errors() == []


def test_lora_version_mismatch_is_skipped(forge, capsys):
    import lora_fixtures as lf
    import networks
    alien = {f"unet.down_blocks.9.attentions.0.transformer_blocks.{i}.attn2.to_k": lf.lora_factors(4, 4, 2, alpha=1.0, seed=i)
             for i in range(13)}
    _write_lora(forge, "alien", extra=alien)
    plain = forge.txt2img("a cat", seed=5)
    res = forge.txt2img("a cat <lora:alien:1>", seed=5)
    assert "[LORA] LoRA version mismatch for KModel" in capsys.readouterr().out
    assert [n.name for n in networks.loaded_networks] == ["alien"]
    assert forge.sd_model.forge_objects_after_applying_lora.unet is forge.sd_model.forge_objects_original.unet
    assert np.array_equal(pixels(plain), pixels(res))


def test_attn2_replace_on_clone_in_process_before_every_sampling(forge, tmp_path):
    forge.load_scripts(write_extension(tmp_path, "patcher-ext", PATCHER, "patcher.py"))
    script = forge.find_script("Patcher")
    original = forge.sd_model.forge_objects_original.unet
    patched = forge.txt2img("a cat", "ugly", steps=2, seed=7, script_args=forge.script_args({"Patcher": [True]}))

    attn = [c for c in script.calls if c[0] == "attn2"]
    wrappers = [c for c in script.calls if c[0] == "wrapper"]
    assert len(wrappers) == 2 and len(attn) == 32 and len([c for c in script.calls if c[0] == "post_cfg"]) == 2
    assert wrappers[0][1:] == (["c", "cond_or_uncond", "input", "timestep"], (2, 4, 8, 8), [1, 0],
                               ["c_crossattn", "transformer_options"], True)
    first = attn[0]
    assert first[1:4] == ((2, 64, 32), (2, 77, 32), (2, 77, 32)) and first[5] is True
    extra = first[4]
    assert extra["n_heads"] == 2 and extra["dim_head"] == 16 and extra["block"] == ("input", 1) and extra["block_index"] == 0
    assert extra["transformer_index"] == 0 and extra["cond_or_uncond"] == [1, 0] and extra["original_shape"] == [2, 4, 8, 8]
    assert extra["cond_indices"] == [1] and extra["uncond_indices"] == [0] and tuple(extra["sigmas"].shape) == (1,)
    assert "patches_replace" not in extra and "patches" not in extra
    assert [c[4]["transformer_index"] for c in attn[:16]] == list(range(16))
    assert [c[4]["block"] for c in attn[:16]][6] == ("middle", 0)
    assert attn[15][1] == (2, 64, 32)  # output_blocks.11 at 8x8
    patch_calls = [c for c in script.calls if c[0] == "attn2_patch"]
    assert len(patch_calls) == 32 and patch_calls[0][1:] == ((2, 64, 32), (2, 77, 32), True, ("input", 1))

    # the clone never touched the original patcher, and Forge resets forge_objects before every sampling
    assert original.model_options == {"transformer_options": {}}
    assert forge.sd_model.forge_objects_after_applying_lora.unet is original
    n = len(script.calls)
    unpatched = forge.txt2img("a cat", "ugly", steps=2, seed=7, script_args=forge.script_args({"Patcher": [False]}))
    assert len(script.calls) == n
    # the replacement computes the same attention: same picture
    assert np.abs(pixels(patched).astype(int) - pixels(unpatched).astype(int)).max() <= 1
    assert forge.errors() == []


def test_inference_mode_failures_reproduce(forge):
    from backend.nn.unet import BasicTransformerBlock
    unet = forge.diffusion_model
    block = unet.input_blocks[1][1].transformer_blocks[0]
    assert isinstance(block, BasicTransformerBlock)
    to_q = block.attn2.to_q

    # like inside a Forge patch: inference mode on
    with torch.inference_mode():
        assert torch.is_inference_mode_enabled()
        with torch.enable_grad():
            y = to_q(torch.randn(1, 4, 32, requires_grad=True))
        assert not y.requires_grad  # enable_grad alone gives no graph

        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(1, 4, 32, requires_grad=True)
            (x * 2).sum().backward()  # a fresh tensor backpropagates
            assert x.grad is not None
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                to_q(x)
            # as in Forge, ForgeOperations.Linear loads its weight as Parameter(...) (requires_grad True), an inference tensor
            assert to_q.weight.requires_grad and to_q.weight.is_inference()
            with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
                to_q.weight.requires_grad_()
            w = to_q.weight.detach().clone().requires_grad_()  # a clone made outside inference mode works
            x.grad = None
            torch.nn.functional.linear(x, w).sum().backward()
            assert w.grad is not None and x.grad is not None

            # whole block with cloned weights: Forge's in-place residual adds break the backward
            params = {k: v.clone() for k, v in block.named_parameters()}
            h = torch.randn(1, 64, 32, requires_grad=True) * 1.0
            ctx = torch.randn(1, 77, 32)
            out = torch.func.functional_call(block, params, (h, ctx))
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


def test_interrupt_stops_sampling(forge):
    from modules import script_callbacks, shared
    calls = []

    def on_denoiser(params):
        calls.append(params.denoiser.step)
        if params.denoiser.step == 1:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(on_denoiser)
    processed = forge.txt2img("a cat", steps=6, n_iter=3, seed=2)
    assert calls == [0, 1]
    assert len(processed.images) == 1
    assert shared.state.interrupted is False


def test_latent_hires_calls_process_before_every_sampling_twice(forge, tmp_path):
    forge.load_scripts(write_extension(tmp_path))
    script = forge.find_script("Recorder")
    processed = forge.txt2img("a cat", steps=2, seed=4, enable_hr=True, hr_upscaler="Latent", hr_scale=2, denoising_strength=0.5,
                              script_args=forge.script_args({"Recorder": [True, 0.5]}))
    sampling = [e for e in script.events if e[0] == "process_before_every_sampling"]
    assert [e[3] for e in sampling] == [(1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 16, 16)]
    assert processed.images[0].size == (128, 128)
    assert "Hires CFG Scale: 1.0" in processed.info and "Denoising strength: 0.5" in processed.info


def test_stop_restores_globals(tmp_path):
    linear = torch.nn.Linear
    host = ForgeHost(str(tmp_path / "w")).start()
    host.stop()
    assert torch.nn.Linear is linear
    assert not [m for m in sys.modules if m.split(".")[0] in {"modules", "modules_forge", "backend", "networks", "k_diffusion", "network"}]


@requires_gradio
def test_ui_args_and_app_routes(forge, tmp_path):
    import gradio
    from fastapi.testclient import TestClient
    from modules import script_callbacks
    _write_lora(forge)
    forge.load_scripts(write_extension(tmp_path))
    tabs_built = []
    script_callbacks.on_ui_tabs(lambda: tabs_built.append(gradio.__version__) or [])
    demo, tabs = forge.build_ui()
    script = forge.find_script("Recorder")
    assert (script.args_from, script.args_to) == (1, 3) and tabs == [] and len(tabs_built) == 1
    assert forge.script_args() == [0, True, 0.5]
    forge.txt2img("a cat", steps=1, script_args=forge.script_args({"Recorder": [False, 0.75]}))
    assert script.events[0] == ("setup", (False, 0.75))
    client = TestClient(forge.app_started(demo))
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["tiny"]


# ------------------------------------------------------------------------------ SDXL stand-in
# Facts checked against Forge (lllyasviel/stable-diffusion-webui-forge): backend/diffusion_engine/sdxl.py,
# backend/loader.py, backend/nn/unet.py, backend/text_processing/classic_engine.py,
# backend/sampling/condition.py, packages_3rdparty/comfyui_lora_collection/lora.py.

SDXL_TE2_Q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
SDXL_TE1_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SDXL_UNET_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def _size_embedding(values, dim=256):
    """Forge's Timestep(256) for each size id, written out: cat(cos(v * f), sin(v * f)), f = 10000^(-i/128)."""
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.cat([torch.cos(v * freqs), torch.sin(v * freqs)]) for v in values])


def _tokens(tokenizer, text, pad_id):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [pad_id] * (75 - len(ids))])


def test_sdxl_model_is_forge_shaped(forge_sdxl):
    from modules import shared
    from backend.nn.unet import IntegratedUNet2DConditionModel, SpatialTransformer
    from backend.operations import ForgeOperations
    from backend.patcher.unet import UnetPatcher

    sd_model = shared.sd_model
    assert forge_sdxl.arch == "sdxl"
    assert type(sd_model).__name__ == "StableDiffusionXL" and type(sd_model).__module__ == "backend.diffusion_engine.sdxl"
    assert sd_model.is_sdxl and not sd_model.is_sd1 and not sd_model.is_sd2 and not sd_model.is_sd3
    assert sd_model.cond_stage_model is None and not hasattr(sd_model, "model")
    unet_patcher = sd_model.forge_objects.unet
    assert isinstance(unet_patcher, UnetPatcher) and type(unet_patcher.model).__name__ == "KModel"
    unet = unet_patcher.model.diffusion_model
    assert isinstance(unet, IntegratedUNet2DConditionModel) and unet.num_classes == "sequential"
    # SDXL's layout: 9 input blocks (3 levels), no attention in the first level (nor in the last 3 output blocks)
    assert len(unet.input_blocks) == 9 and len(unet.output_blocks) == 9 and list(unet.channel_mult) == [1, 2, 4]
    with_attention = [f"input_blocks.{i}" for i, b in enumerate(unet.input_blocks) if any(isinstance(m, SpatialTransformer) for m in b)]
    with_attention += [f"output_blocks.{i}" for i, b in enumerate(unet.output_blocks) if any(isinstance(m, SpatialTransformer) for m in b)]
    assert with_attention == ["input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8",
                              "output_blocks.0", "output_blocks.1", "output_blocks.2", "output_blocks.3", "output_blocks.4",
                              "output_blocks.5"]
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert attn2[0] == "input_blocks.4.1.transformer_blocks.0.attn2" and "middle_block.1.transformer_blocks.1.attn2" in attn2
    assert unet.input_blocks[4][1].use_linear and type(unet.input_blocks[4][1].proj_in) is ForgeOperations.Linear
    cross = unet.input_blocks[7][1].transformer_blocks[0].attn2
    assert cross.heads == 4 and cross.dim_head == 32 and cross.to_k.weight.shape == (128, 96)  # context = 32 (L) + 64 (G)
    # label_emb: Sequential(Sequential(Linear(adm, 4*mc), SiLU, Linear(4*mc, 4*mc))), adm = pooled (64) + 6 * 256
    adm = unet.label_emb[0]
    assert type(adm[0]) is ForgeOperations.Linear and type(adm[1]) is torch.nn.SiLU and type(adm[2]) is ForgeOperations.Linear
    assert adm[0].weight.shape == (128, 64 + 6 * 256) and adm[2].weight.shape == (128, 128)
    assert unet.config.adm_in_channels == 1600
    assert all(p.is_inference() for p in unet.parameters())

    clip = sd_model.forge_objects.clip
    clip_l, clip_g = clip.cond_stage_model.clip_l, clip.cond_stage_model.clip_g
    assert type(clip_l).__name__ == type(clip_g).__name__ == "IntegratedCLIP"
    assert clip_l.transformer.config.hidden_size == 32 and clip_g.transformer.config.hidden_size == 64
    q = clip_g.transformer.text_model.encoder.layers[0].self_attn.q_proj
    assert type(q) is ForgeOperations.Linear and q.weight.is_inference() and q.parameters_manual_cast
    # both are built with add_text_projection=True; only clip_g's checkpoint has the projection weight
    assert clip_l.transformer.text_projection.weight is None
    assert clip_g.transformer.text_projection.weight.shape == (64, 64) and clip_g.transformer.text_projection.weight.is_inference()
    assert clip.tokenizer.clip_l.pad_token_id == clip.tokenizer.clip_l.eos_token_id == 49407
    assert clip.tokenizer.clip_g.pad_token_id == 0  # SDXL's tokenizer_2 pads with "!"
    keys = clip.cond_stage_model.state_dict().keys()
    assert "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "clip_g.transformer.text_projection.weight" in keys

    engine_l, engine_g = sd_model.text_processing_engine_l, sd_model.text_processing_engine_g
    assert engine_l.text_encoder is clip_l and engine_g.text_encoder is clip_g
    assert (engine_l.clip_skip, engine_l.minimal_clip_skip, engine_l.final_layer_norm, engine_l.return_pooled, engine_l.text_projection) \
        == (2, 2, False, False, False)
    assert (engine_g.clip_skip, engine_g.minimal_clip_skip, engine_g.final_layer_norm, engine_g.return_pooled, engine_g.text_projection) \
        == (2, 2, False, True, True)
    assert (engine_l.embedding_key, engine_g.embedding_key) == ("clip_l", "clip_g")
    sd_model.set_clip_skip(3)
    assert engine_l.clip_skip == engine_g.clip_skip == 3
    sd_model.set_clip_skip(2)
    assert type(sd_model.embedder).__name__ == "Timestep" and sd_model.embedder.dim == 256
    assert sd_model.sd_checkpoint_info.name_for_extra == "tiny-sdxl"
    assert sd_model.forge_objects.vae.first_stage_model.scaling_factor == 0.13025


def test_sdxl_learned_conditioning_as_forge(forge_sdxl):
    from modules import prompt_parser
    sd_model = forge_sdxl.sd_model
    clip = sd_model.forge_objects.clip
    clip_l, clip_g = clip.cond_stage_model.clip_l, clip.cond_stage_model.clip_g

    cond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(["a cat"], width=64, height=96))
    assert set(cond) == {"crossattn", "vector"}
    assert cond["crossattn"].shape == (1, 77, 96) and cond["vector"].shape == (1, 64 + 6 * 256)
    assert cond["crossattn"].is_inference() and cond["vector"].is_inference()

    # independently: penultimate hidden states (no final layer norm), clip_g's pooled output through text_projection
    with torch.inference_mode():
        out_l = clip_l.transformer(_tokens(clip.tokenizer.clip_l, "a cat", 49407), output_hidden_states=True)
        out_g = clip_g.transformer(_tokens(clip.tokenizer.clip_g, "a cat", 0), output_hidden_states=True)
        pooled = clip_g.transformer.text_projection(out_g.pooler_output)
    torch.testing.assert_close(cond["crossattn"][..., :32], out_l.hidden_states[-2])
    torch.testing.assert_close(cond["crossattn"][..., 32:], out_g.hidden_states[-2])
    torch.testing.assert_close(cond["vector"][:, :64], pooled)
    # the six ids, in sdxl.py's order: height, width, crop_h, crop_w, target_height, target_width
    torch.testing.assert_close(cond["vector"][0, 64:], _size_embedding([96, 64, 0, 0, 96, 64]))

    # a plain list (no SdConditioning attributes): 1024 x 1024
    plain = sd_model.get_learned_conditioning(["a cat", "a dog"])
    assert plain["vector"].shape == (2, 1600) and plain["crossattn"].shape == (2, 77, 96)
    torch.testing.assert_close(plain["vector"][1, 64:], _size_embedding([1024] * 2 + [0, 0] + [1024] * 2))
    torch.testing.assert_close(plain["crossattn"][0], cond["crossattn"][0])

    # an all-empty NEGATIVE prompt is forced to zeros (text parts only); an empty positive one is not
    negative = sd_model.get_learned_conditioning(prompt_parser.SdConditioning([""], width=64, height=64, is_negative_prompt=True))
    assert torch.count_nonzero(negative["crossattn"]) == 0 and torch.count_nonzero(negative["vector"][:, :64]) == 0
    torch.testing.assert_close(negative["vector"][0, 64:], _size_embedding([64, 64, 0, 0, 64, 64]))
    positive = sd_model.get_learned_conditioning(prompt_parser.SdConditioning([""], width=64, height=64))
    assert torch.count_nonzero(positive["crossattn"]) > 0

    # chunks of 75 tokens concatenate along the token axis, for both encoders
    assert sd_model.get_learned_conditioning([" ".join(["cat"] * 80)])["crossattn"].shape == (1, 154, 96)
    assert sd_model.get_prompt_lengths_on_ui("a cat") == (2, 75)


def test_sdxl_vector_reaches_label_emb(forge_sdxl):
    from modules import prompt_parser
    from backend.sampling.condition import compile_conditions
    sd_model = forge_sdxl.sd_model
    cond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(["a cat"], width=64, height=64))
    uncond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning(["ugly"], width=64, height=64, is_negative_prompt=True))
    compiled, = compile_conditions(cond)
    assert set(compiled["model_conds"]) == {"c_crossattn", "y"} and compiled["pooled_output"] is cond["vector"]

    seen = []
    label_emb = sd_model.forge_objects.unet.model.diffusion_model.label_emb
    handle = label_emb.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    try:
        processed = forge_sdxl.txt2img("a cat", "ugly", steps=2, seed=3)
    finally:
        handle.remove()
    assert processed.images[0].size == (64, 64) and forge_sdxl.errors() == []
    # one UNet call per step, uncond rows first (Forge's calc_cond_uncond_batch), y = each row's vector
    assert len(seen) == 2 and all(y.shape == (2, 1600) for y in seen)
    for y in seen:
        torch.testing.assert_close(y[0], uncond["vector"][0])
        torch.testing.assert_close(y[1], cond["vector"][0])


def test_sdxl_and_prompt_and_batch(forge_sdxl):
    processed = forge_sdxl.txt2img("a cat AND a dog:0.5", "", steps=2, seed=4, batch_size=2)
    assert len(processed.images) == 2 and forge_sdxl.errors() == []


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_sdxl_txt2img_deterministic_per_seed(forge_sdxl, sampler):
    import time
    start = time.perf_counter()
    first = forge_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=11)
    elapsed = time.perf_counter() - start
    again = forge_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=11)
    other = forge_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=12)
    assert first.images[0].size == (64, 64) and elapsed < 5
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert np.asarray(first.images[0]).std() > 1
    assert f"Sampler: {sampler}" in first.info and "Seed: 11" in first.info and "Model: tiny-sdxl" in first.info
    assert forge_sdxl.errors() == []


def _write_sdxl_lora(host, name="tinyxl"):
    """A kohya SDXL LoRA (alpha 1, rank 2): te1 / te2 q_proj and one UNet attn2.to_k (ldm names: input_blocks_4_1)."""
    import lora_fixtures as lf
    targets = [SDXL_TE2_Q, SDXL_TE1_Q, SDXL_UNET_K]
    shapes = {t: tuple(host.layer_for_kohya_key(lf.kohya_key(t, "sdxl")).weight.shape) for t in targets}
    modules = {t: lf.lora_factors(shape[0], shape[1], 2, alpha=1.0, seed=10 + i) for i, (t, shape) in enumerate(shapes.items())}
    path = lf.write_kohya_file(os.path.join(host.lora_dir, f"{name}.safetensors"), modules, "sdxl",
                               metadata={"ss_output_name": name, "ss_network_module": "networks.lora"})
    return path, modules


def test_sdxl_kohya_keys_map_as_forge(forge_sdxl):
    import lora_fixtures as lf
    from backend.patcher.lora import model_lora_keys_clip, model_lora_keys_unet
    fo = forge_sdxl.sd_model.forge_objects_original
    assert lf.kohya_key(SDXL_TE2_Q, "sdxl") == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    patcher, key = forge_sdxl.parameter_for_kohya_key("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    assert patcher is fo.clip.patcher and key == "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    _, key = forge_sdxl.parameter_for_kohya_key("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    assert key == "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    patcher, key = forge_sdxl.parameter_for_kohya_key(lf.kohya_key(SDXL_UNET_K, "sdxl"))
    assert patcher is fo.unet and key == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    clip_map = model_lora_keys_clip(fo.clip.cond_stage_model, {})
    # with clip_l present, lora_te_ names clip_l only; clip_g is te2 / text_encoder_2
    assert clip_map["lora_te_text_model_encoder_layers_1_mlp_fc1"].startswith("clip_l.")
    assert clip_map["text_encoder_2.text_model.encoder.layers.1.mlp.fc2"] == "clip_g.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    assert clip_map["lora_te2_text_projection"] == "clip_g.transformer.text_projection.weight"
    assert not any(k.startswith("lora_prior_te_text_model") for k in clip_map)
    unet_map = model_lora_keys_unet(fo.unet.model, {})
    assert unet_map["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert unet_map["lora_unet_add_embedding_linear_1"] == "diffusion_model.label_emb.0.0.weight"
    assert unet_map["lora_unet_label_emb_0_2"] == "diffusion_model.label_emb.0.2.weight"


def test_sdxl_te2_lora_merges_onto_clip_g(forge_sdxl):
    import networks
    path, modules = _write_sdxl_lora(forge_sdxl)
    forge_sdxl.refresh_loras()
    assert networks.available_networks["tinyxl"].filename == path
    sd_model = forge_sdxl.sd_model
    clip_g = forge_sdxl.text_encoder_2
    q_g = clip_g.transformer.text_model.encoder.layers[0].self_attn.q_proj
    q_l = forge_sdxl.text_encoder.transformer.text_model.encoder.layers[0].self_attn.q_proj
    to_k = sd_model.forge_objects_original.unet.model.diffusion_model.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    originals = (q_g.weight, q_l.weight, to_k.weight)
    w0 = [w.clone() for w in originals]

    plain = forge_sdxl.txt2img("a cat", seed=5, steps=2)
    with_lora = forge_sdxl.txt2img("a cat <lora:tinyxl:0.5>", seed=5, steps=2)
    assert [n.name for n in networks.loaded_networks] == ["tinyxl"]
    (identifier, patches), = sd_model.forge_objects_after_applying_lora.clip.patcher.lora_patches.items()
    assert identifier == (path, 0.5, 1.0, False)
    assert set(patches) == {"clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    for layer, target, w in zip((q_g, q_l, to_k), (SDXL_TE2_Q, SDXL_TE1_Q, SDXL_UNET_K), w0):
        factors = modules[target]
        delta = 0.5 * 0.5 * factors["lora_up.weight"] @ factors["lora_down.weight"]  # multiplier * alpha / rank
        assert layer.weight.is_inference()
        torch.testing.assert_close(layer.weight, w + delta)
    assert q_g.weight is not originals[0]
    assert 'Lora hashes: "tinyxl: ' in with_lora.info
    assert not np.array_equal(pixels(plain), pixels(with_lora))

    again = forge_sdxl.txt2img("a cat", seed=5, steps=2)
    assert networks.loaded_networks == [] and sd_model.current_lora_hash == "[]"
    assert all(layer.weight is w for layer, w in zip((q_g, q_l, to_k), originals))  # the original Parameters restored
    assert all(torch.equal(layer.weight, w) for layer, w in zip((q_g, q_l, to_k), w0))
    assert np.array_equal(pixels(plain), pixels(again))
    assert forge_sdxl.errors() == []


def test_forge_host_arch_keyword(tmp_path):
    assert ForgeHost(str(tmp_path / "a")).arch == "sd1"
    with pytest.raises(ValueError):
        ForgeHost(str(tmp_path / "b"), arch="sd3")
