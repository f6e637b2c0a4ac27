"""The host-neutral WebUI pieces on the tiny diffusers model: requests, sessions, the merge service.

The WebUI hosts' own adapters are tested with the contract harness in ``tests/webui``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import pytest
import torch

from lib_loraclr.compose.session import ComposeRequest, ComposeSession, ConceptRow, strip_lora_tags
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.lora.reader import peek_lora, read_lora
from lib_loraclr.lora.writer import write_kohya_lora, write_sidecar
from lib_loraclr.runtime import LoraRuntime
from lib_loraclr.hosts.webui_host import WebUIHost, scan_lora_folder
from lib_loraclr.webui.merge_service import MergeRequest, MergeService, report_path_for
from lib_loraclr.webui.ui import MAX_CONCEPT_ROWS, merge_request_from_ui, request_from_args
from lib_loraclr.validation import InputError

from test_compose_engine import attention_deltas

QUICK_MERGE = {"capture_steps": 2, "capture_size": 64}


class DiffusersHost(WebUIHost):
    """A WebUI host over the tiny diffusers model: the merge service's contract, without a WebUI."""

    name = "test"

    def __init__(self, model, folder):
        self._model = model
        self.folder = str(folder)
        self.refreshed = 0
        self._lock = threading.Lock()

    def model(self):
        return self._model

    def lora_dir(self):
        return self.folder

    def output_dir(self):
        return self.folder

    def lora_files(self):
        return scan_lora_folder(self.folder)

    def refresh_host_loras(self):
        self.refreshed += 1

    @property
    def queue_lock(self):
        return self._lock

    def busy(self, job, progress):
        return contextlib.nullcontext()  # no shared.state outside a WebUI (tested in tests/webui)


@pytest.fixture()
def lora_folder(tiny_sd1, tmp_path):
    for seed, name, trigger in ((1, "cat_lora", "sks cat"), (2, "dog_lora", "zqx dog")):
        path = str(tmp_path / f"{name}.safetensors")
        write_kohya_lora(path, attention_deltas(tiny_sd1, seed), "sd1", rank=4)
        write_sidecar(path, trigger, arch="sd1")
    return tmp_path


def test_compose_request_round_trips_through_infotext_and_api_form():
    request = ComposeRequest(
        (ConceptRow("cat_lora", "cat", "sks", 0.8), ConceptRow("dog_lora", "dog")),
        style="ink", style_on="cat", settings=ComposeSettings(step_size=10.0, use_masks=False), show_masks=True,
    )
    assert ComposeRequest.from_infotext(request.to_infotext()) == request
    assert ComposeRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert request.style_groups() == [0]
    with pytest.raises(ValueError, match="unknown key"):
        ComposeRequest.from_dict({**request.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown setting"):
        ComposeRequest.from_dict({**request.to_dict(), "settings": {"guidance_scale": 3}})
    with pytest.raises(ValueError, match="only once"):
        ComposeRequest((ConceptRow("a", "cat"), ConceptRow("a", "dog")))
    with pytest.raises(ValueError, match="needs both"):
        ComposeRequest((ConceptRow("a", " "),))
    with pytest.raises(ValueError, match="not subjects"):
        ComposeRequest((ConceptRow("a", "cat"),), style="s", style_on="horse").style_groups()


def test_script_arguments_from_the_ui_and_from_the_api():
    defaults = ComposeSettings()
    rows = ["cat_lora", "cat", "sks", 0.5, "dog_lora", "dog", "", 1.0] + ["", "", "", 1.0] * (MAX_CONCEPT_ROWS - 2)
    settings = ["masked", defaults.step_size, defaults.temperature, 12, 3, 0.4, 16, True, False, False, 2, 5]
    args = [True, *rows, "", "", 1.0, *settings, True]
    request = request_from_args(args)
    assert [r.lora for r in request.concepts] == ["cat_lora", "dog_lora"]
    assert request.concepts[0] == ConceptRow("cat_lora", "cat", "sks", 0.5)
    assert request.settings.max_iter_to_alter == 12 and request.settings.attention_res_divisor == 16
    assert request.settings.use_masks is False and request.show_masks is True
    assert request.settings.method == "masked" and request.settings.exclusive_masks is False
    assert request.settings.warmup_steps == 2 and request.settings.layout_steps == 5
    assert request_from_args([False, *args[1:]]) is None
    api = request_from_args([{"enabled": True, **request.to_dict()}])
    assert api == request
    assert request_from_args([{"enabled": False}]) is None
    assert request_from_args([]) is None


def test_lora_tags_of_the_concepts_are_stripped_and_others_kept():
    prompt = "a <lora:cat_lora:0.8> cat and a dog <lora:dog_lora> <lora:style:1> <lora:cat_lora_v2:1>"
    assert strip_lora_tags(prompt, ["cat_lora", "dog_lora"]) == "a  cat and a dog  <lora:style:1> <lora:cat_lora_v2:1>"
    assert strip_lora_tags(prompt, []) == prompt


def test_peek_reads_arch_and_triggers_from_the_header(lora_folder):
    for path in scan_lora_folder(str(lora_folder)).values():
        peeked, full = peek_lora(path), read_lora(path)
        assert peeked["arch"] == full.arch == "sd1"
        assert peeked["triggers"] == full.triggers


def test_runtime_hooks_only_while_attached(tiny_sd1, lora_folder):
    lora = read_lora(str(lora_folder / "cat_lora.safetensors"))
    runtime = LoraRuntime(tiny_sd1.targets(), [lora], attach=False)
    hooked = [tiny_sd1.targets()[t] for t in runtime.targets]
    assert not any(m._forward_hooks for m in hooked)
    with runtime.attached():
        assert all(m._forward_hooks for m in hooked)
    assert not any(m._forward_hooks for m in hooked)
    with pytest.raises(RuntimeError), runtime.attached():
        raise RuntimeError("generation failed")
    assert not any(m._forward_hooks for m in hooked)


def test_session_encodes_per_pass_and_leaves_no_hooks(tiny_sd1, lora_folder):
    files = scan_lora_folder(str(lora_folder))
    request = ComposeRequest((ConceptRow("cat_lora", "cat", "sks"), ConceptRow("dog_lora", "dog", "zqx")),
                             settings=ComposeSettings(method="clora", attention_res_divisor=16, refinement_iters=1))
    session = ComposeSession(tiny_sd1, request, files, ["a cat and a dog"] * 2, ["ugly"] * 2)
    assert session.conditioning.num_passes == 3 and session.conditioning.batch_size == 2
    assert not any(m._forward_hooks for m in tiny_sd1.targets().values())
    engine = session.engine(10, 7.0)
    assert engine.settings.guidance_scale == 7.0
    assert session.engine(10, 7.0, forms_layout=False).updates_at(0) == 0
    assert session.engine(10, 7.0).settings.layout_steps == 8  # the hires pass (below) lays nothing out
    assert session.engine(10, 7.0, forms_layout=False).settings.layout_steps == 0
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with session.runtime.attached():
        result = engine.step(0, latent, torch.tensor(500), session.conditioning, tiny_sd1.unet_eps)
    assert result.prediction.shape == latent.shape and torch.isfinite(result.prediction).all()
    assert not any(m._forward_hooks for m in tiny_sd1.targets().values())
    session.close()

    with pytest.raises(ValueError, match="same prompt"):
        ComposeSession(tiny_sd1, request, files, ["a cat and a dog", "a dog and a cat"], ["", ""])
    with pytest.raises(FileNotFoundError, match="not found"):
        ComposeSession(tiny_sd1, ComposeRequest((ConceptRow("horse_lora", "cat"),)), files, ["a cat"], [""])
    with pytest.raises(ValueError, match="not found in prompt"):
        ComposeSession(tiny_sd1, request, files, ["a cat and a bird"], [""])


def _wait(service, job_id, timeout=300):
    status = service.jobs.wait(job_id, timeout)
    assert status.state != "running", "merge did not finish in time"
    return status


def test_merge_service_writes_lora_sidecar_and_report_and_refreshes(tiny_sd1, lora_folder):
    host = DiffusersHost(tiny_sd1, lora_folder)
    service = MergeService(host)
    request = MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "merged",
                           settings={"method": "sum", **QUICK_MERGE})
    status = _wait(service, service.start(request))
    assert status.state == "done", status.error
    out = str(lora_folder / "merged.safetensors")
    assert status.result["output"] == out and status.result["name"] == "merged"
    assert os.path.isfile(out) and os.path.isfile(str(lora_folder / "merged.json"))
    report = json.load(open(report_path_for(out)))
    assert set(report["quality"]) == {"sum"}
    assert host.refreshed == 1
    assert "merged" in host.lora_files()
    assert read_lora(out).arch == "sd1"


def test_merge_service_refuses_bad_input_and_writes_nothing(tiny_sd1, lora_folder):
    service = MergeService(DiffusersHost(tiny_sd1, lora_folder))
    before = sorted(os.listdir(lora_folder))
    pair = ["cat_lora", "dog_lora"]
    bad = [
        ((["cat_lora"], ["sks"], "one"), {}, "at least two"),
        ((pair, ["sks", "zqx"], "../escape"), {}, "invalid output file name"),
        ((pair, ["sks", "zqx"], "sub/dir"), {}, "invalid output file name"),
        ((pair, ["sks", "zqx"], "cat_lora"), {}, "already exists"),
        ((pair, ["sks", "zqx"], "cat_lora"), {"overwrite": True}, "one of the inputs"),
        ((["cat_lora", "horse_lora"], ["sks", "zqx"], "x"), {}, "horse_lora"),
        ((pair, ["sks", "sks"], "x"), {}, "own trigger"),
        ((pair, ["sks", "zqx"], "x"), {"settings": {"method": "magic"}}, "settings.method"),
        ((pair, ["sks", "zqx"], "x"), {"settings": {"speed": 1}}, "unknown merge setting"),
    ]
    for args, options, message in bad:
        with pytest.raises((ValueError, OSError, KeyError), match=message):
            service.start(MergeRequest(*args, **options))
    with pytest.raises(ValueError, match="unknown merge request key"):
        MergeRequest.from_dict({"loras": [], "triggers": [], "output": "x", "color": 1})
    assert sorted(os.listdir(lora_folder)) == before
    assert not service.jobs.jobs


def test_merge_waits_for_the_queue_lock_and_cancel_writes_nothing(tiny_sd1, lora_folder):
    host = DiffusersHost(tiny_sd1, lora_folder)
    service = MergeService(host)
    request = MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "waiting", settings=QUICK_MERGE)
    with host.queue_lock:  # a generation is running
        job_id = service.start(request)
        time.sleep(0.3)
        status = service.status(job_id)
        assert status.state == "running" and status.stage == "queued"
        assert "waiting for the model to be free" in status.log
        service.cancel(job_id)
    status = _wait(service, job_id)
    assert status.state == "cancelled"
    assert not os.path.exists(lora_folder / "waiting.safetensors")
    assert not os.path.exists(report_path_for(str(lora_folder / "waiting.safetensors")))


def test_tab_values_become_a_merge_request():
    advanced = {"margin": 0.7, "solver": "reference", "iters": 5.0, "capture_size": 0, "clamp_quantile": 0, "seed": 3.0,
                "max_memory_gb": 0, "report": False}
    request = merge_request_from_ui(
        [["cat_lora", "sks", 1], ["dog_lora", "zqx", ""], ["", "", ""]], "lsq", "out", 0, True, advanced
    )
    assert request.loras == ["cat_lora", "dog_lora"] and request.weights == [1.0, 1.0]
    settings = request.merge_settings()
    assert settings.method == "lsq" and settings.rank is None and settings.capture_size is None
    assert settings.clamp_quantile is None and settings.iters == 5 and settings.margin == 0.7 and request.overwrite
    assert settings.max_memory_gb is None and settings.report is False
    budgeted = merge_request_from_ui([["a", "x", 1], ["b", "y", 1]], "loraclr", "out", 0, False,
                                     {"max_memory_gb": 2.5, "report": True}).merge_settings()
    assert budgeted.max_memory_gb == 2.5 and budgeted.report is True
    distilled = merge_request_from_ui([["a", "x", 1], ["b", "y", 1]], "distill", "out", 0, False,
                                      {"prompt_template": "a drawing of {}", "distill_iters": 300.0,
                                       "distill_lr": 0.02, "distill_pair_weight": 0.5, "guidance_scale": 7}).merge_settings()
    assert distilled.method == "distill" and distilled.prompt_template == "a drawing of {}"
    assert distilled.distill_iters == 300 and isinstance(distilled.distill_iters, int) and distilled.guidance_scale == 7.0
    assert distilled.distill_pair_weight == 0.5
    with pytest.raises(InputError, match="merge request: settings.prompt_template: must hold {} exactly once"):
        merge_request_from_ui([["a", "x", 1], ["b", "y", 1]], "distill", "out", 0, False, {"prompt_template": "a cat"})


@pytest.mark.parametrize("present, expected", [
    (set(), "a1111"),  # no modules_forge
    ({"modules_forge", "backend", "backend.diffusion_engine"}, "forge"),  # Forge 2: backend, no ldm_patched
    ({"modules_forge", "ldm_patched"}, "Forge 1"),
    ({"modules_forge", "ldm_patched", "backend", "backend.diffusion_engine"}, "reForge"),
])
def test_host_kind_tells_forge_2_from_forge_1_and_reforge_by_the_code_they_ship(monkeypatch, capsys, present, expected):
    from lib_loraclr.hosts import webui_host
    from lib_loraclr.webui import supported_host

    monkeypatch.setattr(webui_host, "_has_module", lambda name: name in present)
    if expected in ("a1111", "forge"):
        assert webui_host.host_kind() == expected
        assert type(supported_host()).__name__ == {"a1111": "A1111Host", "forge": "ForgeHost"}[expected]
        return
    with pytest.raises(webui_host.UnsupportedWebUI, match=f"looks like {expected}"):
        webui_host.host_kind()
    assert supported_host() is None
    assert f"[LoRACLR] LoRACLR supports AUTOMATIC1111 1.10 and Forge 2.0; this WebUI looks like {expected}" in capsys.readouterr().out


class _Processing:
    """The parts of a WebUI ``StableDiffusionProcessing`` the composition script reads."""

    def __init__(self):
        self.extra_generation_params = {}
        self.prompts = ["a cat <lora:cat_lora:1> and a dog <lora:other:0.5>"]
        self.negative_prompts = [""]
        self.height = self.width = 64
        self.sampler = type("Sampler", (), {"model_wrap_cfg": type("Denoiser", (), {})()})()


def test_composition_script_defers_a_bad_request_to_the_first_sampler_step(tmp_path):
    """A failure in a hook is kept and raised when sampling starts (the WebUIs swallow hook
    exceptions), the concept's <lora:> tag leaves the prompt, other tags stay, nothing is
    left installed afterwards."""
    from lib_loraclr.webui.compose_script import CompositionScript

    class Host:
        def model(self):
            raise RuntimeError("no checkpoint is loaded")

        def lora_files(self):
            return {}

    script = CompositionScript(Host())
    p = _Processing()
    request = {"enabled": True, "concepts": [{"lora": "cat_lora", "words": "cat"}, {"lora": "dog_lora", "words": "dog"}]}
    script.process(p, [request])
    assert p.extra_generation_params["LoRACLR"].startswith("{")
    script.before_process_batch(p)
    assert p.prompts == ["a cat  and a dog <lora:other:0.5>"]
    script.process_batch(p)
    assert isinstance(script.error, RuntimeError) and script.session is None
    script.process_before_every_sampling(p)
    with pytest.raises(RuntimeError, match="LoRACLR composition: no checkpoint is loaded"):
        p.sampler.model_wrap_cfg.forward()
    script.post_sample()
    assert "forward" not in vars(p.sampler.model_wrap_cfg) and script.installed is None

    script.process(p, [{"enabled": True, "concepts": [{"lora": "cat_lora", "words": "cat", "weight": "x"}]}])
    assert script.request is None and "concepts" in str(script.error)
    script.process(p, [{"enabled": False}])  # the next generation starts clean
    assert script.request is None and script.error is None
    script.process_before_every_sampling(p)
    assert script.installed is None and "forward" not in vars(p.sampler.model_wrap_cfg)


def test_report_rows_put_the_end_to_end_figure_beside_each_method():
    from lib_loraclr.webui.ui import REPORT_HEADERS, report_rows

    figures = {"retention": 0.81234, "crosstalk": 0.2, "error": None}
    summary = {"method": "loraclr", "quality": {m: {"fox": {"overall": figures}} for m in ("loraclr", "sum")},
               "end_to_end": {"merged": {"fox": 0.41234}, "stacked": {"fox": -0.05}}}
    assert REPORT_HEADERS[-1] == "End to end"
    assert report_rows(summary) == [["fox", "loraclr", 0.812, 0.2, None, 0.412], ["fox", "sum", 0.812, 0.2, None, -0.05]]
    assert report_rows({**summary, "end_to_end": None})[0][-1] is None  # report off or older summaries
