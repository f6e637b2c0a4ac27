"""Our extension inside the A1111 v1.10.1 and Forge 2.0 stand-ins: composition script, merge, UI, API.

Every test runs on both hosts. Runs in the project venv and in the hosts' pinned envs (A1111:
gradio 3.41.2, transformers 4.30.2, no diffusers; Forge: gradio 4.40.0, transformers 4.46.1);
the UI and REST tests need gradio and run in the pinned envs (see .ci/run).
"""
import json
import os
import re
import sys
import time

import numpy as np
import pytest
import torch

from conftest import requires_gradio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TITLE = "LoRACLR composition"
PROMPT = "a cat and a dog"
# 4x4 attention maps at 64 px on the tiny model, one refinement iteration: fast
SETTINGS = {"method": "clora", "attention_res_divisor": 16, "refinement_iters": 1}


def pixels(processed, index=0):
    return np.asarray(processed.images[index])


def attention_deltas(model, seed, rank=4):
    from lib_loraclr.runtime import is_linear

    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for target, module in model.targets().items():
        if any(part in target for part in (".attn1.", ".attn2.", ".self_attn.")) and is_linear(module):
            out_features, in_features = module.weight.shape
            delta = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
            deltas[target] = delta * (0.5 * module.weight.detach().norm() / delta.norm())
    return deltas


HOSTS = ["a1111", "forge", "a1111_sdxl", "forge_sdxl"]  # each host with an SD1 and an SDXL model


@pytest.fixture(params=HOSTS)
def webui(request):
    """A started stand-in of each host, without our extension."""
    return request.getfixturevalue(request.param)


def our_model():
    from lib_loraclr.hosts.webui_host import current_host

    return current_host().model()


@pytest.fixture
def host(webui):
    """The stand-in with our extension loaded and two concept LoRAs in its Lora folder."""
    from lib_loraclr.lora.writer import write_kohya_lora, write_sidecar

    model = our_model()
    for seed, name, trigger in ((1, "cat_lora", "sks cat"), (2, "dog_lora", "zqx dog")):
        path = os.path.join(webui.lora_dir, f"{name}.safetensors")
        write_kohya_lora(path, attention_deltas(model, seed), model.arch, rank=4)
        write_sidecar(path, trigger, arch=model.arch)
    webui.refresh_loras()
    webui.load_scripts(ROOT)
    webui.txt2img("warm up", steps=1)  # transformers adds hooks of its own at the first run
    return webui


def compose_args(host, **overrides):
    request = {
        "enabled": True,
        "concepts": [{"lora": "cat_lora", "words": "cat", "trigger": "sks"}, {"lora": "dog_lora", "words": "dog", "trigger": "zqx"}],
        "settings": dict(SETTINGS),
    }
    request.update(overrides)
    script = host.find_script(TITLE)
    if script.args_to is not None and script.args_to - script.args_from > 1:
        # UI built: like the API, the dict replaces the first argument, the rest stay UI defaults
        args = host.script_args()
        args[script.args_from] = request
        return args
    return host.script_args({TITLE: [request]})


def model_hooks(host):
    """(module, forward hooks, pre-hooks, instance forward) of every UNet / text encoder module with any.

    Compared before and after: transformers registers hooks of its own on the text encoder.
    """
    model = our_model()
    found = []
    for root in [model.unet, *model.text_encoders.values()]:
        for name, module in root.named_modules():
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                found.append((name, tuple(module._forward_hooks.values()), tuple(module._forward_pre_hooks.values()),
                              module.__dict__.get("forward")))
    return found


def attention_class():
    unet = our_model().unet
    return type(next(m for name, m in unet.named_modules() if name.endswith("attn2")))


def test_enable_off_is_bit_identical_to_no_extension(webui):
    baseline = webui.txt2img(PROMPT, "ugly", seed=7, steps=3)
    hooks = model_hooks(webui)  # after a first run: transformers adds hooks of its own then
    webui.load_scripts(ROOT)
    assert webui.find_script(TITLE) is not None
    off = webui.txt2img(PROMPT, "ugly", seed=7, steps=3, script_args=webui.script_args({TITLE: [{"enabled": False}]}))
    assert np.array_equal(pixels(baseline), pixels(off))
    assert "LoRACLR" not in off.info
    assert model_hooks(webui) == hooks
    assert webui.errors() == []


@pytest.mark.parametrize("sampler, method", [("Euler a", "clora"), ("DDIM", "clora"), ("Euler a", "masked"), ("DDIM", "masked")])
def test_composition_runs_and_leaves_nothing_behind(host, sampler, method):
    cross_attention_forward = attention_class().forward
    hooks = model_hooks(host)
    plain = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3)
    settings = {**SETTINGS, "method": method}
    composed = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3,
                            script_args=compose_args(host, settings=settings))
    assert host.errors() == []
    assert not np.array_equal(pixels(plain), pixels(composed))  # sanity; the known answers are in test_compose_exact
    (recorded,) = re.findall(r'LoRACLR: ("(?:[^"\\]|\\.)*")', composed.info)
    assert json.loads(json.loads(recorded)) == {
        "concepts": [{"lora": "cat_lora", "words": "cat", "trigger": "sks", "weight": 1.0},
                     {"lora": "dog_lora", "words": "dog", "trigger": "zqx", "weight": 1.0}],
        "style": "", "style_weight": 1.0, "style_on": "",
        "settings": {"method": method, "step_size": 20.0, "temperature": 0.5, "max_iter_to_alter": 30,
                     "refinement_iters": 1, "mask_threshold": 0.3, "attention_res_divisor": 16,
                     "use_latent_update": True, "use_masks": True, "exclusive_masks": True, "warmup_steps": 0,
                     "layout_steps": 8},
        "show_masks": False,
    }
    repeated = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3,
                            script_args=compose_args(host, settings=settings))
    assert np.array_equal(pixels(composed), pixels(repeated)), "a composition must not depend on the one before it"
    assert model_hooks(host) == hooks
    assert attention_class().forward is cross_attention_forward
    again = host.txt2img(PROMPT, "ugly", seed=3, sampler_name=sampler, steps=3)
    assert np.array_equal(pixels(plain), pixels(again))


def test_latent_update_reaches_the_sampler(host, monkeypatch):
    """With the update on, the sampler carries the updated latent.

    Known answer (Euler, s_churn 0): the sampler's next x is x' + (x' - denoised) / sigma_i *
    (sigma_{i+1} - sigma_i) with x' the latent our step wrote back (the engine's updated UNet
    input / c_in), not the x it passed in; the last step's result, denoised, is what is decoded.
    The update runs at steps < round(30 * 3 / 50) = 2 and moves x there; step 2 leaves it (but
    for the x * c_in / c_in round trip).
    """
    from lib_loraclr.compose.engine import ComposeEngine
    from lib_loraclr.hosts.webui_denoiser import ComposeDenoiser, kdiffusion_scale
    from modules import processing

    calls, results, decoded = [], [], []
    original_forward, original_step, original_decode = ComposeDenoiser.forward, ComposeEngine.step, processing.decode_latent_batch

    def forward(self, x, sigma, *args, **kwargs):
        before = x.clone()
        output = original_forward(self, x, sigma, *args, **kwargs)
        calls.append((before, x.clone(), sigma.clone(), output.clone()))
        return output

    def step(self, *args, **kwargs):
        results.append(original_step(self, *args, **kwargs))
        return results[-1]

    def decode(model, batch, *args, **kwargs):
        decoded.append(batch.clone())
        return original_decode(model, batch, *args, **kwargs)

    monkeypatch.setattr(ComposeDenoiser, "forward", forward)
    monkeypatch.setattr(ComposeEngine, "step", step)
    monkeypatch.setattr(processing, "decode_latent_batch", decode)
    with_update = host.txt2img(PROMPT, seed=4, steps=3, script_args=compose_args(host))
    assert host.errors() == []
    # refinement steps {0, 10, 20} of 50 -> {0, 1} of 3 (round half up): 1 + 1 refinement iteration at both
    assert [len(result.losses) for result in results] == [1 + SETTINGS["refinement_iters"]] * 2 + [0]

    def close(actual, expected, rtol=1e-5):
        assert (actual - expected).abs().max().item() <= rtol * expected.abs().max().item()

    for i, ((before, after, sigma, denoised), result) in enumerate(zip(calls, results)):
        close(after * kdiffusion_scale(sigma, after.dtype), result.latent)  # what the engine updated, in x terms
        moved = (after - before).abs().max().item()
        roundoff = 1e-5 * before.abs().max().item()  # x * c_in / c_in without an update
        if i == 0:  # the first update is large; the second's size depends on the gradient (~roundoff at times)
            assert moved > 10 * roundoff, (i, moved, roundoff)
        elif i == 2:
            assert moved <= roundoff, (i, moved, roundoff)
        following = calls[i + 1][0] if i + 1 < len(calls) else decoded[0]
        sigma_next = calls[i + 1][2] if i + 1 < len(calls) else torch.zeros_like(sigma)
        close(following, after + (after - denoised) / sigma.view(-1, 1, 1, 1) * (sigma_next - sigma).view(-1, 1, 1, 1))

    without = host.txt2img(PROMPT, seed=4, steps=3, script_args=compose_args(
        host, settings={**SETTINGS, "use_latent_update": False}))
    assert not np.array_equal(pixels(with_update), pixels(without))  # sanity: the update matters


def test_concept_lora_tags_are_not_applied_by_the_builtin_lora(host):
    import networks

    plain = host.txt2img(PROMPT, seed=5, steps=2, script_args=compose_args(host))
    tagged = host.txt2img(PROMPT + " <lora:cat_lora:1> <lora:dog_lora:0.5>", seed=5, steps=2, script_args=compose_args(host))
    assert host.errors() == []
    assert networks.loaded_networks == []
    assert np.array_equal(pixels(plain), pixels(tagged))


@pytest.mark.parametrize("method", ["clora", "masked"])
def test_show_masks_adds_overlays_and_batches_work(host, monkeypatch, method):
    import lib_loraclr.webui.compose_script as compose_script
    from lib_loraclr.compose.overlay import LEGEND_ROW, mask_overlay

    overlays = []

    def recording_overlay(image, masks, names):
        overlays.append((image.copy(), masks.clone(), list(names), mask_overlay(image, masks, names)))
        return overlays[-1][-1]

    monkeypatch.setattr(compose_script, "mask_overlay", recording_overlay)
    processed = host.txt2img(PROMPT, seed=6, steps=2, batch_size=2, n_iter=2,
                             script_args=compose_args(host, show_masks=True, settings={**SETTINGS, "method": method}))
    assert host.errors() == []
    # 4 generated images, then their 4 mask overlays in the same order, each with the first infotext
    assert len(processed.images) == 8 and len(processed.infotexts) == 8
    assert len(overlays) == 4
    for index, (source, masks, names, overlay) in enumerate(overlays):
        assert np.array_equal(np.asarray(source), pixels(processed, index))
        assert processed.images[4 + index] is overlay
        assert names == ["cat_lora", "dog_lora"] and tuple(masks.shape) == (3, 1, 8, 8)
        assert torch.allclose(masks.sum(dim=0), torch.ones(1, 8, 8))
        assert overlay.size == (64, 64 + LEGEND_ROW * 2 + 4)
        base_only = np.asarray(masks[0, 0] == 1).repeat(8, 0).repeat(8, 1)  # untinted pixels (8 px per latent px)
        assert np.array_equal(np.asarray(overlay)[:64][base_only], pixels(processed, index)[base_only])
    assert processed.infotexts[4:] == [processed.infotexts[0]] * 4
    assert len({overlay.tobytes() for *_, overlay in overlays}) == 4  # one per image (their seeds differ)


@pytest.mark.parametrize("method", ["clora", "masked"])
def test_hires_fix_composes_the_second_pass_at_its_size(host, method):
    hooks = model_hooks(host)
    processed = host.txt2img(PROMPT, seed=4, steps=2, enable_hr=True, hr_upscaler="Latent", hr_scale=2,
                             denoising_strength=0.5, script_args=compose_args(
                                 host, show_masks=True, settings={**SETTINGS, "method": method}))
    assert host.errors() == []
    assert len(processed.images) == 2 and processed.images[0].size == (128, 128)
    from lib_loraclr.compose.overlay import LEGEND_ROW

    assert processed.images[1].size == (128, 128 + LEGEND_ROW * 2 + 4)  # the second pass's masks, at its size
    assert model_hooks(host) == hooks


@pytest.mark.parametrize("prompt, sampler, message", [
    ("a cat and a bird", "Euler a", "not found in prompt"),
    (PROMPT, "Heun", "is not supported"),
])
def test_bad_requests_stop_the_generation_with_a_clear_error_and_leave_no_hooks(host, prompt, sampler, message):
    hooks = model_hooks(host)
    with pytest.raises(RuntimeError, match=f"LoRACLR composition: .*{message}"):
        host.run(host.make_txt2img(prompt, seed=1, steps=2, sampler_name=sampler, script_args=compose_args(host)))
    assert model_hooks(host) == hooks
    assert host.errors() == []  # raised to the caller, not swallowed into the host's error log
    plain = host.txt2img(prompt, seed=1, steps=2)
    assert host.errors() == []
    assert len(plain.images) == 1 and "LoRACLR" not in plain.info


def test_failing_step_leaves_no_hooks(host, monkeypatch):
    from lib_loraclr.compose.engine import ComposeEngine

    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ComposeEngine, "step", failing_step)
    hooks = model_hooks(host)
    baseline = host.txt2img(PROMPT, seed=2, steps=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        host.run(host.make_txt2img(PROMPT, seed=2, steps=2, script_args=compose_args(host)))
    assert calls and model_hooks(host) == hooks
    after = host.txt2img(PROMPT, seed=2, steps=2)
    assert np.array_equal(pixels(baseline), pixels(after))


def test_unsupported_sampler_is_refused():
    from lib_loraclr.hosts.a1111 import A1111ComposeDenoiser

    class Sampler:
        funcname = "sample_heun"
        model_wrap_cfg = None

    with pytest.raises(ValueError, match="is not supported"):
        A1111ComposeDenoiser(Sampler(), None, None, None)


def test_merge_reads_the_checkpoint_weights_and_refreshes_the_lora_list(host):
    import networks
    from lib_loraclr.hosts.webui_host import current_host
    from lib_loraclr.webui.merge_service import MergeRequest, MergeService

    def to_k_weight():
        return host.layer_for_kohya_key(to_k_key).weight.detach().clone()

    from lib_loraclr.lora.keys import kohya_key
    model = our_model()
    to_k_key = kohya_key(next(t for t in model.targets() if t.startswith("unet.") and t.endswith("attn2.to_k")), model.arch)

    w0 = to_k_weight()
    with_lora = host.txt2img("a cat <lora:cat_lora:1>", seed=1, steps=1)  # the host merges it into the weights
    assert not torch.equal(to_k_weight(), w0)

    seen = []
    service = MergeService(current_host())
    original_merge = __import__("lib_loraclr.webui.merge_service", fromlist=["merge_to_file"]).merge_to_file

    def spying_merge(model, *args, **kwargs):
        seen.append(to_k_weight())
        return original_merge(model, *args, **kwargs)

    import lib_loraclr.webui.merge_service as merge_service
    merge_service.merge_to_file = spying_merge
    try:
        job = service.start(MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "merged",
                                         settings={"capture_steps": 2, "capture_size": 64}))
        status = service.jobs.wait(job, 300)
    finally:
        merge_service.merge_to_file = original_merge
    assert status.state == "done", status.error
    assert torch.equal(seen[0], w0), "the merge must run on the checkpoint's own weights"
    assert "merged" in networks.available_networks
    assert os.path.isfile(os.path.join(host.lora_dir, "merged.safetensors"))
    again = host.txt2img("a cat <lora:cat_lora:1>", seed=1, steps=1)
    assert np.array_equal(pixels(with_lora), pixels(again)), "the host's own LoRA must apply again after a merge"
    merged = host.txt2img("a cat <lora:merged:1>", seed=1, steps=1)
    plain = host.txt2img("a cat", seed=1, steps=1)
    assert not np.array_equal(pixels(merged), pixels(plain))
    assert "merged" in merged.info
    assert host.errors() == []


class UnetGate:
    """Holds the first UNet call (a merge's feature capture) until ``release`` is set, so a test
    can act while a job is known to be running; ``entered`` is set once that call is waiting."""

    def __init__(self, unet):
        import threading

        self.entered, self.release = threading.Event(), threading.Event()
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(120), "the test never released the UNet"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release.set()
        self.handle.remove()


def merge_outputs(folder, name):
    """Every file a merge named ``name`` writes: the LoRA, its sidecar, its report."""
    from lib_loraclr.lora.base import sidecar_path
    from lib_loraclr.webui.merge_service import report_path_for

    lora = os.path.join(folder, f"{name}.safetensors")
    return [lora, sidecar_path(lora), report_path_for(lora)]


def check_cancelled_cleanly(host, final, name, files_before):
    from lib_loraclr.hosts.webui_host import current_host

    assert final["state"] == "cancelled", final
    assert final["error"] is None and final["result"] is None
    assert final["log"][-1] == "cancelled: nothing was written"
    assert [path for path in merge_outputs(host.lora_dir, name) if os.path.exists(path)] == []
    assert sorted(os.listdir(host.lora_dir)) == files_before  # no temporary files left either
    assert name not in host.refresh_loras()
    lock = current_host().queue_lock
    assert lock.acquire(blocking=False), "the cancelled job must release the queue lock"
    lock.release()
    generated = host.txt2img("a cat", seed=1, steps=1)
    assert len(generated.images) == 1 and host.errors() == []


def test_distill_merge_with_its_pair_teacher_runs_on_the_host_model(host, request):
    """``distill``'s defaults sample a composed pair teacher (``compose.masked`` on the host's own
    UNet and tokenizer): the merge finishes, the pool holds the pair's points, the file is written
    and generation afterwards is unchanged (every hook removed). Where the host encodes prompts
    without gradients (Forge: ``inference_mode``; SDXL's conditioner: ``no_grad``) the text-encoder
    layers keep the concepts' deltas stacked and the job's log says so; A1111's SD1 trains them."""
    from lib_loraclr.hosts.webui_host import current_host
    from lib_loraclr.webui.merge_service import MergeRequest, MergeService

    text_encoder_layers = sum(1 for target in attention_deltas(our_model(), 1) if target.startswith("text_encoder"))
    expected_untrained = 0 if request.node.callspec.params["webui"] == "a1111" else text_encoder_layers

    before = host.txt2img("a cat", seed=3, steps=1)
    service = MergeService(current_host())
    job = service.start(MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "distilled",
                                     settings={"method": "distill", "capture_steps": 1, "capture_size": 64,
                                               "distill_iters": 2, "distill_trajectories": 1, "report": False,
                                               "end_to_end": False}))
    status = service.jobs.wait(job, 300)
    assert status.state == "done", status.error
    assert status.result["distill"]["pool_samples"] == 2 * 1 * 1 + 1 * 1 * 1  # concepts, then the default pair
    assert status.result["distill"]["pair_samples"] == 1
    assert text_encoder_layers > 0 and status.result["distill"]["untrained_layers"] == expected_untrained
    assert any("keep the concepts' deltas stacked" in line for line in status.log) == (expected_untrained > 0)
    assert os.path.isfile(os.path.join(host.lora_dir, "distilled.safetensors"))
    after = host.txt2img("a cat", seed=3, steps=1)
    assert np.array_equal(pixels(before), pixels(after))


def test_merge_cancelled_while_running_writes_nothing_and_frees_the_queue(host):
    """Cancel a RUNNING merge (held inside its first UNet call, with progress already reported):
    it ends "cancelled" at its next progress check, writes none of its files, and a generation
    runs afterwards (the queue lock is free). Runs without gradio/FastAPI; the REST form below."""
    from lib_loraclr.hosts.webui_host import current_host
    from lib_loraclr.webui.merge_service import MergeRequest, MergeService

    files_before = sorted(os.listdir(host.lora_dir))
    service = MergeService(current_host())
    lock = current_host().queue_lock
    with UnetGate(our_model().unet) as gate:
        job = service.start(MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "cancelled_merge",
                                         settings={"capture_steps": 2, "capture_size": 64}))
        assert gate.entered.wait(120), service.status(job)
        running = service.status(job)
        assert running.state == "running" and running.percent > 0, running
        assert not lock.acquire(blocking=False), "a running merge holds the queue lock"
        answer = service.cancel(job)
        assert answer.state == "running"  # a request: the job stops at its next progress check
        gate.release.set()
        final = service.jobs.wait(job, 120)
    check_cancelled_cleanly(host, final.to_dict(), "cancelled_merge", files_before)


def test_rest_cancel_of_a_running_merge(host):
    """The REST form: POST /merge, poll it while it is held running, POST /merge/{id}/cancel, poll
    it to "cancelled"; no files, queue free. Needs FastAPI + httpx (not gradio)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    host.shared.cmd_opts.api = True
    client = TestClient(host.app_started())
    files_before = sorted(os.listdir(host.lora_dir))
    with UnetGate(our_model().unet) as gate:
        started = client.post("/loraclr/v1/merge", json={
            "loras": ["cat_lora", "dog_lora"], "triggers": ["sks cat", "zqx dog"], "output": "rest_cancelled",
            "settings": {"capture_steps": 2, "capture_size": 64},
        })
        assert started.status_code == 200, started.text
        job = started.json()["job"]
        assert gate.entered.wait(120), client.get(f"/loraclr/v1/merge/{job}").json()
        running = client.get(f"/loraclr/v1/merge/{job}").json()
        assert running["state"] == "running" and running["percent"] > 0, running
        answer = client.post(f"/loraclr/v1/merge/{job}/cancel")
        assert answer.status_code == 200 and answer.json()["state"] == "running"
        gate.release.set()
        for _ in range(600):
            final = client.get(f"/loraclr/v1/merge/{job}").json()
            if final["state"] != "running":
                break
            time.sleep(0.1)
    check_cancelled_cleanly(host, final, "rest_cancelled", files_before)
    assert client.post("/loraclr/v1/merge/99/cancel").status_code == 404


@requires_gradio
def test_ui_builds_and_infotext_round_trips(host):
    from modules import infotext_utils

    demo, tabs = host.build_ui()
    assert [title for _, title, _ in tabs] == ["LoRACLR Merge"]
    script = host.find_script(TITLE)
    composed = host.txt2img(PROMPT, seed=3, steps=2, script_args=compose_args(host, show_masks=True))
    params = infotext_utils.parse_generation_parameters(composed.infotexts[0])
    restored = [key(params) for _, key in script.infotext_fields]
    assert restored[0] is True
    assert restored[1:5] == ["cat_lora", "cat", "sks", 1.0]
    assert restored[5:9] == ["dog_lora", "dog", "zqx", 1.0]
    assert restored[-1] is True  # show masks
    from lib_loraclr.webui.ui import request_from_args
    sent = request_from_args([compose_args(host, show_masks=True)[script.args_from]])
    assert request_from_args(restored) == sent


@requires_gradio
def test_rest_merge_poll_cancel_and_bad_names(host):
    from fastapi.testclient import TestClient

    demo, _ = host.build_ui()
    host.shared.cmd_opts.api = True  # our routes follow the host's --api
    client = TestClient(host.app_started(demo))
    names = [row["name"] for row in client.get("/loraclr/v1/loras").json()]
    assert {"cat_lora", "dog_lora"} <= set(names)
    for bad in ("../up", "a/b", "cat_lora"):
        response = client.post("/loraclr/v1/merge", json={"loras": ["cat_lora", "dog_lora"], "triggers": ["sks", "zqx"], "output": bad})
        assert response.status_code == 400, bad
    assert client.get("/loraclr/v1/merge/99").status_code == 404
    started = client.post("/loraclr/v1/merge", json={
        "loras": ["cat_lora", "dog_lora"], "triggers": ["sks cat", "zqx dog"], "output": "api_merge",
        "settings": {"capture_steps": 2, "capture_size": 64, "method": "sum"},
    })
    assert started.status_code == 200, started.text
    job = started.json()["job"]
    for _ in range(600):
        status = client.get(f"/loraclr/v1/merge/{job}").json()
        if status["state"] != "running":
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    assert os.path.isfile(os.path.join(host.lora_dir, "api_merge.safetensors"))
    cancel_done = client.post(f"/loraclr/v1/merge/{job}/cancel")  # a finished job stays done (see the running case above)
    assert cancel_done.status_code == 200 and cancel_done.json()["state"] == "done"
    assert client.get(f"/loraclr/v1/merge/{job}").json()["state"] == "done"
    assert "api_merge" in [x["name"] for x in client.get("/sdapi/v1/loras").json()]
