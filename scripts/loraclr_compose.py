"""WebUI entry point: "LoRACLR composition" in txt2img (an AlwaysOn script).

Every hook forwards to ``lib_loraclr.webui.compose_script.CompositionScript``, which holds
the state machine (hook order, deferred errors, overlays, infotext).
"""

import modules.scripts as scripts

from lib_loraclr.webui.compose_script import CompositionScript
from lib_loraclr.webui import supported_host
from lib_loraclr.webui.ui import build_compose_ui


class LoraclrCompose(scripts.Script):
    def __init__(self):
        super().__init__()
        self.host = supported_host()
        self.state = CompositionScript(self.host) if self.host is not None else None

    def title(self):
        return "LoRACLR composition"

    def show(self, is_img2img):
        return False if is_img2img or self.host is None else scripts.AlwaysVisible

    def ui(self, is_img2img):
        built = build_compose_ui(self.host, "img2img" if is_img2img else "txt2img")
        self.infotext_fields = built.infotext_fields
        return built.components

    def process(self, p, *args):
        self.state.process(p, args)

    def before_process_batch(self, p, *args, **kwargs):
        self.state.before_process_batch(p)

    def process_batch(self, p, *args, **kwargs):
        self.state.process_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.state.process_before_every_sampling(p)

    def post_sample(self, p, ps, *args):
        self.state.post_sample()

    def postprocess_image(self, p, pp, *args):
        self.state.postprocess_image(p, pp)

    def postprocess(self, p, processed, *args):
        self.state.postprocess(processed)
