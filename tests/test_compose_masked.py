"""The single-pass composition ("masked" method): per-position LoRA scaling in the runtime, the
region router, one owner per pixel, regional cross-attention, and the whole engine, each
against an answer computed another way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_loraclr.compose.attention import cross_attention_modules
from lib_loraclr.compose.concepts import LoraConcept, plan_one_prompt
from lib_loraclr.compose.engine import encode_passes
from lib_loraclr.compose.fusion import exclusive_masks, pass_lora_sets
from lib_loraclr.compose.masked import MaskedLoraEngine
from lib_loraclr.compose.pipeline import CLoRAPipeline
from lib_loraclr.compose.regions import RegionalCrossAttention, RegionRouter
from lib_loraclr.compose.session import ComposeRequest, ConceptRow
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.lora.writer import write_kohya_lora
from lib_loraclr.runtime import LoraRuntime
from lib_loraclr.validation import InputError

from test_compose_engine import CONCEPTS, PROMPT, TIMESTEP, all_hooks, latent, lora_paths, loras  # noqa: F401

MASKED = ComposeSettings(method="masked", attention_res_divisor=16, guidance_scale=5.0)


def test_region_scale_multiplies_each_lora_output_per_position(tiny_sd1, tmp_path):
    """Linear and 1x1-conv LoRAs: output = base(x) + s * (delta x) position by position, with the
    delta taken from the file (not from the runtime's factors)."""
    targets = tiny_sd1.targets()
    linear_name = next(t for t in targets if t.endswith("attn1.to_q"))
    conv_name = next(t for t in targets if t.endswith("proj_in") and isinstance(targets[t], torch.nn.Conv2d))
    generator = torch.Generator().manual_seed(5)
    linear, conv = targets[linear_name], targets[conv_name]
    deltas = {linear_name: torch.randn(linear.out_features, 2, generator=generator) @ torch.randn(2, linear.in_features, generator=generator),
              conv_name: (torch.randn(conv.out_channels, 2, generator=generator) @ torch.randn(2, conv.in_channels, generator=generator))[..., None, None]}
    path = str(tmp_path / "region.safetensors")
    write_kohya_lora(path, deltas, "sd1", rank=2)
    lora = read_lora(path)
    x_tokens = torch.randn(2, 16, linear.in_features, generator=generator)
    x_image = torch.randn(2, conv.in_channels, 4, 4, generator=generator)
    s_tokens = torch.rand(2, 16, 1, generator=generator)
    s_image = torch.rand(2, 1, 4, 4, generator=generator)

    def scale(target, index, term):
        assert index == 0
        return s_tokens if term.dim() == 3 else s_image

    with torch.no_grad():
        with LoraRuntime(targets, [lora]) as runtime, runtime.regions(scale):
            got_linear, got_conv = linear(x_tokens), conv(x_image)
        plain_linear, plain_conv = linear(x_tokens), conv(x_image)
    linear_delta = lora.modules[linear_name].delta_weight().reshape(linear.weight.shape)
    conv_delta = lora.modules[conv_name].delta_weight().reshape(conv.weight.shape)
    want_linear = plain_linear + s_tokens * (x_tokens @ linear_delta.T)
    want_conv = plain_conv + s_image * F.conv2d(x_image, conv_delta)
    assert (got_linear - plain_linear).abs().max() > 1e-2  # the LoRA does act
    torch.testing.assert_close(got_linear, want_linear, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_conv, want_conv, rtol=1e-5, atol=1e-5)


def test_region_router_area_resizes_masks_and_repeats_them_per_batch_half():
    router = RegionRouter({0: (0,), 1: (0, 1)}, subjects=2, latent_hw=(4, 4))
    masks = torch.zeros(2, 2, 1, 4, 4)
    masks[0, 0, 0, :2, :2] = 1.0  # image 0: subject 0 owns the top-left quarter
    masks[1, 1, 0, 2:, 2:] = 1.0  # image 1: subject 1 owns the bottom-right quarter
    router.update(masks)
    term = torch.zeros(4, 4, 3)  # [uncond 2, cond 2] rows, 2x2 tokens, rank 3
    scale = router("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 0, term)
    want_image0 = torch.tensor([1.0, 0, 0, 0])[:, None]  # area pooling of 2x2 blocks, row-major
    assert scale.shape == (4, 4, 1)
    torch.testing.assert_close(scale[0], want_image0)
    torch.testing.assert_close(scale[2], want_image0)  # cond half of image 0
    torch.testing.assert_close(scale[1], torch.zeros(4, 1))
    union = router("unet.x.conv", 1, torch.zeros(2, 3, 4, 4))  # a conv term at the latent size: the union
    torch.testing.assert_close(union[1, 0], masks[1, 1, 0])
    assert router("unet.x", 7, term) is None  # a LoRA with no region (a global style) is never scaled
    with pytest.raises(ValueError, match="batch rows"):
        router("unet.x", 0, torch.zeros(3, 4, 3))


def test_exclusive_masks_give_each_pixel_to_the_relatively_strongest_subject():
    maps = torch.tensor([[[4.0, 2.0, 0.1, 1.0]],  # subject 0, peak 4: relative 1, .5, .025, .25
                         [[1.0, 2.0, 0.1, 0.2]]])  # subject 1, peak 2: relative .5, 1, .05, .1
    masks = exclusive_masks(maps, threshold=0.3, latent_hw=(2, 2))  # (3, 1, 1, 2, 2)
    owners = masks[:, 0, 0].flatten(1).argmax(dim=0).tolist()
    assert owners == [1, 2, 0, 0]  # pass 1 = subject 0, pass 2 = subject 1, pass 0 = base (all < 0.3)
    torch.testing.assert_close(masks.sum(dim=0), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("owner", [0, 1, 2])
def test_one_pass_owning_every_pixel_is_that_pass_alone(tiny_sd1, loras, owner):
    """Regional cross-attention + routed image layers with every pixel owned by pass ``owner``
    must equal the UNet run on that pass's conditioning with only that pass's LoRAs."""
    model = tiny_sd1
    plan = plan_one_prompt(PROMPT, CONCEPTS, model.tokenizer)
    lora_sets = pass_lora_sets(plan)
    x = latent()
    with LoraRuntime(model.targets(), loras) as runtime, torch.no_grad():
        conditioning = encode_passes(model.encode, runtime, plan, lora_sets)
        with runtime.active(lora_sets[owner]):
            want = model.unet_eps(torch.cat([x, x]), TIMESTEP, conditioning.pass_batch(owner))
        masks = torch.zeros(3, 1, 1, 8, 8)
        masks[owner] = 1.0
        router = RegionRouter({0: (0,), 1: (1,)}, 2, (8, 8))
        router.update(masks[1:])
        contexts = torch.stack([conditioning.pass_batch(p).context for p in range(3)])
        with runtime.regions(router), RegionalCrossAttention(
            cross_attention_modules(model.unet), runtime, lora_sets, contexts, (8, 8)
        ) as regional:
            regional.update(masks)
            got = model.unet_eps(torch.cat([x, x]), TIMESTEP, conditioning.pass_batch(0))
        with runtime.active([]):
            base = model.unet_eps(torch.cat([x, x]), TIMESTEP, conditioning.pass_batch(0))
    if owner:
        assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_zero_weight_loras_in_masked_mode_sample_exactly_the_plain_guided_image(tiny_sd1, loras):
    from lib_loraclr.sampling import sample

    composed = CLoRAPipeline(tiny_sd1)(
        PROMPT, [LoraConcept("cat"), LoraConcept("dog")], loras, lora_weights=[0.0, 0.0], steps=4, seed=2,
        height=64, width=64, settings=MASKED, decode=False,
    )
    plain = sample(tiny_sd1, tiny_sd1.encode([PROMPT]), uncond=tiny_sd1.encode([""]), guidance_scale=5.0,
                   steps=4, height=64, width=64, seed=2)
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(composed.latents, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


def test_masked_engine_runs_one_unet_call_per_step_and_leaves_no_hooks(tiny_sd1, loras):
    model = tiny_sd1
    hooks_before = all_hooks(model.unet, model.text_encoder)
    calls = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = CLoRAPipeline(model)(PROMPT, CONCEPTS, loras, steps=3, height=64, width=64, settings=MASKED,
                                      decode=False, keep_mask_history=True)
    finally:
        handle.remove()
    assert calls == [2, 2, 2]  # one [uncond, cond] evaluation per step
    assert all_hooks(model.unet, model.text_encoder) == hooks_before
    assert len(result.mask_history) == 3
    for masks in result.mask_history:  # (P, B, 1, h, w): one owner per pixel
        assert masks.shape == (3, 1, 1, 8, 8)
        assert torch.equal(masks.sum(dim=0), torch.ones(1, 1, 8, 8))
        assert set(masks.unique().tolist()) <= {0.0, 1.0}

    class Boom(RuntimeError):
        pass

    attention = cross_attention_modules(model.unet)[-1]
    failing = attention.register_forward_hook(lambda *args: (_ for _ in ()).throw(Boom("host failure")))
    try:
        with pytest.raises(Boom), LoraRuntime(model.targets(), loras) as runtime:
            plan = plan_one_prompt(PROMPT, CONCEPTS, model.tokenizer)
            lora_sets = pass_lora_sets(plan)
            conditioning = encode_passes(model.encode, runtime, plan, lora_sets)
            engine = MaskedLoraEngine(plan, MASKED, runtime, lora_sets, cross_attention_modules(model.unet), 3)
            engine.step(0, latent(), TIMESTEP, conditioning, model.unet_eps)
    finally:
        failing.remove()
    assert all_hooks(model.unet, model.text_encoder) == hooks_before
    assert runtime._region is None and runtime._plan.n_row_sets == 0


def test_one_prompt_plan_inserts_each_missing_trigger_once(tiny_sd1):
    plan = plan_one_prompt("a sks cat and a dog", CONCEPTS, tiny_sd1.tokenizer)
    assert {p.clean_prompt for p in plan.passes} == {"a sks cat and a zqx dog"}
    tokens = tiny_sd1.tokenizer("a sks cat and a zqx dog").input_ids
    assert plan.passes[0].end_position == len(tokens) - 1 and tokens[-1] == tiny_sd1.tokenizer.eos_token_id


def test_method_travels_through_the_request_and_bad_values_are_refused():
    request = ComposeRequest((ConceptRow("cat_lora", "cat"), ConceptRow("dog_lora", "dog")),
                             settings=ComposeSettings(method="masked", warmup_steps=2))
    again = ComposeRequest.from_infotext(request.to_infotext())
    assert again == request and again.settings.method == "masked"
    values = request.to_dict()
    values["settings"]["method"] = "both"
    with pytest.raises(InputError, match="settings.method"):
        ComposeRequest.from_dict(values)
    values["settings"].update(method="masked", warmup_steps=-1)
    with pytest.raises(InputError, match="settings.warmup_steps"):
        ComposeRequest.from_dict(values)


def test_each_lora_follows_its_subjects_region_and_global_styles_none(tiny_sd1):
    from lib_loraclr.compose.masked import lora_regions

    plan = plan_one_prompt(PROMPT, CONCEPTS, tiny_sd1.tokenizer)
    assert lora_regions(plan, pass_lora_sets(plan)) == {0: (0,), 1: (1,)}
    assert lora_regions(plan, pass_lora_sets(plan, {2: None})) == {0: (0,), 1: (1,)}  # global style: everywhere
    assert lora_regions(plan, pass_lora_sets(plan, {2: [1]})) == {0: (0,), 1: (1,), 2: (1,)}
    assert lora_regions(plan, pass_lora_sets(plan, {2: [0, 1]}))[2] == (0, 1)


def test_warmup_then_layout_stripes_then_maps_route_the_steps(tiny_sd1, loras, monkeypatch):
    """Step 0 base only, steps 1-2 the fixed stripes (25 of 50 reference steps at 4 steps is 2),
    step 3 the previous step's attention masks."""
    routed = []
    update = RegionRouter.update
    monkeypatch.setattr(RegionRouter, "update", lambda self, masks: (routed.append(masks.clone()), update(self, masks))[1])
    settings = ComposeSettings(method="masked", attention_res_divisor=16, guidance_scale=5.0, warmup_steps=1, layout_steps=25)
    result = CLoRAPipeline(tiny_sd1)(PROMPT, CONCEPTS, loras, steps=4, height=64, width=64, settings=settings,
                                     decode=False, keep_mask_history=True)
    assert len(routed) == 4 and all(m.shape == (2, 1, 1, 8, 8) for m in routed)
    assert not routed[0].any()  # warm-up: neither subject LoRA in the image layers
    left, right = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    left[..., :4], right[..., 4:] = 1.0, 1.0
    for masks in routed[1:3]:  # "a cat and a dog": the cat (first row) left, the dog right
        assert torch.equal(masks[0], left) and torch.equal(masks[1], right)
    torch.testing.assert_close(routed[3], result.mask_history[2][1:])  # then step 2's maps


def test_stripes_run_along_the_longer_side_and_leave_the_base_pass_empty():
    from lib_loraclr.compose.masked import stripe_masks

    wide = stripe_masks(4, [1, 2, 3], 2, (2, 6))
    assert wide.shape == (4, 2, 1, 2, 6) and not wide[0].any()
    assert [wide[p, 0, 0, 0].tolist() for p in (1, 2, 3)] == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    tall = stripe_masks(3, [1, 2], 1, (5, 3))
    assert tall[1, 0, 0, :, 0].tolist() == [1, 1, 0, 0, 0] and tall[2, 0, 0, :, 2].tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(tall.sum(dim=0), torch.ones(1, 1, 5, 3))


def test_layout_defaults_for_requests_but_old_infotexts_ran_without_one():
    request = ComposeRequest((ConceptRow("cat_lora", "cat"), ConceptRow("dog_lora", "dog")))
    values = request.to_dict()
    del values["settings"]["layout_steps"]
    assert ComposeRequest.from_dict(values).settings.layout_steps == ComposeSettings().layout_steps > 0
    import json
    assert ComposeRequest.from_infotext(json.dumps(values)).settings.layout_steps == 0
    assert ComposeSettings(layout_steps=8).layout_until(20) == 3 and ComposeSettings(layout_steps=8).layout_until(50) == 8
    assert ComposeSettings(warmup_steps=2, layout_steps=50).layout_until(10) == 10
    values["settings"]["layout_steps"] = 1.5
    with pytest.raises(InputError, match="settings.layout_steps"):
        ComposeRequest.from_dict(values)
