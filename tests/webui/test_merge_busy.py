"""A merge tells the WebUI it is busy: ``shared.state`` names the job and follows its progress
(what ``/sdapi/v1/progress`` and the progress bar read), and the Interrupt button cancels it."""
import os
import threading

import numpy as np

from test_extension import host, pixels, webui  # noqa: F401  (host and webui are fixtures)


def test_merge_shows_as_the_webui_job_and_interrupt_cancels_it(host, monkeypatch):
    import lib_loraclr.webui.merge_service as merge_service
    from lib_loraclr.hosts.webui_host import current_host
    from modules import shared

    reached, resume, seen = threading.Event(), threading.Event(), {}
    original = merge_service.merge_to_file

    def paused_merge(model, concepts, settings, out_path, progress, **kwargs):
        def pause(snapshot):
            if snapshot.stage == "sampling" and not reached.is_set():
                seen.update(job=shared.state.job, step=shared.state.sampling_step, steps=shared.state.sampling_steps,
                            text=shared.state.textinfo, count=shared.state.job_count)
                reached.set()
                resume.wait(60)

        progress.listeners.insert(0, pause)  # before the host's listener reads the Interrupt flag
        return original(model, concepts, settings, out_path, progress=progress, **kwargs)

    monkeypatch.setattr(merge_service, "merge_to_file", paused_merge)
    service = merge_service.MergeService(current_host())
    before = host.txt2img("a cat", seed=1, steps=1)
    job = service.start(merge_service.MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "busy",
                                                   settings={"capture_steps": 2, "capture_size": 64}))
    assert reached.wait(120), service.status(job)
    assert seen["job"] == "LoRACLR merge" and seen["count"] == 1 and seen["steps"] == 1000
    assert 0 < seen["step"] < 1000 and seen["text"].startswith("LoRACLR merge: ")
    assert not host.shared.state.interrupted
    shared.state.interrupt()  # the Interrupt button
    resume.set()
    status = service.jobs.wait(job, 120)
    assert status.state == "cancelled", status
    assert [name for name in os.listdir(host.lora_dir) if name.startswith("busy")] == []
    assert shared.state.job == "" and shared.state.job_count == 0 and shared.state.textinfo is None
    after = host.txt2img("a cat", seed=1, steps=1)  # the queue lock is free and generation is unchanged
    assert np.array_equal(pixels(before), pixels(after))


def test_a_merge_before_any_generation_loads_forges_lazy_model(tmp_path):
    """Real Forge starts with ``shared.sd_model`` a ``FakeInitialModel`` and loads the checkpoint at
    the first generation; a merge started first must load it the same way, not fail on it."""
    from conftest import _started
    from webui_harness.forge_host import ForgeHost

    for host in _started(ForgeHost(str(tmp_path / "forge"), lazy_model=True)):
        from lib_loraclr.hosts.webui_host import current_host
        from lib_loraclr.lora.writer import write_kohya_lora, write_sidecar
        from lib_loraclr.webui.merge_service import MergeRequest, MergeService
        from modules import sd_models, shared

        assert isinstance(shared.sd_model, sd_models.FakeInitialModel)
        model = current_host().model()  # loads it, as a generation would
        assert model.arch == "sd1" and not isinstance(shared.sd_model, sd_models.FakeInitialModel)
        from test_extension import attention_deltas

        for seed, name in ((1, "cat_lora"), (2, "dog_lora")):
            path = os.path.join(host.lora_dir, f"{name}.safetensors")
            write_kohya_lora(path, attention_deltas(model, seed), model.arch, rank=4)
            write_sidecar(path, name, arch=model.arch)
        sd_models.model_data.set_sd_model(sd_models.FakeInitialModel())  # as at start-up
        sd_models.model_data.forge_hash = ""
        host.refresh_loras()
        service = MergeService(current_host())
        job = service.start(MergeRequest(["cat_lora", "dog_lora"], ["sks cat", "zqx dog"], "lazy",
                                         settings={"capture_steps": 1, "capture_size": 64, "report": False}))
        status = service.jobs.wait(job, 120)
        assert status.state == "done", status.error
        assert os.path.isfile(os.path.join(host.lora_dir, "lazy.safetensors"))
