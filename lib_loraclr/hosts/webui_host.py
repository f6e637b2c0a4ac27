"""The one interface the tab, the composition script and the REST API use to reach a WebUI.

A1111 and Forge differ in how they hold the model, list LoRAs, merge LoRAs into weights and
run the sampler; each has a ``WebUIHost`` subclass (``a1111.py``, ``forge.py``) and
everything in ``lib_loraclr.webui`` is written once against this class.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

from ..lora.reader import peek_lora
from ..model import ModelAccess
from ..progress import Progress

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def scan_lora_folder(folder: str) -> dict[str, str]:
    """LoRA name (file name without extension, as the WebUIs name them) -> path, recursively."""
    found: dict[str, str] = {}
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for file in sorted(files):
            if file.endswith(LORA_SUFFIXES):
                found.setdefault(os.path.splitext(file)[0], os.path.join(root, file))
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


class WebUIHost:
    """One running WebUI: its loaded model, LoRA folder and list, queue lock and sampler.

    A1111 and Forge share the ``modules.*`` parts below; each subclass says how to wrap its
    model (``model_class``), how to run CLoRA in its sampler (``compose_denoiser``,
    ``grad_context``) and how to read the checkpoint's own weights (``base_model``).
    """

    name = "WebUI"
    model_class: type[ModelAccess]
    compose_denoiser: type
    grad_context = contextlib.nullcontext

    def model(self) -> ModelAccess:
        """The loaded checkpoint behind ``ModelAccess``; raises if none is loaded."""
        from modules import shared

        if shared.sd_model is None:
            raise RuntimeError("no checkpoint is loaded; load one in the WebUI first")
        return self.model_class(shared.sd_model)

    def lora_dir(self) -> str:
        return self.command_option("lora_dir")

    def output_dir(self) -> str:
        return self.command_option("loraclr_output_dir") or self.lora_dir()

    def command_option(self, name: str):
        from modules import shared

        return getattr(shared.cmd_opts, name, None)

    def lora_files(self) -> dict[str, str]:
        """Name -> path of every LoRA the host's built-in Lora lists (a folder scan without it)."""
        networks = sys.modules.get("networks")
        if networks is not None and networks.available_networks:
            return {name: entry.filename for name, entry in sorted(networks.available_networks.items())}
        return scan_lora_folder(self.lora_dir())

    def refresh_host_loras(self) -> None:
        """Make the host rescan its LoRA folder, so a new file shows in its Lora tab."""
        networks = sys.modules.get("networks")
        if networks is not None:
            networks.list_available_networks()

    @property
    def queue_lock(self):
        """The lock generations hold; a merge holds it too, so the two never overlap."""
        from modules.call_queue import queue_lock

        return queue_lock

    @contextlib.contextmanager
    def base_model(self) -> Iterator[ModelAccess]:
        """The loaded model with the checkpoint's own weights for the duration of the block.

        Hosts that merge their LoRAs into the weights (A1111, Forge) take them out here; call
        with the queue lock held. The default is for hosts that never change the weights.
        """
        yield self.model()

    @contextlib.contextmanager
    def busy(self, job: str, progress: Progress) -> Iterator[None]:
        """Show ``job`` as the WebUI's current job for the block: ``/sdapi/v1/progress`` and the
        progress bar follow ``progress``, and the Interrupt button cancels it.

        Call with the queue lock held (no generation owns ``shared.state`` then).
        """
        from modules import shared

        state = shared.state
        state.begin(job=job)
        state.job_count, state.sampling_steps = 1, 1000

        def follow(snapshot):
            state.sampling_step = round(1000 * snapshot.fraction)
            state.textinfo = f"{job}: {snapshot.stage} {snapshot.layer}".rstrip()
            if state.interrupted or state.skipped:
                progress.cancel()

        progress.listeners.append(follow)
        try:
            yield
        finally:
            progress.listeners.remove(follow)
            state.textinfo = None  # the job is over: /sdapi/v1/progress shows no merge text
            state.end()

    def install_compose(self, p, session):
        """Run ``session`` in place of p's current sampler's CFG denoiser; returns it (``remove()``).

        The hires pass (a second sampling with a new sampler) fuses the passes but neither
        updates the latent nor imposes the masked mode's layout (``ComposeSession.engine``).
        """
        hires = bool(getattr(p, "is_hr_pass", False))
        steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else p.steps
        engine = session.engine(steps, p.cfg_scale, forms_layout=not hires, grad_context=self.grad_context)
        denoiser = self.compose_denoiser(p.sampler, session.model, session, engine)
        denoiser.install()
        return denoiser

    def embedding_names(self) -> list[str]:
        """Names of the loaded textual-inversion embeddings (CLoRA refuses them in its prompts).

        A1111 keeps them in ``sd_hijack.model_hijack.embedding_db``, Forge in each text
        processing engine of the model.
        """
        from modules import shared

        databases = [getattr(getattr(sys.modules.get("modules.sd_hijack"), "model_hijack", None), "embedding_db", None)]
        for name in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
            databases.append(getattr(getattr(shared.sd_model, name, None), "embeddings", None))
        names = set()
        for database in databases:
            names.update(getattr(database, "word_embeddings", None) or {})
        return sorted(names)

    def lora_arch(self, path: str) -> str | None:
        try:
            return peek_lora(path)["arch"] if path.endswith(".safetensors") else None
        except Exception:  # an unreadable file is reported when it is used, not while listing
            return None


class UnsupportedWebUI(RuntimeError):
    """A WebUI fork whose internals LoRACLR was not written against (Forge 1, reForge...)."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def host_kind() -> str:
    """"a1111" or "forge" (Forge 2), from the code the WebUI ships, never version strings.

    Forge 1 and reForge also ship ``modules_forge`` (reForge even reports version 2.0), but
    they run ComfyUI's ``ldm_patched`` model code; Forge 2 replaced it with ``backend``.
    """
    if not _has_module("modules_forge"):
        return "a1111"
    if _has_module("backend.diffusion_engine") and not _has_module("ldm_patched"):
        return "forge"
    fork = "reForge" if _has_module("backend") else "Forge 1"
    raise UnsupportedWebUI(
        f"LoRACLR supports AUTOMATIC1111 1.10 and Forge 2.0; this WebUI looks like {fork} "
        "(modules_forge with ldm_patched), whose model internals differ"
    )


def current_host() -> WebUIHost:
    """The host running us: Forge 2 or A1111 (``host_kind``); raises ``UnsupportedWebUI`` otherwise."""
    if host_kind() == "a1111":
        from .a1111 import A1111Host

        return A1111Host()
    from .forge import ForgeHost

    return ForgeHost()
