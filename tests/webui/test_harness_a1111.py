"""Tests of the A1111 v1.10.1 stand-in itself (tests/webui_harness)."""
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import requires_gradio
from webui_harness.host import A1111Host

RECORDER = textwrap.dedent('''
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
            EVENTS.append(("process", args))
            p.extra_generation_params["Recorder strength"] = args[1] if len(args) > 1 else None
            p.extra_generation_params["Recorder note"] = "a, b: c"

        def before_process_batch(self, p, *args, **kwargs):
            EVENTS.append(("before_process_batch", args, sorted(kwargs)))

        def after_extra_networks_activate(self, p, *args, **kwargs):
            EVENTS.append(("after_extra_networks_activate", args, sorted(kwargs)))

        def process_batch(self, p, *args, **kwargs):
            EVENTS.append(("process_batch", args, sorted(kwargs)))

        def process_before_every_sampling(self, p, *args, **kwargs):
            EVENTS.append(("process_before_every_sampling", args, sorted(kwargs), tuple(kwargs["x"].shape)))

        def post_sample(self, p, ps, *args):
            EVENTS.append(("post_sample", args, tuple(ps.samples.shape)))

        def postprocess_batch(self, p, *args, **kwargs):
            EVENTS.append(("postprocess_batch", args, sorted(kwargs)))

        def postprocess_batch_list(self, p, pp, *args, **kwargs):
            EVENTS.append(("postprocess_batch_list", args, len(pp.images)))

        def postprocess_image(self, p, pp, *args):
            EVENTS.append(("postprocess_image", args, pp.image.size))

        def postprocess(self, p, processed, *args):
            EVENTS.append(("postprocess", args, len(processed.images)))


    def on_denoiser(params):
        EVENTS.append(("cfg_denoiser", tuple(params.x.shape), tuple(params.text_cond.shape), tuple(params.text_uncond.shape),
                       tuple(params.image_cond.shape), tuple(params.sigma.shape), type(params.denoiser).__name__,
                       params.denoiser.step))


    def on_denoised(params):
        EVENTS.append(("cfg_denoised", tuple(params.x.shape)))


    def on_after_cfg(params):
        EVENTS.append(("cfg_after_cfg", tuple(params.x.shape)))


    script_callbacks.on_cfg_denoiser(on_denoiser)
    script_callbacks.on_cfg_denoised(on_denoised)
    script_callbacks.on_cfg_after_cfg(on_after_cfg)
''')


def write_extension(root, name="recorder-ext", body=RECORDER):
    ext = os.path.join(str(root), name)
    os.makedirs(os.path.join(ext, "scripts"), exist_ok=True)
    with open(os.path.join(ext, "scripts", "recorder.py"), "w", encoding="utf-8") as f:
        f.write(body)
    return ext


def pixels(processed):
    return np.stack([np.asarray(im) for im in processed.images])


# -------------------------------------------------------------------------------------- tests


def test_model_layout_and_attention_patch(a1111):
    import ldm_tiny
    from modules import shared

    sd_model = shared.sd_model
    assert sd_model.is_sd1 and not sd_model.is_sdxl and sd_model.parameterization == "eps"
    unet = sd_model.model.diffusion_model
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 16 and attn2[0] == "input_blocks.1.1.transformer_blocks.0.attn2"
    cross = unet.input_blocks[1][1].transformer_blocks[0].attn2
    assert type(cross).__name__ == "CrossAttention" and cross.heads == 2 and isinstance(cross.to_out[0], torch.nn.Linear)
    assert ldm_tiny.CrossAttention.forward is ldm_tiny.scaled_dot_product_attention_forward
    import ldm.modules.attention
    assert ldm.modules.attention.CrossAttention is ldm_tiny.CrossAttention
    assert torch.nn.Linear.forward.__name__ == "network_Linear_forward"
    assert cross.to_k.network_layer_name == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    te = sd_model.cond_stage_model
    assert type(te).__name__ == "FrozenCLIPEmbedderWithCustomWords"
    q = te.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    assert q.network_layer_name == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert sd_model.get_learned_conditioning(["a cat"]).shape == (1, 77, 32)
    assert sd_model.get_learned_conditioning([" ".join(["cat"] * 80)]).shape == (1, 154, 32)
    assert sd_model.cond_stage_model_empty_prompt.shape == (1, 77, 32)
    assert sd_model.sd_checkpoint_info.name_for_extra == "tiny-sd1" and len(sd_model.sd_model_hash) == 10


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_txt2img_deterministic_per_seed(a1111, sampler):
    first = a1111.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=11)
    again = a1111.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=11)
    other = a1111.txt2img("a photo of a cat", sampler_name=sampler, steps=3, seed=12)
    assert first.images[0].size == (64, 64)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert f"Sampler: {sampler}" in first.info and "Seed: 11" in first.info
    assert a1111.errors() == []


def test_hooks_fire_in_real_order(a1111, tmp_path):
    from modules import infotext_utils
    a1111.load_scripts(write_extension(tmp_path))
    script = a1111.find_script("Recorder")
    args = a1111.script_args({"Recorder": [True, 0.25]})
    processed = a1111.txt2img("a cat", "ugly", steps=2, seed=3, script_args=args)
    names = [e[0] for e in script.events]
    assert names == [
        "setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
        "process_before_every_sampling",
        "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg",
        "post_sample", "postprocess_batch", "postprocess_batch_list", "postprocess_image", "postprocess",
    ]
    for event in script.events:
        if not event[0].startswith("cfg_"):
            assert event[1] == (True, 0.25), event
    by_name = {}
    for e in script.events:
        by_name.setdefault(e[0], e)  # first occurrence
    assert by_name["process_batch"][2] == ["batch_number", "prompts", "seeds", "subseeds"]
    assert by_name["after_extra_networks_activate"][2] == ["batch_number", "extra_network_data", "prompts", "seeds", "subseeds"]
    assert by_name["process_before_every_sampling"][2:] == (["c", "noise", "uc", "x"], (1, 4, 8, 8))
    assert by_name["cfg_denoiser"][1:] == ((2, 4, 8, 8), (1, 77, 32), (1, 77, 32), (2, 5, 1, 1), (2,), "CFGDenoiserKDiffusion", 0)
    assert by_name["post_sample"][2] == (1, 4, 8, 8)

    assert np.asarray(processed.images[0]).std() > 1  # a real picture, no NaN

    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert params["Prompt"] == "a cat" and params["Negative prompt"] == "ugly"
    assert params["Recorder strength"] == "0.25" and params["Recorder note"] == "a, b: c"
    assert params["Size-1"] == "64" and params["Steps"] == "2"
    assert a1111.errors() == []


def test_timesteps_sampler_denoiser(a1111, tmp_path):
    a1111.load_scripts(write_extension(tmp_path))
    script = a1111.find_script("Recorder")
    a1111.txt2img("a cat", steps=3, sampler_name="DDIM", script_args=a1111.script_args({"Recorder": [True, 0.5]}))
    denoiser_events = [e for e in script.events if e[0] == "cfg_denoiser"]
    # like sd_samplers_timesteps_impl.ddim: timesteps 1, 334, 667, 999 -> 3 UNet passes
    assert [e[6] for e in denoiser_events] == ["CFGDenoiserTimesteps"] * 3
    assert [e[7] for e in denoiser_events] == [0, 1, 2]


TARGETS = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def _write_lora(host, name="tiny"):
    """A kohya SD1 LoRA (alpha 1, rank 2) for two layers of the tiny model, with tests/lora_fixtures.py."""
    import lora_fixtures as lf
    shapes = {t: tuple(host.layer_for_kohya_key(lf.kohya_key(t, "sd1")).weight.shape) for t in TARGETS}
    modules = {t: lf.lora_factors(shape[0], shape[1], 2, alpha=1.0, seed=i) for i, (t, shape) in enumerate(shapes.items())}
    path = lf.write_kohya_file(os.path.join(host.lora_dir, f"{name}.safetensors"), modules, "sd1",
                               metadata={"ss_output_name": name, "ss_network_module": "networks.lora"})
    return path, modules


def test_lora_tag_merges_in_place_and_restores(a1111):
    import networks
    path, modules = _write_lora(a1111)
    a1111.refresh_loras()
    assert networks.available_networks["tiny"].filename == path
    assert networks.available_networks["tiny"].sd_version.name == "SD1"

    to_k = a1111.module_by_layer_name("diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k")
    q_proj = a1111.module_by_layer_name("transformer_text_model_encoder_layers_0_self_attn_q_proj")
    w0_k, w0_q = to_k.weight.detach().clone(), q_proj.weight.detach().clone()
    weight_object = to_k.weight

    plain = a1111.txt2img("a cat", seed=5)
    with_lora = a1111.txt2img("a cat <lora:tiny:0.5>", seed=5)
    assert [n.name for n in networks.loaded_networks] == ["tiny"]
    factors = modules[TARGETS[0]]
    delta = 0.5 * 0.5 * factors["lora_up.weight"] @ factors["lora_down.weight"]  # multiplier * alpha / rank
    assert to_k.weight is weight_object
    torch.testing.assert_close(to_k.weight.detach(), w0_k + delta)
    assert not torch.equal(q_proj.weight, w0_q)
    assert to_k.network_current_names == (("tiny", 0.5, 0.5, None),)
    torch.testing.assert_close(to_k.network_weights_backup, w0_k)
    assert "Lora hashes: \"tiny: " in with_lora.info
    assert not np.array_equal(pixels(plain), pixels(with_lora))

    again = a1111.txt2img("a cat", seed=5)
    assert networks.loaded_networks == []
    assert torch.equal(to_k.weight, w0_k) and torch.equal(q_proj.weight, w0_q)
    assert np.array_equal(pixels(plain), pixels(again))
    assert a1111.errors() == []


def test_interrupt_stops_sampling(a1111):
    from modules import script_callbacks, shared
    calls = []

    def on_denoiser(params):
        calls.append(params.denoiser.step)
        if params.denoiser.step == 1:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(on_denoiser)
    processed = a1111.txt2img("a cat", steps=6, n_iter=3, seed=2)
    assert calls == [0, 1]
    assert len(processed.images) == 1
    assert shared.state.interrupted is False  # reset after the job, like wrap_gradio_call


def test_stop_restores_globals(tmp_path):
    linear, conv = torch.nn.Linear.forward, torch.nn.Conv2d.forward
    host = A1111Host(str(tmp_path / "w")).start()
    import ldm_tiny
    cross = ldm_tiny.CrossAttention
    assert torch.nn.Linear.forward is not linear
    host.stop()
    assert torch.nn.Linear.forward is linear and torch.nn.Conv2d.forward is conv
    assert cross.forward is ldm_tiny._original_forward
    assert not [m for m in sys.modules if m.split(".")[0] in {"modules", "networks", "k_diffusion", "ldm", "ldm_tiny", "network"}]


@requires_gradio
def test_ui_args_and_app_routes(a1111, tmp_path):
    from fastapi.testclient import TestClient
    from modules import script_callbacks
    _write_lora(a1111)
    a1111.load_scripts(write_extension(tmp_path))
    tabs_built = []
    script_callbacks.on_ui_tabs(lambda: tabs_built.append(1) or [])
    demo, tabs = a1111.build_ui()
    script = a1111.find_script("Recorder")
    assert (script.args_from, script.args_to) == (1, 3) and tabs == [] and tabs_built == [1]
    args = a1111.script_args()
    assert args == [0, True, 0.5]
    a1111.txt2img("a cat", steps=1, script_args=a1111.script_args({"Recorder": [False, 0.75]}))
    assert script.events[0] == ("setup", (False, 0.75))
    client = TestClient(a1111.app_started(demo))
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["tiny"]


def test_latent_hires_samples_twice_with_new_sampler(a1111, tmp_path):
    a1111.load_scripts(write_extension(tmp_path))
    script = a1111.find_script("Recorder")
    processed = a1111.txt2img("a cat", steps=2, seed=4, enable_hr=True, hr_upscaler="Latent", hr_scale=2, denoising_strength=0.5,
                              script_args=a1111.script_args({"Recorder": [True, 0.5]}))
    sampling = [e for e in script.events if e[0] == "process_before_every_sampling"]
    assert [e[3] for e in sampling] == [(1, 4, 8, 8), (1, 4, 16, 16)]
    assert processed.images[0].size == (128, 128)
    assert "Hires upscale: 2" in processed.info and "Denoising strength: 0.5" in processed.info


def test_lora_functional_option_adds_at_runtime(a1111):
    from modules import shared
    _write_lora(a1111)
    to_k = a1111.module_by_layer_name("diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k")
    w0 = to_k.weight.detach().clone()
    merged = a1111.txt2img("a cat <lora:tiny:1>", seed=5)
    a1111.txt2img("a cat", seed=5)
    shared.opts.lora_functional = True
    functional = a1111.txt2img("a cat <lora:tiny:1>", seed=5)
    assert torch.equal(to_k.weight, w0)
    assert np.abs(pixels(merged).astype(int) - pixels(functional).astype(int)).max() <= 2
