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


# ------------------------------------------------------------------------------ SDXL stand-in
# Facts from A1111 1.10.1 (modules/sd_models.py set_model_type, sd_models_xl.py, sd_hijack.py,
# sd_hijack_clip.py, sd_hijack_open_clip.py, extensions-builtin/Lora/networks.py) and sgm
# (sd_xl_base.yaml, encoders/modules.py, openaimodel.py), checked on the tiny model.

TE1_WIDTH, TE2_WIDTH, POOLED, SIZE_DIM = 32, 48, 40, 8  # tiny stand-ins for 768, 1280, 1280, 256


def _size_embedding(values, dim=SIZE_DIM):
    """ConcatTimestepEmbedderND written out: each number -> [cos(v * f), sin(v * f)], f = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.cat([torch.cos(v * freqs), torch.sin(v * freqs)]) for v in values])


def test_sdxl_model_layout(a1111_sdxl):
    import ldm_tiny
    import sgm.modules.attention
    from modules import shared

    m = shared.sd_model
    assert m.is_sdxl and not m.is_sd1 and not m.is_sd2 and not m.is_ssd and not m.is_sdxl_inpaint
    assert m.parameterization == "eps" and m.model.conditioning_key == "crossattn" and m.cond_stage_key == "txt"
    assert type(m).__name__ == "DiffusionEngine" and type(m.model).__name__ == "OpenAIWrapper"
    # extend_sdxl: LegacyDDPMDiscretization, the SD1 schedule, as a plain float32 tensor
    assert m.alphas_cumprod.dtype == torch.float32 and m.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(m.alphas_cumprod, ldm_tiny.make_sd1_alphas_cumprod())
    assert "alphas_cumprod" not in dict(m.named_buffers())
    # the hijack: cond_stage_model IS the conditioner (two text models); conditioner.wrapped an empty Module
    assert m.cond_stage_model is m.conditioner and type(m.conditioner).__name__ == "GeneralConditioner"
    assert type(m.conditioner.wrapped) is torch.nn.Module and not list(m.conditioner.wrapped.children())
    e = m.conditioner.embedders
    assert [type(x).__name__ for x in e] == ["FrozenCLIPEmbedderForSDXLWithCustomWords", "FrozenOpenCLIPEmbedder2WithCustomWords",
                                             "ConcatTimestepEmbedderND", "ConcatTimestepEmbedderND", "ConcatTimestepEmbedderND"]
    assert [x.input_key for x in e] == ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
    assert type(e[0].wrapped).__name__ == "FrozenCLIPEmbedder" and type(e[1].wrapped).__name__ == "FrozenOpenCLIPEmbedder2"
    clip_l, clip_g = e[0].wrapped, e[1].wrapped
    layers = clip_l.transformer.text_model.encoder.layers
    assert clip_l.layer == "hidden" and clip_l.layer_idx == len(layers) - 1  # sd_xl_base: layer_idx 11 of 12 layers
    assert e[0].tokenizer is clip_l.tokenizer and not e[0].return_pooled
    assert (e[0].id_start, e[0].id_end, e[0].id_pad) == (49406, 49407, 49407)
    assert clip_g.layer == "penultimate" and clip_g.return_pooled and not clip_g.legacy and e[1].return_pooled
    assert (e[1].id_start, e[1].id_end, e[1].id_pad) == (49406, 49407, 0)
    # EmbeddingsWithFixes around both token embeddings
    assert type(clip_l.transformer.text_model.embeddings.token_embedding).__name__ == "EmbeddingsWithFixes"
    assert type(clip_g.model.token_embedding).__name__ == "EmbeddingsWithFixes"
    assert isinstance(clip_g.model.token_embedding.wrapped, torch.nn.Embedding)
    # OpenCLIP text tower (open_clip 2.20.0: MultiheadAttention is sequence-first)
    block = clip_g.model.transformer.resblocks[0]
    assert [n for n, _ in block.named_children()] == ["ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"]
    assert isinstance(block.attn, torch.nn.MultiheadAttention) and not block.attn.batch_first
    assert block.attn.in_proj_weight.shape == (3 * TE2_WIDTH, TE2_WIDTH) and block.attn.out_proj.weight.shape == (TE2_WIDTH, TE2_WIDTH)
    assert [n for n, _ in block.mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
    assert clip_g.model.text_projection.shape == (TE2_WIDTH, POOLED) and clip_g.model.positional_embedding.shape == (77, TE2_WIDTH)
    assert clip_g.model.attn_mask.shape == (77, 77) and not hasattr(clip_g.model, "visual")

    unet = m.model.diffusion_model
    assert unet.num_classes == "sequential" and unet.label_emb[0][0].in_features == POOLED + 6 * SIZE_DIM
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    blocks = list(dict.fromkeys(n.split(".transformer_blocks")[0] for n in attn2))
    # no attention in the first level; SpatialTransformers where SDXL has them
    assert blocks == ["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
                      "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1",
                      "output_blocks.5.1"]
    assert "input_blocks.8.1.transformer_blocks.1.attn2" in attn2 and "middle_block.1.transformer_blocks.1.attn2" in attn2
    assert isinstance(unet.input_blocks[4][1].proj_in, torch.nn.Linear)  # use_linear_in_transformer
    assert [n for n, _ in unet.named_modules() if n.endswith(".conv") or n.endswith(".op")] == [
        "input_blocks.3.0.op", "input_blocks.6.0.op", "output_blocks.2.2.conv", "output_blocks.5.2.conv"]
    cross = unet.input_blocks[4][1].transformer_blocks[0].attn2
    assert type(cross) is sgm.modules.attention.CrossAttention and type(cross) is not ldm_tiny.CrossAttention
    assert cross.to_k.in_features == TE1_WIDTH + TE2_WIDTH
    assert sgm.modules.attention.CrossAttention.forward is ldm_tiny.scaled_dot_product_attention_forward  # sdp on sgm too

    # network_layer_mapping: {i}_ + embedders[i].wrapped paths, UNet from sd_model.model
    assert block.attn.network_layer_name == "1_model_transformer_resblocks_0_attn"
    assert block.attn.out_proj.network_layer_name == "1_model_transformer_resblocks_0_attn_out_proj"
    assert layers[0].self_attn.q_proj.network_layer_name == "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert cross.to_k.network_layer_name == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert torch.nn.MultiheadAttention.forward.__name__ == "network_MultiheadAttention_forward"
    assert m.cond_stage_model_empty_prompt.shape == (1, 77, TE1_WIDTH + TE2_WIDTH)
    assert m.sd_checkpoint_info.name_for_extra == "tiny-sdxl"


def test_sdxl_learned_conditioning(a1111_sdxl):
    from modules import prompt_parser, shared

    m = shared.sd_model
    c = m.get_learned_conditioning(prompt_parser.SdConditioning(["a cat", "a dog"], width=64, height=96))
    assert set(c) == {"crossattn", "vector"}
    assert c["crossattn"].shape == (2, 77, TE1_WIDTH + TE2_WIDTH) and c["vector"].shape == (2, POOLED + 6 * SIZE_DIM)
    # vector = [pooled, emb(h), emb(w), emb(crop_top), emb(crop_left), emb(h), emb(w)] (sizes as (height, width))
    torch.testing.assert_close(c["vector"][0, POOLED:], _size_embedding([96, 64, 0, 0, 96, 64]))
    # crossattn: CLIP-L hidden states (layer_idx) then OpenCLIP penultimate, concatenated on the channels
    e = m.conditioner.embedders
    tokens = e[0].process_texts(["a cat"])[0][0][0].tokens
    with torch.no_grad():
        te1 = e[0].wrapped.transformer(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states[e[0].wrapped.layer_idx]
        g_tokens = torch.tensor([tokens])
        g_tokens[0, tokens.index(49407) + 1:] = 0  # OpenCLIP pads with 0 after the end token
        d = e[1].wrapped.encode_with_transformer(g_tokens)
    # "Original" emphasis with all weights 1 rescales by mean/mean: equal up to rounding
    torch.testing.assert_close(c["crossattn"][0, :, :TE1_WIDTH], te1[0])
    torch.testing.assert_close(c["crossattn"][0, :, TE1_WIDTH:], d["penultimate"][0])
    torch.testing.assert_close(c["vector"][0, :POOLED], d["pooled"][0])
    assert not torch.equal(c["crossattn"][0], c["crossattn"][1]) and not torch.equal(c["vector"][0, :POOLED], c["vector"][1, :POOLED])

    # an empty NEGATIVE prompt: force_zero_embeddings=['txt'] zeroes crossattn and the pooled part only
    neg = m.get_learned_conditioning(prompt_parser.SdConditioning([""], width=64, height=64, is_negative_prompt=True))
    assert torch.count_nonzero(neg["crossattn"]) == 0 and torch.count_nonzero(neg["vector"][:, :POOLED]) == 0
    torch.testing.assert_close(neg["vector"][0, POOLED:], _size_embedding([64, 64, 0, 0, 64, 64]))
    # a plain list (the empty-prompt cond): 1024 x 1024 defaults, not zeroed
    empty = m.get_learned_conditioning([""])
    torch.testing.assert_close(empty["vector"][0, POOLED:], _size_embedding([1024, 1024, 0, 0, 1024, 1024]))
    assert torch.count_nonzero(empty["crossattn"]) > 0
    torch.testing.assert_close(m.cond_stage_model_empty_prompt, empty["crossattn"])
    # 76+ tokens: two 77-token chunks for both text encoders; the pooled vector from the first chunk
    long = m.get_learned_conditioning(prompt_parser.SdConditioning([" ".join(["cat"] * 80)], width=64, height=64))
    assert long["crossattn"].shape == (1, 154, TE1_WIDTH + TE2_WIDTH) and long["vector"].shape == (1, POOLED + 6 * SIZE_DIM)


def test_sdxl_cfg_denoiser_passes_cond_dict(a1111_sdxl):
    from modules import script_callbacks, shared
    seen, calls = [], []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(params))
    m = shared.sd_model
    apply_model = m.apply_model

    def recording(x, t, cond):
        calls.append({k: (tuple(v.shape) if torch.is_tensor(v) else [tuple(i.shape) for i in v]) for k, v in cond.items()})
        calls[-1]["rows"] = cond["crossattn"].detach().clone()
        return apply_model(x, t, cond)

    m.apply_model = recording
    try:
        a1111_sdxl.txt2img("a cat", "", steps=2, seed=3)
    finally:
        del m.apply_model
    text_cond = seen[0].text_cond
    assert set(text_cond) == {"crossattn", "vector"} and tuple(text_cond["crossattn"].shape) == (1, 77, 80)
    assert tuple(seen[0].text_uncond["vector"].shape) == (1, 88)
    assert len(calls) == 2
    rows = calls[0].pop("rows")
    assert calls[0] == {"crossattn": (2, 77, 80), "vector": (2, 88), "c_concat": [(2, 5, 1, 1)]}
    torch.testing.assert_close(rows[0], text_cond["crossattn"][0])  # cond rows first, then uncond
    assert torch.count_nonzero(rows[1]) == 0  # the empty negative prompt is zeroed for SDXL
    assert a1111_sdxl.errors() == []


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_sdxl_txt2img_deterministic_per_seed(a1111_sdxl, sampler):
    import time
    start = time.perf_counter()
    first = a1111_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=11)
    assert time.perf_counter() - start < 2
    again = a1111_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=11)
    other = a1111_sdxl.txt2img("a photo of a cat", sampler_name=sampler, steps=2, seed=12)
    assert first.images[0].size == (64, 64) and np.asarray(first.images[0]).std() > 1
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert f"Sampler: {sampler}" in first.info
    assert a1111_sdxl.errors() == []


def _factors(out_dim, in_dim, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {"lora_up.weight": torch.randn(out_dim, rank, generator=g) * 0.1,
            "lora_down.weight": torch.randn(rank, in_dim, generator=g) * 0.1, "alpha": torch.tensor(1.0)}


def _delta(f, multiplier):
    rank = f["lora_down.weight"].shape[0]
    return multiplier * (f["alpha"].item() / rank) * f["lora_up.weight"] @ f["lora_down.weight"]


def _write_sdxl_lora(host, name="xl"):
    """A kohya SDXL LoRA, keys written out by hand: te2 layer 0 q/k/v/out (all four), te2 layer 1
    q only, te2 layer 0 fc1, te1 layer 0 q_proj, a UNet attn2.to_k in sgm naming."""
    from safetensors.torch import save_file
    d = TE2_WIDTH
    modules = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": _factors(d, d, 2, 1),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": _factors(d, d, 2, 2),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": _factors(d, d, 2, 3),
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": _factors(d, d, 2, 4),
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj": _factors(d, d, 2, 5),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": _factors(4 * d, d, 2, 6),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": _factors(TE1_WIDTH, TE1_WIDTH, 2, 7),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": _factors(64, TE1_WIDTH + TE2_WIDTH, 2, 8),
    }
    tensors = {f"{k}.{role}": t.contiguous() for k, f in modules.items() for role, t in f.items()}
    path = os.path.join(host.lora_dir, f"{name}.safetensors")
    save_file(tensors, path, metadata={"ss_output_name": name, "ss_network_module": "networks.lora",
                                        "ss_base_model_version": "sdxl_base_v1-0"})
    return path, modules


def test_sdxl_lora_merges_into_open_clip_mha_and_restores(a1111_sdxl):
    import networks
    _, modules = _write_sdxl_lora(a1111_sdxl)
    a1111_sdxl.refresh_loras()
    assert networks.available_networks["xl"].sd_version.name == "SDXL"

    e = a1111_sdxl.sd_model.conditioner.embedders
    res = e[1].wrapped.model.transformer.resblocks
    attn0, attn1, fc1 = res[0].attn, res[1].attn, res[0].mlp.c_fc
    q1 = e[0].wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    to_k = a1111_sdxl.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    w0 = {"in0": attn0.in_proj_weight.detach().clone(), "out0": attn0.out_proj.weight.detach().clone(),
          "in1": attn1.in_proj_weight.detach().clone(), "fc1": fc1.weight.detach().clone(),
          "q1": q1.weight.detach().clone(), "to_k": to_k.weight.detach().clone()}

    plain = a1111_sdxl.txt2img("a cat", seed=5, steps=2)
    with_lora = a1111_sdxl.txt2img("a cat <lora:xl:0.5>", seed=5, steps=2)
    net = networks.loaded_networks[0]
    assert sorted(net.modules) == sorted([
        "1_model_transformer_resblocks_0_attn_q_proj", "1_model_transformer_resblocks_0_attn_k_proj",
        "1_model_transformer_resblocks_0_attn_v_proj", "1_model_transformer_resblocks_0_attn_out_proj",
        "1_model_transformer_resblocks_1_attn_q_proj", "1_model_transformer_resblocks_0_mlp_c_fc",
        "0_transformer_text_model_encoder_layers_0_self_attn_q_proj",
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn2_to_k"])
    assert net.modules["1_model_transformer_resblocks_0_attn_q_proj"].sd_module is attn0  # via re_x_proj
    d = TE2_WIDTH
    k = "lora_te2_text_model_encoder_layers_0_self_attn_"
    ip = attn0.in_proj_weight.detach()
    torch.testing.assert_close(ip[:d], w0["in0"][:d] + _delta(modules[k + "q_proj"], 0.5))  # rows 0..d: q
    torch.testing.assert_close(ip[d:2 * d], w0["in0"][d:2 * d] + _delta(modules[k + "k_proj"], 0.5))
    torch.testing.assert_close(ip[2 * d:], w0["in0"][2 * d:] + _delta(modules[k + "v_proj"], 0.5))
    torch.testing.assert_close(attn0.out_proj.weight.detach(), w0["out0"] + _delta(modules[k + "out_proj"], 0.5))
    assert isinstance(attn0.network_weights_backup, tuple)
    torch.testing.assert_close(attn0.network_weights_backup[0], w0["in0"])
    # q without k / v / out: the real MultiheadAttention branch needs all four, so nothing is merged
    assert torch.equal(attn1.in_proj_weight, w0["in1"])
    torch.testing.assert_close(fc1.weight.detach(), w0["fc1"] + _delta(modules["lora_te2_text_model_encoder_layers_0_mlp_fc1"], 0.5))
    torch.testing.assert_close(q1.weight.detach(), w0["q1"] + _delta(modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], 0.5))
    torch.testing.assert_close(to_k.weight.detach(), w0["to_k"] + _delta(modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"], 0.5))
    assert not np.array_equal(pixels(plain), pixels(with_lora))
    assert "Lora hashes: \"xl: " in with_lora.info

    again = a1111_sdxl.txt2img("a cat", seed=5, steps=2)
    assert networks.loaded_networks == []
    assert torch.equal(attn0.in_proj_weight, w0["in0"]) and torch.equal(attn0.out_proj.weight, w0["out0"])
    assert torch.equal(fc1.weight, w0["fc1"]) and torch.equal(q1.weight, w0["q1"]) and torch.equal(to_k.weight, w0["to_k"])
    assert np.array_equal(pixels(plain), pixels(again))
    assert a1111_sdxl.errors() == []


def test_sdxl_lora_key_conversion(a1111_sdxl):
    import networks
    from lib_loraclr.lora import keys

    conv = networks.convert_diffusers_name_to_compvis
    assert conv("lora_te2_text_model_encoder_layers_3_mlp_fc1", False) == "1_model_transformer_resblocks_3_mlp_c_fc"
    assert conv("lora_te2_text_model_encoder_layers_3_mlp_fc2", False) == "1_model_transformer_resblocks_3_mlp_c_proj"
    assert conv("lora_te2_text_model_encoder_layers_3_self_attn_out_proj", False) == "1_model_transformer_resblocks_3_attn_out_proj"
    # diffusers-style UNet names convert with the SD1 formula, which is right for SDXL's attention blocks ...
    assert a1111_sdxl.layer_for_kohya_key("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k") \
        is a1111_sdxl.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    # ... but not for SDXL's upsamplers (output_blocks.2.2, not .2.1): unmatched in real A1111 too
    assert conv("lora_unet_up_blocks_0_upsamplers_0_conv", False) == "diffusion_model_output_blocks_2_1_conv"
    assert "diffusion_model_output_blocks_2_1_conv" not in a1111_sdxl.sd_model.network_layer_mapping

    # lib_loraclr's ldm <-> diffusers UNet mapping holds on every SDXL layer, and the kohya SDXL
    # name it writes resolves (through the built-in Lora's own lookup) to that very layer
    mapping = a1111_sdxl.sd_model.network_layer_mapping
    checked = 0
    for path, module in a1111_sdxl.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            diffusers = keys.ldm_to_diffusers_unet(path)
            assert keys.diffusers_to_ldm_unet(diffusers, "sdxl") == path
            kohya = keys.kohya_key("unet." + diffusers, "sdxl")
            assert mapping[kohya.replace("lora_unet", "diffusion_model")] is module
            checked += 1
    assert checked > 200


def test_sdxl_stop_restores_globals(tmp_path):
    mha = torch.nn.MultiheadAttention.forward
    host = A1111Host(str(tmp_path / "w"), arch="sdxl").start()
    import sgm.modules.attention
    cross = sgm.modules.attention.CrossAttention
    assert torch.nn.MultiheadAttention.forward is not mha
    host.stop()
    assert torch.nn.MultiheadAttention.forward is mha and cross.forward is cross.__dict__["forward"] is not None
    from webui_harness import sgm_tiny
    assert not sgm_tiny.optimization_applied()
    assert not [m for m in sys.modules if m.split(".")[0] in {"modules", "networks", "sgm", "ldm", "network"}]
    with pytest.raises(ValueError):
        A1111Host(str(tmp_path / "x"), arch="sd3")


def test_sdxl_lora_tab_hides_other_versions(a1111_sdxl):
    from safetensors.torch import save_file
    from modules import shared
    import ui_extra_networks_lora
    _write_sdxl_lora(a1111_sdxl, "xl")
    tensor = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}
    save_file(tensor, os.path.join(a1111_sdxl.lora_dir, "sd1.safetensors"), metadata={"ss_network_module": "networks.lora"})
    save_file(tensor, os.path.join(a1111_sdxl.lora_dir, "unknown.safetensors"))
    a1111_sdxl.refresh_loras()
    page = ui_extra_networks_lora.ExtraNetworksPageLora()
    assert sorted(i["name"] for i in page.list_items()) == ["unknown", "xl"]  # SD1 (metadata, no sdxl_ version) hidden
    assert page.create_item("xl")["sd_version"] == "SDXL"
    shared.opts.lora_hide_unknown_for_versions = ["SDXL"]
    assert sorted(i["name"] for i in page.list_items()) == ["xl"]
    shared.opts.lora_show_all = True
    assert sorted(i["name"] for i in page.list_items()) == ["sd1", "unknown", "xl"]
