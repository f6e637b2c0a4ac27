"""The composition script's state across one generation's hooks, for both WebUIs.

Hook order (A1111 and Forge): ``process`` (read the request, record infotext) ->
per batch ``before_process_batch`` (take the concept LoRAs' ``<lora:>`` tags out of the
prompts, so the built-in Lora does not apply them to the whole image) -> ``process_batch``
(read LoRAs, plan, encode each pass) -> ``process_before_every_sampling`` (run CLoRA in the
sampler, again for hires) -> ``post_sample`` (take it out) -> ``postprocess_image`` /
``postprocess`` (mask overlays). Nothing stays installed between generations: the LoRA hooks
are on only inside each sampler step, the sampler hook dies with its sampler and is removed
in ``post_sample`` too.

Errors: the WebUIs report and swallow exceptions raised in script hooks, which would let the
generation go on without the composition the user asked for. So a failure is kept and
raised from the sampler's first step instead (``FailingDenoiser``), which stops the
generation with our message.

``scripts/loraclr_compose.py`` forwards each hook here, so tests drive this class directly.
"""

from __future__ import annotations

from ..compose.overlay import mask_overlay
from ..compose.session import ComposeRequest, ComposeSession, strip_lora_tags
from ..hosts.webui_denoiser import FailingDenoiser
from ..hosts.webui_host import WebUIHost
from .ui import INFOTEXT_KEY, request_from_args


class CompositionScript:
    """One txt2img script instance's composition state: request, session, sampler hook, overlays."""

    def __init__(self, host: WebUIHost):
        self.host = host
        self.request: ComposeRequest | None = None
        self.session: ComposeSession | None = None
        self.installed = None
        self.error: Exception | None = None
        self.overlays: list = []

    def process(self, p, args) -> None:
        self.release()
        self.error = None
        self.overlays = []
        try:
            self.request = request_from_args(args)
        except Exception as error:
            self.request, self.error = None, error
            return
        if self.request is not None:
            p.extra_generation_params[INFOTEXT_KEY] = self.request.to_infotext()

    def before_process_batch(self, p) -> None:
        if self.request is None:
            return
        names = [row.lora for row in self.request.concepts] + ([self.request.style] if self.request.style else [])
        p.prompts = [strip_lora_tags(prompt, names) for prompt in p.prompts]
        hr_prompts = getattr(p, "all_hr_prompts", None)
        if hr_prompts:
            p.all_hr_prompts = [strip_lora_tags(prompt, names) for prompt in hr_prompts]

    def process_batch(self, p) -> None:
        if self.request is None or self.error is not None:
            return
        self.release()
        try:
            model = self.host.model()
            model.image_size = (p.height, p.width)
            self.session = ComposeSession(model, self.request, self.host.lora_files(), p.prompts, p.negative_prompts,
                                          embeddings=self.host.embedding_names())
        except Exception as error:
            self.error = error

    def process_before_every_sampling(self, p) -> None:
        self.uninstall()
        if self.error is None and self.session is not None:
            try:
                self.installed = self.host.install_compose(p, self.session)
            except Exception as error:
                self.error = error
        if self.error is not None:
            self.installed = FailingDenoiser(p.sampler, self.error)

    def post_sample(self) -> None:
        self.uninstall()

    def postprocess_image(self, p, pp) -> None:
        if self.session is None or not self.request.show_masks or self.session.last_masks is None:
            return
        index = getattr(p, "batch_index", 0)
        masks = self.session.last_masks[:, index]  # (P, 1, h, w)
        self.overlays.append(mask_overlay(pp.image, masks, self.session.names))

    def postprocess(self, processed) -> None:
        """Append the mask overlays after the generated images, each with the first infotext."""
        if self.overlays:
            processed.images.extend(self.overlays)
            processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(self.overlays))
        self.overlays = []
        self.release()

    def uninstall(self) -> None:
        if self.installed is not None:
            self.installed.remove()
            self.installed = None

    def release(self) -> None:
        self.uninstall()
        if self.session is not None:
            self.session.close()
            self.session = None
