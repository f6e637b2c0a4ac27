"""Which plan and engine a composition's ``settings.method`` picks: the one switch every host uses."""

from __future__ import annotations

from collections.abc import Sequence

from .concepts import ConceptPlan, LoraConcept, plan_concepts, plan_one_prompt
from .engine import ComposeEngine
from .masked import MaskedLoraEngine
from .settings import ComposeSettings


def plan_for(settings: ComposeSettings, prompt: str, concepts: Sequence[LoraConcept], tokenizer,
             embeddings: Sequence[str] = ()) -> ConceptPlan:
    """CLoRA's per-LoRA prompts, or the single pass's one prompt."""
    plan = plan_one_prompt if settings.method == "masked" else plan_concepts
    return plan(prompt, concepts, tokenizer, embeddings)


def build_engine(plan: ConceptPlan, settings: ComposeSettings, *args, mode: str = "fast", **kwargs):
    """A ``ComposeEngine`` (CLoRA; ``mode`` "fast" or "authors") or a ``MaskedLoraEngine``, same arguments."""
    if settings.method == "masked":
        return MaskedLoraEngine(plan, settings, *args, **kwargs)
    return ComposeEngine(plan, settings, *args, mode=mode, **kwargs)
