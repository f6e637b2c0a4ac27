"""Opt-in: our extension inside a real, running A1111 or Forge, through its HTTP API.

Skipped unless ``LORACLR_WEBUI_URL`` (e.g. http://127.0.0.1:7860) names a WebUI started with
``--api`` and this extension installed, and ``LORACLR_WEBUI_LORA_DIR`` its Lora folder. An SD1
checkpoint must be loaded; the test writes two concept LoRAs shaped for it into the Lora
folder (names starting ``loraclr_test_``) and removes every file it wrote at the end. It runs
for minutes on a CPU (64x64 images, few steps).
"""

import base64
import json
import os
import time
import urllib.error
import urllib.request

import pytest
import torch

URL = os.environ.get("LORACLR_WEBUI_URL", "").rstrip("/")
LORA_DIR = os.environ.get("LORACLR_WEBUI_LORA_DIR", "")
TITLE = "LoRACLR composition"
PREFIX = "loraclr_test_"

pytestmark = pytest.mark.skipif(
    not (URL and LORA_DIR), reason="set LORACLR_WEBUI_URL and LORACLR_WEBUI_LORA_DIR to test a running WebUI"
)


def call(path, payload=None, method=None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def txt2img(prompt, args=None, **overrides):
    payload = {"prompt": prompt, "negative_prompt": "ugly", "seed": 11, "steps": 3, "width": 64, "height": 64,
               "sampler_name": "Euler a", "cfg_scale": 7, **overrides}
    if args is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": args}}
    return call("/sdapi/v1/txt2img", payload)


def image_bytes(body, index=0):
    return base64.b64decode(body["images"][index])


def checkpoint_attention_shapes(path):
    """Canonical target -> weight shape of the attention layers of an SD1 ldm checkpoint."""
    from safetensors import safe_open

    from lib_loraclr.lora.keys import ldm_to_diffusers_unet

    shapes = {}
    with safe_open(path, "pt") as checkpoint:
        for key in checkpoint.keys():
            path_ = key.removesuffix(".weight")
            if path_.startswith("model.diffusion_model.") and ".attn2.to_" in path_ and path_.endswith(("to_k", "to_v", "to_q")):
                shapes["unet." + ldm_to_diffusers_unet(path_[len("model.diffusion_model."):])] = checkpoint.get_slice(key).get_shape()
    return shapes


@pytest.fixture(scope="module")
def concept_loras():
    from lib_loraclr.lora.writer import write_kohya_lora, write_sidecar

    status, options = call("/sdapi/v1/options")
    assert status == 200, options
    models = call("/sdapi/v1/sd-models")[1]
    loaded = options["sd_model_checkpoint"]
    checkpoint = next(m["filename"] for m in models if loaded in (m["title"], m["model_name"]) or m["title"].startswith(loaded))
    shapes = checkpoint_attention_shapes(checkpoint)
    assert shapes, f"{checkpoint}: no SD1 attention layers found"
    written = []
    for seed, (name, trigger) in enumerate([("cat", "sks cat"), ("dog", "zqx dog")], 1):
        generator = torch.Generator().manual_seed(seed)
        deltas = {}
        for target, (rows, cols) in shapes.items():
            delta = torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)
            deltas[target] = delta * (0.02 / delta.std())
        path = os.path.join(LORA_DIR, f"{PREFIX}{name}.safetensors")
        write_kohya_lora(path, deltas, "sd1", rank=4)
        write_sidecar(path, trigger, arch="sd1")
        written += [path, path[: -len(".safetensors")] + ".json"]
    assert call("/sdapi/v1/refresh-loras", {})[0] == 200
    yield [f"{PREFIX}cat", f"{PREFIX}dog"]
    for path in os.listdir(LORA_DIR):
        if path.startswith(PREFIX):
            os.remove(os.path.join(LORA_DIR, path))
    call("/sdapi/v1/refresh-loras", {})


def request(cat, dog, **overrides):
    return {"enabled": True, "concepts": [{"lora": cat, "words": "cat", "trigger": "sks"},
                                          {"lora": dog, "words": "dog", "trigger": "zqx"}],
            "settings": {"refinement_iters": 1}, **overrides}


def test_enable_off_is_bit_identical_and_composition_works(concept_loras):
    cat, dog = concept_loras
    status, plain = txt2img("a cat and a dog")
    assert status == 200, plain
    status, off = txt2img("a cat and a dog", [{"enabled": False}])
    assert image_bytes(off) == image_bytes(plain)
    status, composed = txt2img(f"a cat and a dog <lora:{cat}:1>", [request(cat, dog, show_masks=True)])
    assert status == 200, composed
    info = json.loads(composed["info"])
    assert "LoRACLR" in info["infotexts"][0]
    assert len(composed["images"]) == 2  # the image and its mask overlay
    png = call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + composed["images"][0]})[1]
    assert "LoRACLR" in json.dumps(png)
    status, after = txt2img("a cat and a dog")
    assert image_bytes(after) == image_bytes(plain), "nothing may stay installed after a composed generation"


def test_unsupported_sampler_stops_with_our_message(concept_loras):
    status, body = txt2img("a cat and a dog", [request(*concept_loras)], sampler_name="Heun")
    assert status != 200 and "is not supported" in str(body)


def test_merge_bad_names_cancel_and_result_in_the_lora_list(concept_loras):
    cat, dog = concept_loras
    base = {"loras": [cat, dog], "triggers": ["sks cat", "zqx dog"]}
    for bad in ("../x", "a/b", cat):
        status, body = call("/loraclr/v1/merge", {**base, "output": bad})
        assert status == 400, (bad, body)
    status, started = call("/loraclr/v1/merge", {**base, "output": f"{PREFIX}cancelled"})
    assert status == 200, started
    call(f"/loraclr/v1/merge/{started['job']}/cancel", method="POST")
    while call(f"/loraclr/v1/merge/{started['job']}")[1]["state"] == "running":
        time.sleep(1)
    assert call(f"/loraclr/v1/merge/{started['job']}")[1]["state"] == "cancelled"
    assert not os.path.exists(os.path.join(LORA_DIR, f"{PREFIX}cancelled.safetensors"))

    status, started = call("/loraclr/v1/merge", {**base, "output": f"{PREFIX}merged",
                                                 "settings": {"capture_steps": 2, "capture_size": 64}})
    assert status == 200, started
    while (job := call(f"/loraclr/v1/merge/{started['job']}")[1])["state"] == "running":
        time.sleep(2)
    assert job["state"] == "done", job
    assert f"{PREFIX}merged" in [lora["name"] for lora in call("/sdapi/v1/loras")[1]]
    status, merged = txt2img(f"a sks cat <lora:{PREFIX}merged:1>")
    status, plain = txt2img("a sks cat")
    assert image_bytes(merged) != image_bytes(plain)
    assert "Lora hashes" in json.loads(merged["info"])["infotexts"][0]
