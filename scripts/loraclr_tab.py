"""WebUI entry point: the "LoRACLR Merge" tab, its settings section and the REST API."""

from modules import script_callbacks, shared

from lib_loraclr.merge.objective import METHODS
from lib_loraclr.webui.api import register_api
from lib_loraclr.webui import supported_host
from lib_loraclr.webui.merge_service import MergeService
from lib_loraclr.webui.ui import build_merge_tab

SECTION = ("loraclr", "LoRACLR")
_service = None


def service() -> MergeService:
    global _service
    if _service is None:
        _service = MergeService(supported_host())
    return _service


def on_ui_settings():
    import gradio as gr

    shared.opts.add_option("loraclr_default_method", shared.OptionInfo(
        "loraclr", "Default merge method", gr.Radio, {"choices": list(METHODS)}, section=SECTION,
    ))
    shared.opts.add_option("loraclr_show_all_archs", shared.OptionInfo(
        False, "Merge tab: list LoRAs of every architecture, not only the loaded model's", section=SECTION,
    ))


def on_ui_tabs():
    tab = build_merge_tab(
        service(),
        method=shared.opts.data.get("loraclr_default_method", "loraclr"),
        show_all_archs=bool(shared.opts.data.get("loraclr_show_all_archs", False)),
    )
    return [(tab, "LoRACLR Merge", "loraclr_merge")]


def on_app_started(_demo, app):
    register_api(app, service())


if supported_host() is not None:
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
