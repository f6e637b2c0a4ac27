"""One WebUI generation with composition (CLoRA or single pass): what the user asked for, and the state the hosts drive.

``ComposeRequest`` is the one description of a composition that the txt2img script UI, the
REST payload (``alwayson_scripts``) and the PNG infotext all convert to and from, so the
three can never disagree. ``ComposeSession`` holds what stays fixed for one batch (LoRAs,
plan, per-pass conditioning, the runtime); a host builds one engine per sampling run from
it (the hires pass is a second run).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import field

import torch

from ..lora.base import LoraFile
from ..lora.reader import read_lora
from ..model import ModelAccess
from ..runtime import LoraRuntime
from ..validation import InputError, LoraName, StrictBool, Strength, checked, from_mapping, text
from .attention import cross_attention_modules
from .concepts import LoraConcept
from .engine import ComposeEngine, encode_passes
from .masked import MaskedLoraEngine
from .fusion import pass_lora_sets
from .methods import build_engine, plan_for
from .settings import ComposeSettings

# The settings a WebUI user sets; guidance comes from the host's own CFG scale.
USER_SETTINGS = (
    "method", "step_size", "temperature", "max_iter_to_alter", "refinement_iters", "mask_threshold",
    "attention_res_divisor", "use_latent_update", "use_masks", "exclusive_masks", "warmup_steps", "layout_steps",
)
MAX_SUBJECTS = 4  # the txt2img script has this many rows; the API and infotext are held to it too
Phrase = text(max_length=200)


@checked(frozen=True, what="composition subject")
class ConceptRow:
    """lora: the LoRA's name in the host's list; words: the subject as written in the prompt."""

    lora: LoraName
    words: Phrase
    trigger: Phrase = ""
    weight: Strength = 1.0


@checked(frozen=True, what="composition request")
class ComposeRequest:
    """A CLoRA composition as the user describes it.

    style: an optional style LoRA name; style_on: "" for the whole image, else the words of
    the subjects it is limited to, comma-separated.
    """

    concepts: tuple[ConceptRow, ...]
    style: text(max_length=255) = ""
    style_weight: Strength = 1.0
    style_on: text(max_length=1000) = ""
    settings: ComposeSettings = field(default_factory=ComposeSettings)
    show_masks: StrictBool = False

    def __post_init_post_parse__(self):
        concepts = self.concepts
        if not concepts:
            raise ValueError("add at least one row with a LoRA and its words in the prompt")
        if len(concepts) > MAX_SUBJECTS:
            raise ValueError(f"at most {MAX_SUBJECTS} subjects, got {len(concepts)}")
        for row in concepts:
            if not row.lora.strip() or not row.words.strip():
                raise ValueError(f"row {row.lora.strip() or '(no LoRA)'!r} needs both a LoRA and its words")
        names = [row.lora for row in concepts] + ([self.style] if self.style else [])
        if len(set(names)) != len(names):
            raise ValueError("each LoRA may appear only once (subjects and style)")

    def to_dict(self) -> dict:
        settings = {name: getattr(self.settings, name) for name in USER_SETTINGS}
        return {
            "concepts": [dataclasses.asdict(row) for row in self.concepts],
            "style": self.style,
            "style_weight": self.style_weight,
            "style_on": self.style_on,
            "settings": settings,
            "show_masks": self.show_masks,
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> "ComposeRequest":
        """From an API payload or infotext; unknown keys are an error, not ignored."""
        settings = values.get("settings") if isinstance(values, Mapping) else None
        if isinstance(settings, Mapping):
            bad = [key for key in settings if key not in USER_SETTINGS]
            if bad:
                raise InputError(cls._what, [(f"settings.{key}", f"unknown setting (known: {', '.join(USER_SETTINGS)})")
                                             for key in bad])
        return from_mapping(cls, values)

    def to_infotext(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_infotext(cls, infotext: str) -> "ComposeRequest":
        try:
            values = json.loads(infotext)
        except (ValueError, RecursionError) as error:
            raise ValueError(f"the LoRACLR infotext field is not valid JSON ({error})") from None
        if isinstance(values, dict) and isinstance(values.get("settings"), dict):
            # written before the layout existed: it ran without one, so a pasted image reproduces
            values["settings"].setdefault("layout_steps", 0)
        return cls.from_dict(values)

    def style_groups(self) -> list[int] | None:
        """Subject indices the style is limited to, or None for everywhere."""
        if not self.style_on.strip():
            return None
        words = [w.strip().lower() for w in self.style_on.split(",") if w.strip()]
        by_words = {row.words.strip().lower(): i for i, row in enumerate(self.concepts)}
        missing = [w for w in words if w not in by_words]
        if missing:
            raise ValueError(f"style limited to {missing}, which are not subjects' words")
        return sorted(by_words[w] for w in words)


def strip_lora_tags(prompt: str, names: Sequence[str]) -> str:
    """Remove ``<lora:name...>`` (and ``<lyco:...>``) tags of these LoRAs from a prompt.

    Why: the concept LoRAs run only inside CLoRA's passes; if the built-in Lora also saw their
    tags it would apply them to the whole image on top.
    """
    if not names:
        return prompt
    alternatives = "|".join(re.escape(name) for name in names)
    return re.sub(rf"<(?:lora|lyco):(?:{alternatives})(?::[^>]*)?>", "", prompt)


class ComposeSession:
    """The fixed part of one batch: LoRAs, plan, runtime (detached) and per-pass conditioning.

    lora_paths: LoRA name -> file, from the host's LoRA list.
    prompts / negative_prompts: the batch's rows; CLoRA's plan is per prompt, so all rows
    must share one prompt (seeds may differ).
    embeddings: the host's textual-inversion embedding names (refused in the prompt).
    """

    def __init__(
        self,
        model: ModelAccess,
        request: ComposeRequest,
        lora_paths: Mapping[str, str],
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        *,
        read: Callable[[str], LoraFile] = read_lora,
        embeddings: Sequence[str] = (),
    ):
        if len(set(prompts)) != 1 or len(set(negative_prompts)) != 1:
            raise ValueError(
                "LoRACLR composition needs the same prompt and negative prompt for every image of a batch "
                "(wildcards or prompt matrices give different ones); use batch count instead of batch size"
            )
        names = [row.lora for row in request.concepts] + ([request.style] if request.style else [])
        missing = [name for name in names if name not in lora_paths]
        if missing:
            raise FileNotFoundError(f"LoRA(s) {missing} not found in the LoRA folder (refresh the list?)")
        self.model = model
        self.request = request
        self.loras = [read(lora_paths[name]) for name in names]
        for name, lora in zip(names, self.loras):
            if lora.arch and lora.arch != model.arch:
                raise ValueError(f"{name} is an {lora.arch} LoRA but the loaded model is {model.arch}")
        concepts = [LoraConcept(row.words.strip(), row.trigger.strip() or None) for row in request.concepts]
        self.plan = plan_for(request.settings, prompts[0], concepts, model.tokenizer, embeddings)
        style_groups = {len(concepts): request.style_groups()} if request.style else {}
        self.lora_sets = pass_lora_sets(self.plan, style_groups)
        weights = [row.weight for row in request.concepts] + ([request.style_weight] if request.style else [])
        self.runtime = LoraRuntime(model.targets(), self.loras, weights, attach=False)
        with self.runtime.attached():
            self.conditioning = encode_passes(
                model.encode, self.runtime, self.plan, self.lora_sets, negative_prompts[0], len(prompts)
            )
        self.names = [row.lora for row in request.concepts]
        self.last_masks: torch.Tensor | None = None  # (P, B, 1, h, w) of the latest step

    def engine(
        self, num_steps: int, guidance_scale: float, *, forms_layout: bool = True, grad_context=nullcontext
    ) -> ComposeEngine | MaskedLoraEngine:
        """An engine for one sampling run of ``num_steps`` with the host's CFG scale (``methods.build_engine``).

        forms_layout: False for a run that refines an image already laid out (the hires pass):
        no latent update and no fixed layout, which belong to the first, layout-forming steps.
        """
        settings = dataclasses.replace(
            self.request.settings,
            guidance_scale=guidance_scale,
            use_latent_update=self.request.settings.use_latent_update and forms_layout,
            layout_steps=self.request.settings.layout_steps if forms_layout else 0,
        )
        return build_engine(
            self.plan, settings, self.runtime, self.lora_sets,
            cross_attention_modules(self.model.unet), num_steps,
            vae_scale_factor=self.model.vae_scale_factor, grad_context=grad_context,
        )

    def close(self) -> None:
        """Drop the hooks (already off between steps) and the cast LoRA factors."""
        self.runtime.remove()
