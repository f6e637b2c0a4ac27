"""Hostile use of our WebUI side: REST routes under the host's own access rules, hostile merge
requests through them, bad composition arguments and embeddings in the prompt.

The REST tests need FastAPI (the hosts' pinned envs, see .ci/run); the others run everywhere.
"""
import base64
import hashlib
import math
import os

import pytest

from test_extension import PROMPT, compose_args, host, webui  # noqa: F401  (host and webui are fixtures)


def client_for(host, **cmd_opts):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    for name, value in cmd_opts.items():
        setattr(host.shared.cmd_opts, name, value)
    return TestClient(host.app_started())


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def folder_state(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_routes_are_mounted_only_with_the_hosts_api(host):
    assert client_for(host).get("/loraclr/v1/loras").status_code == 404  # (skips without FastAPI)  # no --api: not there at all
    assert client_for(host, api=True).get("/loraclr/v1/loras").status_code == 200
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import script_callbacks

    host.shared.cmd_opts.api = False
    app = FastAPI()
    app.add_api_route("/sdapi/v1/txt2img", lambda: {}, methods=["POST"])  # the host mounted its API itself
    script_callbacks.app_started_callback(None, app)
    assert TestClient(app).get("/loraclr/v1/loras").status_code == 200


def test_routes_need_the_hosts_api_credentials(host):
    client = client_for(host, api=True, api_auth="ann:s3cr:et,bob:pw")
    merge = {"loras": ["cat_lora", "dog_lora"], "triggers": ["sks cat", "zqx dog"], "output": "unauthorised",
             "settings": {"method": "sum", "capture_steps": 1, "capture_size": 64}}
    before = folder_state(host.lora_dir)
    for headers in ({}, basic("ann", "wrong"), basic("eve", "s3cr:et"), basic("ann", "s3cr:et\u00e9")):
        assert client.get("/loraclr/v1/loras", headers=headers).status_code == 401
        response = client.post("/loraclr/v1/merge", json=merge, headers=headers)
        assert response.status_code == 401  # FastAPI's own HTTPBasic answers missing or non-ASCII credentials
        if headers in (basic("ann", "wrong"), basic("eve", "s3cr:et")):
            assert response.json()["detail"] == "Incorrect username or password"
        assert client.get("/loraclr/v1/merge/1", headers=headers).status_code == 401
    assert folder_state(host.lora_dir) == before
    assert client.get("/loraclr/v1/loras", headers=basic("ann", "s3cr:et")).status_code == 200  # ':' in a password
    assert client.get("/loraclr/v1/loras", headers=basic("bob", "pw")).status_code == 200


@pytest.mark.parametrize("change, detail", [
    ({"overwrite": "false", "output": "cat_lora"}, "merge request: overwrite: value is not a valid boolean"),
    ({"overwrite": True, "output": "cat_lora"}, "is one of the inputs (cat_lora.safetensors)"),
    ({"overwrite": True, "output": "dog_lora"}, "is one of the inputs (dog_lora.safetensors)"),
    ({"triggers": "ab"}, "merge request: triggers: value is not a valid list"),
    ({"triggers": [1, 2]}, "merge request: triggers.0: str type expected; triggers.1: str type expected"),
    ({"weights": [1.0, math.nan]}, "merge request: weights.1: must be a finite number"),
    ({"settings": {"capture_size": 1000000}}, "merge request: settings.capture_size: ensure this value is less than"),
    ({"settings": {"iters": 1e9}}, "merge request: settings.iters: value is not a valid integer"),
    ({"output": "evil\u202egnp"}, "merge request: output: must not hold control or invisible formatting characters"),
    ({"output": "."}, "invalid output file name '.'"),
    ({"enabled": True}, "merge request: enabled: unknown merge request key"),
])
def test_hostile_merge_requests_get_400_and_change_nothing(host, change, detail):
    client = client_for(host, api=True)
    before = folder_state(host.lora_dir)
    payload = {"loras": ["cat_lora", "dog_lora"], "triggers": ["sks cat", "zqx dog"], "output": "merged", **change}
    response = client.post("/loraclr/v1/merge", json=payload)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]
    assert folder_state(host.lora_dir) == before


def test_composition_enabled_as_a_string_stops_the_generation(host):
    with pytest.raises(RuntimeError, match="LoRACLR composition: composition request: enabled: value is not a valid boolean"):
        host.run(host.make_txt2img(PROMPT, seed=1, steps=1, script_args=compose_args(host, enabled="false")))
    with pytest.raises(RuntimeError, match=r"LoRACLR composition: composition request: concepts.0.weight: must be a finite"):
        host.run(host.make_txt2img(PROMPT, seed=1, steps=1, script_args=compose_args(
            host, concepts=[{"lora": "cat_lora", "words": "cat", "weight": math.nan}])))


def register_embedding(name):
    """A textual-inversion embedding where each host keeps them (A1111: model_hijack; Forge: its text engine)."""
    import types

    from modules import sd_hijack, shared

    engine = getattr(shared.sd_model, "text_processing_engine", None)
    if engine is not None:
        engine.embeddings.word_embeddings[name] = object()
    else:
        sd_hijack.model_hijack.embedding_db = types.SimpleNamespace(word_embeddings={name: object()})


def test_embeddings_in_the_prompt_are_refused_and_allowed_in_the_negative(host):
    register_embedding("mystyle")
    with pytest.raises(RuntimeError, match="LoRACLR composition: prompt 'a cat and a dog in mystyle' uses the "
                                           "textual-inversion embedding 'mystyle'"):
        host.run(host.make_txt2img(PROMPT + " in mystyle", seed=1, steps=1, script_args=compose_args(host)))
    composed = host.txt2img(PROMPT, "mystyle", seed=1, steps=1, script_args=compose_args(host))
    assert len(composed.images) == 1 and "LoRACLR: " in composed.info and host.errors() == []
