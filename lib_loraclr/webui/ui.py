"""Gradio UI of the "LoRACLR Merge" tab and of the txt2img composition script.

Written against what gradio 3.41 (A1111) and 4.40 (Forge) share: Blocks, Dropdown,
Dataframe(type="array"), ``gr.update``, ``gr.Progress`` and generator events. Host calls go
through ``WebUIHost``; merges through ``MergeService``.
"""

from __future__ import annotations

import dataclasses
import html
import time

from ..compose.session import MAX_SUBJECTS as MAX_CONCEPT_ROWS  # composition rows in the txt2img script
from ..compose.session import USER_SETTINGS, ComposeRequest
from ..compose.settings import METHODS as COMPOSE_METHODS
from ..compose.settings import ComposeSettings
from ..lora.reader import peek_lora
from ..merge.objective import METHODS, SOLVERS, MergeSettings
from ..validation import InputError
from ..hosts.webui_host import WebUIHost
from .merge_service import MergeRequest, MergeService

INFOTEXT_KEY = "LoRACLR"
POLL_SECONDS = 0.5
CONCEPT_HEADERS = ["LoRA", "Trigger words", "Weight"]
REPORT_HEADERS = ["Concept", "Method", "Retention", "Crosstalk", "Error", "End to end"]

# Advanced merge settings shown in the tab: (field, label, kind).
MERGE_FIELDS = (
    ("margin", "Contrastive margin", "number"),
    ("lambda_con", "λ contrastive", "number"),
    ("lambda_mse", "λ MSE", "number"),
    ("lambda_reg", "λ regulariser", "number"),
    ("solver", "Solver", "solver"),
    ("iters", "Iterations (reference solver)", "int"),
    ("lr", "Learning rate (reference solver)", "number"),
    ("capture_steps", "Sampling steps for stage-3 features", "int"),
    ("capture_size", "Capture image size (0 = model's native)", "int"),
    ("energy", "Energy kept when rank is automatic", "number"),
    ("max_rank", "Maximum rank", "int"),
    ("clamp_quantile", "Clamp quantile (0 = off)", "number"),
    ("seed", "Seed", "int"),
    ("prompt_template", "Concept prompt ({} = trigger words)", "text"),
    ("distill_iters", "Training steps (distill)", "int"),
    ("distill_lr", "Learning rate (distill)", "number"),
    ("distill_batch", "Batch per step (distill)", "int"),
    ("distill_trajectories", "Teacher images per concept (distill)", "int"),
    ("distill_pair_trajectories", "Composed teacher images per concept pair (distill; 0 = none)", "int"),
    ("distill_pair_weight", "Loss weight of the composed pair images (distill)", "number"),
    ("guidance_scale", "Guidance of the teacher images (distill)", "number"),
    ("max_memory_gb", "Memory budget in GiB (0 = automatic)", "number"),
    ("report", "Measure the quality report (one more capture pass)", "bool"),
    ("end_to_end", "Measure the end-to-end figure (3 UNet passes per concept)", "bool"),
)
OPTIONAL_NUMBERS = ("capture_size", "clamp_quantile", "max_memory_gb")  # 0 in the tab = None (automatic / off)


def visible_loras(host: WebUIHost, search: str, all_archs: bool) -> list[str]:
    """The host's LoRA names matching ``search``, hiding other architectures unless asked."""
    arch = None
    if not all_archs:
        try:
            arch = host.model().arch
        except Exception:  # no model loaded: show everything
            arch = None
    needle = search.strip().lower()
    names = []
    for name, path in host.lora_files().items():
        if needle and needle not in name.lower():
            continue
        if arch is not None:
            lora_arch = host.lora_arch(path)
            if lora_arch is not None and lora_arch != arch:
                continue
        names.append(name)
    return names


def concept_rows(host: WebUIHost, names: list[str], current: list[list]) -> list[list]:
    """Table rows for the picked LoRAs: edited triggers/weights kept, new rows pre-filled."""
    kept = {row[0]: row for row in current or [] if row and row[0]}
    files = host.lora_files()
    rows = []
    for name in names or []:
        if name in kept:
            rows.append(list(kept[name]))
            continue
        triggers = []
        try:
            triggers = peek_lora(files[name])["triggers"] if files.get(name, "").endswith(".safetensors") else []
        except Exception:
            triggers = []
        rows.append([name, ", ".join(triggers[:1]), 1.0])
    return rows


def _gradio_number(value, kind: str):
    """A gradio Number's value as the field's type: integral floats -> int for int fields, so the
    request's own check (not a silent ``int()``) refuses 1.5 iterations."""
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def merge_request_from_ui(rows, method, output, rank, overwrite, advanced: dict) -> MergeRequest:
    """The tab's widget values -> the request the REST API also takes (checked by ``MergeRequest``).

    0 in the optional number fields (rank, capture size, clamp quantile, memory) means "off".
    """
    rows = [row for row in rows or [] if row and str(row[0]).strip()]
    kinds = {name: kind for name, _label, kind in MERGE_FIELDS}
    settings = {"method": method, "rank": _gradio_number(rank, "int") or None}
    for name, value in advanced.items():
        value = value if kinds[name] == "text" else _gradio_number(value, kinds[name])
        settings[name] = (value or None) if name in OPTIONAL_NUMBERS else value
    return MergeRequest(
        loras=[str(row[0]) for row in rows],
        triggers=[str(row[1] or "") for row in rows],
        weights=[_table_number(row[2]) for row in rows],
        output=str(output or ""),
        settings=settings,
        overwrite=overwrite,
    )


def _table_number(cell):
    """A weight cell of the concepts table (gradio gives numbers, or strings when typed in); empty = 1."""
    if isinstance(cell, str):
        if not cell.strip():
            return 1.0
        try:
            return float(cell)
        except ValueError:
            raise ValueError(f"weight {cell!r} is not a number") from None
    return 1.0 if cell is None else cell


def report_rows(summary: dict) -> list[list]:
    """One row per concept and method: overall retention / crosstalk / error, and the end-to-end
    figure (the written file's; on the "sum" row, plain stacking's)."""
    end_to_end = summary.get("end_to_end") or {}
    rows = []
    for method, per_concept in (summary.get("quality") or {}).items():
        whole = end_to_end.get("merged" if method == summary.get("method") else "stacked", {})
        for concept, groups in per_concept.items():
            overall = groups.get("overall", {})
            figures = [overall.get(k) for k in ("retention", "crosstalk", "error")] + [whole.get(concept)]
            rows.append([concept, method] + [None if value is None else round(value, 3) for value in figures])
    return rows


def status_html(status) -> str:
    if status is None:
        return "<p>No merge has run yet.</p>"
    text = f"<b>{html.escape(status.state)}</b> · {html.escape(status.stage)}"
    if status.layer:
        text += f" · {html.escape(status.layer)}"
    text += f" · {status.percent:.0f}%"
    if status.error:
        text += f"<br><span class='loraclr-error'>{html.escape(status.error)}</span>"
    elif status.state == "done" and status.result:
        text += f"<br>Wrote <code>{html.escape(status.result['output'])}</code>; it is in the Lora tab as <b>{html.escape(status.result['name'])}</b>."
        # javascript/loraclr.js refreshes the Lora tabs once per finished job
        return f"<div class='loraclr-status' data-loraclr-done='{html.escape(status.id)}'>{text}</div>"
    return f"<div class='loraclr-status'>{text}</div>"


def error_html(error: Exception) -> str:
    return f"<div class='loraclr-status'><span class='loraclr-error'>{html.escape(str(error))}</span></div>"


def build_merge_tab(service: MergeService, *, method: str = "loraclr", show_all_archs: bool = False):
    """The "LoRACLR Merge" tab as a gr.Blocks; method / show_all_archs: the user's defaults from Settings."""
    import gradio as gr

    host = service.host
    defaults = MergeSettings()
    with gr.Blocks(analytics_enabled=False) as tab:
        job_id = gr.State("")
        gr.Markdown(
            "Merge concept LoRAs into one with LoRACLR: each concept keeps its own outputs and stays apart from the others. "
            "The merge runs on the loaded checkpoint; generations wait while it runs."
        )
        with gr.Row():
            search = gr.Textbox(label="Search LoRAs", placeholder="filter by name", elem_id="loraclr_search")
            all_archs = gr.Checkbox(label="Show LoRAs of other architectures", value=show_all_archs)
            refresh = gr.Button("Refresh list", elem_id="loraclr_refresh")
        picked = gr.Dropdown(label="LoRAs to merge", choices=visible_loras(host, "", show_all_archs), multiselect=True,
                             elem_id="loraclr_picked")
        table = gr.Dataframe(
            headers=CONCEPT_HEADERS, datatype=["str", "str", "number"], type="array",
            label="Concepts (edit the trigger words: each LoRA needs its own)", interactive=True,
            col_count=(3, "fixed"), elem_id="loraclr_concepts",
        )
        with gr.Row():
            method = gr.Radio(label="Method", choices=list(METHODS), value=method if method in METHODS else defaults.method)
            output = gr.Textbox(label="Output name (written to the Lora folder)", placeholder="my_merge", elem_id="loraclr_output")
            rank = gr.Number(label="Rank (0 = automatic)", value=0, precision=0)
            overwrite = gr.Checkbox(label="Overwrite an existing file", value=False)
        advanced = {}
        with gr.Accordion("Advanced (paper defaults)", open=False):
            with gr.Row():
                for name, label, kind in MERGE_FIELDS:
                    value = getattr(defaults, name)
                    if kind == "solver":
                        advanced[name] = gr.Radio(label=label, choices=list(SOLVERS), value=value)
                    elif kind == "bool":
                        advanced[name] = gr.Checkbox(label=label, value=value)
                    elif kind == "text":
                        advanced[name] = gr.Textbox(label=label, value=value)
                    else:
                        advanced[name] = gr.Number(
                            label=label, value=value or 0, precision=0 if kind == "int" else None
                        )
        with gr.Row():
            start = gr.Button("Start merge", variant="primary", elem_id="loraclr_start")
            cancel = gr.Button("Cancel", elem_id="loraclr_cancel")
        status = gr.HTML(status_html(service.latest()), elem_id="loraclr_status")
        report = gr.Dataframe(
            headers=REPORT_HEADERS, type="array",
            label="Quality report (retention near 1 and low crosstalk are good)", interactive=False,
            elem_id="loraclr_report",
        )
        log = gr.Textbox(label="Log", lines=6, interactive=False, elem_id="loraclr_log")

        def list_update(text, everything):
            return gr.update(choices=visible_loras(host, text, everything))

        def on_refresh(text, everything):
            host.refresh_host_loras()
            return list_update(text, everything)

        search.change(list_update, [search, all_archs], [picked])
        all_archs.change(list_update, [search, all_archs], [picked])
        refresh.click(on_refresh, [search, all_archs], [picked])
        tab.load(list_update, [search, all_archs], [picked])
        tab.load(lambda: status_html(service.latest()), [], [status])  # a reloaded page shows the running job
        # a dict keeps the headers: gradio 3.41 numbers the columns of a bare list
        picked.change(lambda names, rows: {"headers": CONCEPT_HEADERS, "data": concept_rows(host, names, rows)},
                      [picked, table], [table])

        advanced_names = list(advanced)

        def on_start(rows, method_value, output_value, rank_value, overwrite_value, *values, progress=gr.Progress()):
            try:
                request = merge_request_from_ui(
                    rows, method_value, output_value, rank_value, overwrite_value, dict(zip(advanced_names, values))
                )
                new_id = service.start(request)
            except Exception as error:
                yield "", error_html(error), gr.update(), ""
                return
            while True:
                current = service.status(new_id)
                progress(current.percent / 100.0, desc=f"{current.stage} {current.layer}".strip())
                if current.state != "running":
                    break
                yield new_id, status_html(current), gr.update(), "\n".join(current.log)
                time.sleep(POLL_SECONDS)
            report_table = {"headers": REPORT_HEADERS, "data": report_rows(current.result) if current.result else []}
            yield new_id, status_html(current), report_table, "\n".join(current.log)

        def on_cancel(current_id):
            if not current_id:
                return status_html(service.latest())
            return status_html(service.cancel(current_id))

        start.click(
            on_start, [table, method, output, rank, overwrite, *advanced.values()], [job_id, status, report, log]
        )
        cancel.click(on_cancel, [job_id], [status])
    return tab


# --- the txt2img composition script ---------------------------------------------------------

@dataclasses.dataclass
class ComposeUI:
    """The script's components in ``ui()`` order and their infotext paste functions."""

    components: list
    infotext_fields: list


_SETTING_LABELS = {
    "method": "Mode: clora (one UNet pass per LoRA, the paper) | masked (one pass, each LoRA's output masked to its subject)",
    "step_size": "Latent update step size",
    "temperature": "Contrastive temperature",
    "max_iter_to_alter": "Update the latent until step (of 50)",
    "refinement_iters": "Refinement iterations",
    "mask_threshold": "Mask threshold",
    "attention_res_divisor": "Attention map resolution divisor",
    "use_latent_update": "Contrastive latent update",
    "use_masks": "Fuse with attention masks",
    "exclusive_masks": "One subject per pixel (off: the paper's overlapping masks)",
    "warmup_steps": "Masked mode: warm-up steps without subject LoRAs",
    "layout_steps": "Masked mode: layout steps (of 50), each subject its own stripe, in row order",
}


def request_from_args(args) -> ComposeRequest | None:
    """The script's positional arguments (UI order) or one dict (API) -> request, None when off.

    API form: ``{"enabled": true, "concepts": [{"lora": ..., "words": ..., "trigger": ...,
    "weight": ...}], "style": ..., "style_on": ..., "style_weight": ..., "settings": {...},
    "show_masks": ...}``. Both forms are checked by ``ComposeRequest`` (types, ranges, unknown
    keys); widget values are only mapped to its fields, never converted.
    """
    if not args:
        return None
    if isinstance(args[0], dict):
        values = dict(args[0])
        enabled = values.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise InputError(ComposeRequest._what, [("enabled", "value is not a valid boolean")])
        return ComposeRequest.from_dict(values) if enabled else None
    expected = 1 + 4 * MAX_CONCEPT_ROWS + 3 + len(USER_SETTINGS) + 1
    if len(args) != expected:
        raise ValueError(f"the LoRACLR composition script takes one object or {expected} values, got {len(args)}")
    enabled, *rest = args
    if not isinstance(enabled, bool):
        raise InputError(ComposeRequest._what, [("enabled", "value is not a valid boolean")])
    if not enabled:
        return None
    row_values, rest = rest[: 4 * MAX_CONCEPT_ROWS], rest[4 * MAX_CONCEPT_ROWS :]
    rows = []
    for i in range(MAX_CONCEPT_ROWS):
        lora, words, trigger, weight = row_values[4 * i : 4 * i + 4]
        if lora:
            rows.append({"lora": lora, "words": words or "", "trigger": trigger or "", "weight": weight})
    style, style_on, style_weight, *settings_values = rest[: 3 + len(USER_SETTINGS)]
    defaults = ComposeSettings()
    settings = {
        name: _gradio_number(value, "int" if type(getattr(defaults, name)) is int else "number")
        for name, value in zip(USER_SETTINGS, settings_values)
    }
    return ComposeRequest.from_dict({
        "concepts": rows, "style": style or "", "style_weight": style_weight, "style_on": style_on or "",
        "settings": settings, "show_masks": rest[3 + len(USER_SETTINGS)],
    })


def _from_infotext(getter):
    def paste(params: dict):
        text = params.get(INFOTEXT_KEY)
        if not text:
            return None
        try:
            return getter(ComposeRequest.from_infotext(text))
        except (ValueError, TypeError):
            return None
    return paste


def build_compose_ui(host: WebUIHost, elem_prefix: str) -> ComposeUI:
    """The script's accordion; components in the order ``request_from_args`` reads them."""
    import gradio as gr

    defaults = ComposeSettings()
    names = [""] + list(host.lora_files())
    components, fields = [], []
    with gr.Accordion("LoRACLR composition", open=False, elem_id=f"{elem_prefix}_loraclr"):
        enabled = gr.Checkbox(label="Enable (one UNet pass per LoRA; concepts kept apart)", value=False,
                              elem_id=f"{elem_prefix}_loraclr_enable")
        components.append(enabled)
        fields.append((enabled, lambda params: INFOTEXT_KEY in params))
        dropdowns = []
        for i in range(MAX_CONCEPT_ROWS):
            with gr.Row():
                lora = gr.Dropdown(label=f"LoRA {i + 1}", choices=names, value="", elem_id=f"{elem_prefix}_loraclr_lora_{i}")
                words = gr.Textbox(label="Its words in the prompt", placeholder="e.g. cat")
                trigger = gr.Textbox(label="Trigger", placeholder="optional")
                weight = gr.Slider(label="Weight", minimum=0.0, maximum=2.0, step=0.05, value=1.0)
            dropdowns.append(lora)
            components += [lora, words, trigger, weight]
            for j, component in enumerate((lora, words, trigger, weight)):
                key = ("lora", "words", "trigger", "weight")[j]
                fields.append((component, _from_infotext(
                    lambda r, i=i, key=key: getattr(r.concepts[i], key) if i < len(r.concepts) else ("" if key != "weight" else 1.0)
                )))
        with gr.Row():
            style = gr.Dropdown(label="Style LoRA (optional)", choices=names, value="", elem_id=f"{elem_prefix}_loraclr_style")
            style_on = gr.Textbox(label="Style only on these subjects (their words, comma-separated; empty = whole image)")
            style_weight = gr.Slider(label="Style weight", minimum=0.0, maximum=2.0, step=0.05, value=1.0)
        dropdowns.append(style)
        components += [style, style_on, style_weight]
        for component, key in ((style, "style"), (style_on, "style_on"), (style_weight, "style_weight")):
            fields.append((component, _from_infotext(lambda r, key=key: getattr(r, key))))
        method = gr.Radio(label=_SETTING_LABELS["method"], choices=list(COMPOSE_METHODS), value=defaults.method)
        components.append(method)
        fields.append((method, _from_infotext(lambda r: r.settings.method)))
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                for name in USER_SETTINGS[1:]:  # "method" first, above
                    value = getattr(defaults, name)
                    if isinstance(value, bool):
                        component = gr.Checkbox(label=_SETTING_LABELS[name], value=value)
                    else:
                        component = gr.Number(label=_SETTING_LABELS[name], value=value,
                                              precision=0 if isinstance(value, int) else None)
                    components.append(component)
                    fields.append((component, _from_infotext(lambda r, name=name: getattr(r.settings, name))))
        show_masks = gr.Checkbox(label="Show masks (adds each image's mask overlay to the results)", value=False)
        components.append(show_masks)
        fields.append((show_masks, _from_infotext(lambda r: r.show_masks)))
        refresh = gr.Button("Refresh LoRA list")

        def on_refresh():
            host.refresh_host_loras()
            choices = [""] + list(host.lora_files())
            return [gr.update(choices=choices) for _ in dropdowns]

        refresh.click(on_refresh, [], dropdowns)
    return ComposeUI(components, fields)

