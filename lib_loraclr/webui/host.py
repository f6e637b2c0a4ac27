"""The one interface the tab, the composition script and the REST API use to reach a WebUI.

A1111 and Forge differ in how they hold the model, list LoRAs, merge LoRAs into weights and
run the sampler; each has a ``WebUIHost`` subclass in ``lib_loraclr.hosts`` and everything
else is written once against this class.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..lora.reader import peek_lora
from ..model import ModelAccess

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def scan_lora_folder(folder: str) -> dict[str, str]:
    """LoRA name (file name without extension, as the WebUIs name them) -> path, recursively."""
    found: dict[str, str] = {}
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for file in sorted(files):
            if file.endswith(LORA_SUFFIXES):
                found.setdefault(os.path.splitext(file)[0], os.path.join(root, file))
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


class WebUIHost(ABC):
    """One running WebUI: its loaded model, LoRA folder and list, queue lock and sampler."""

    name: str = "WebUI"

    @abstractmethod
    def model(self) -> ModelAccess:
        """The loaded checkpoint behind ``ModelAccess``; raises if none is loaded."""

    @abstractmethod
    def lora_dir(self) -> str: ...

    @abstractmethod
    def lora_files(self) -> dict[str, str]:
        """Name -> path of every LoRA the host lists."""

    @abstractmethod
    def refresh_host_loras(self) -> None:
        """Make the host rescan its LoRA folder, so a new file shows in its Lora tab."""

    @property
    @abstractmethod
    def queue_lock(self):
        """The lock generations hold; a merge holds it too, so the two never overlap."""

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[None]:
        """The checkpoint's own weights while the block runs (hosts that merge LoRAs in place undo it)."""
        yield

    def output_dir(self) -> str:
        return self.command_option("loraclr_output_dir") or self.lora_dir()

    def command_option(self, name: str):
        from modules import shared

        return getattr(shared.cmd_opts, name, None)

    def lora_arch(self, path: str) -> str | None:
        try:
            return peek_lora(path)["arch"] if path.endswith(".safetensors") else None
        except Exception:  # an unreadable file is reported when it is used, not while listing
            return None


def current_host() -> WebUIHost:
    """Forge if its backend is importable, else A1111 (never by version strings or git tags)."""
    try:
        import modules_forge  # noqa: F401
    except ImportError:
        from ..hosts.a1111 import A1111Host

        return A1111Host()
    from ..hosts.forge import ForgeHost

    return ForgeHost()
