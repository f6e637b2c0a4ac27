"""From "which LoRA is which words" to the token positions CLoRA reads attention maps at.

Positions are always derived from the tokenizer, never typed by hand (the official CLoRA
notebook's hand-typed indices are wrong). They refer to the token sequence the text encoder
receives for the prompt with A1111 syntax removed: BOS at 0, so the first word token is at 1.

A1111 prompt syntax is read by ``lib_loraclr.prompt`` (the token finder the merge uses too);
the emphasis weights are applied to each pass's conditioning. Not supported (clear errors or
documented limits): ``BREAK`` and prompts over 75 tokens (CLoRA composes in one 77-token
window), brackets that split a word, prompt editing ``[a:b:0.5]`` / alternation ``[a|b]``,
textual-inversion embeddings (refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..prompt import MAX_PROMPT_TOKENS, ParsedPrompt, parse_prompt


@dataclass(frozen=True)
class LoraConcept:
    """One subject LoRA: the words it draws, its optional trigger, its optional own prompt.

    words: the concept as written in the prompts, e.g. "cat" or "black cat".
    trigger: the LoRA's trigger word(s), e.g. "sks"; counted as the concept's tokens in
        every prompt where it occurs, and required in the LoRA's own prompt.
    prompt: the LoRA pass's prompt; default: the base prompt with ``trigger + " "`` inserted
        before the first occurrence of ``words`` (or the base prompt when no trigger).
    """

    words: str
    trigger: str | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class ComposePass:
    """One UNet pass per step.

    prompt: as written (A1111 syntax kept); clean_prompt: what the text encoder must see
        for the plan's positions to hold (hosts without A1111 syntax encode this).
    lora_index: index of the subject LoRA (into ``plan_concepts``' concepts) active in this
        pass; None for the base pass.
    mask_positions: token positions whose attention maps form this pass's mask (its LoRA
        concept's words + trigger); empty for the base pass, which takes the remainder.
    token_weights: the prompt's A1111 emphasis (``(cat:1.2)``), applied to this pass's
        conditioning by ``engine.encode_passes`` on every host.
    """

    prompt: str
    clean_prompt: str
    lora_index: int | None
    mask_positions: tuple[int, ...]
    token_weights: tuple[float, ...] = ()  # emphasis weight of each token of clean_prompt (BOS excluded)
    end_position: int = 0  # the EOS token's position (the encoder's summary of the whole prompt)


@dataclass(frozen=True)
class ConceptPlan:
    """Passes and concept groups. Pass 0 is the base prompt, pass k is LoRA k-1's prompt.

    groups[g]: every (pass, token position) of concept g (LoRA g) across all passes; each
        is one attention map labelled g in the contrastive loss.
    """

    passes: tuple[ComposePass, ...]
    groups: tuple[tuple[tuple[int, int], ...], ...]
    group_names: tuple[str, ...]

    def token_entries(self) -> tuple[list[int], list[int], list[int]]:
        """(pass indices, token positions, group labels), one entry per attention map."""
        entries = [(p, t, g) for g, group in enumerate(self.groups) for p, t in group]
        passes, positions, labels = zip(*entries)
        return list(passes), list(positions), list(labels)


def _with_trigger(base: ParsedPrompt, concept: LoraConcept) -> str:
    spans = base.spans_of(concept.words)
    if not spans:
        raise ValueError(f"concept word {concept.words!r} not found in prompt {base.prompt!r}")
    at = base.raw_offsets[spans[0][0]]
    return base.prompt[:at] + concept.trigger + " " + base.prompt[at:]


def _check_no_embeddings(prompt: ParsedPrompt, embeddings: Sequence[str], tokenizer) -> None:
    """Refuse textual-inversion embeddings in a pass prompt: the host swaps their tokens for
    vectors of its own count, so every later token position (and the plan) would shift.
    Matched on token ids, as A1111 and Forge find them."""
    ids = prompt.token_ids
    for name in embeddings:
        name_ids = tuple(tokenizer.encode(name, add_special_tokens=False))
        if name_ids and any(ids[i : i + len(name_ids)] == name_ids for i in range(len(ids) - len(name_ids) + 1)):
            raise ValueError(
                f"prompt {prompt.prompt!r} uses the textual-inversion embedding {name!r}, which would shift the "
                "token positions CLoRA reads; take it out of the prompt (the negative prompt may use embeddings)"
            )


def plan_concepts(
    base_prompt: str, concepts: Sequence[LoraConcept], tokenizer, embeddings: Sequence[str] = ()
) -> ConceptPlan:
    """Derive passes, concept groups and mask tokens from the prompts with the tokenizer.

    Repeated words: every whole-word occurrence counts (each mention is the same subject);
    matching ignores case and surrounding punctuation. A concept's words must occur in every
    pass's prompt; two concepts may not claim the same token. ``embeddings``: the names of the
    host's textual-inversion embeddings, refused in the prompts.
    """
    if not concepts:
        raise ValueError("CLoRA needs at least one LoRA concept")
    base = parse_prompt(base_prompt, tokenizer)
    parsed = [base]
    for concept in concepts:
        if concept.prompt is not None:
            parsed.append(parse_prompt(concept.prompt, tokenizer))
        elif concept.trigger:
            parsed.append(parse_prompt(_with_trigger(base, concept), tokenizer))
        else:
            parsed.append(base)
    for prompt in parsed:
        _check_no_embeddings(prompt, embeddings, tokenizer)
        if len(prompt.token_ids) > MAX_PROMPT_TOKENS:
            raise ValueError(
                f"prompt {prompt.prompt!r} has {len(prompt.token_ids)} tokens; CLoRA composes "
                f"within one 77-token window ({MAX_PROMPT_TOKENS} prompt tokens)"
            )

    # per_pass[p][g]: token positions of concept g in pass p
    per_pass: list[list[tuple[int, ...]]] = []
    for p, prompt in enumerate(parsed):
        owners: dict[int, int] = {}
        row = []
        for g, concept in enumerate(concepts):
            occurrences = prompt.positions_of(concept.words)
            if not occurrences:
                raise ValueError(f"concept word {concept.words!r} not found in prompt {prompt.prompt!r}")
            if concept.trigger:
                triggers = prompt.positions_of(concept.trigger)
                if p == g + 1 and not triggers:
                    raise ValueError(
                        f"trigger {concept.trigger!r} of concept {concept.words!r} not found in "
                        f"its prompt {prompt.prompt!r}"
                    )
                occurrences += triggers
            positions = tuple(sorted({t for occurrence in occurrences for t in occurrence}))
            for t in positions:
                if owners.setdefault(t, g) != g:
                    raise ValueError(
                        f"token {t} of prompt {prompt.prompt!r} belongs to both concept "
                        f"{concepts[owners[t]].words!r} and concept {concept.words!r}"
                    )
            row.append(positions)
        per_pass.append(row)

    passes = tuple(
        ComposePass(
            prompt=prompt.prompt,
            clean_prompt=prompt.clean,
            lora_index=None if p == 0 else p - 1,
            mask_positions=() if p == 0 else per_pass[p][p - 1],
            token_weights=prompt.token_weights,
            end_position=len(prompt.token_ids) + 1,
        )
        for p, prompt in enumerate(parsed)
    )
    groups = tuple(
        tuple((p, t) for p in range(len(parsed)) for t in per_pass[p][g]) for g in range(len(concepts))
    )
    return ConceptPlan(passes, groups, tuple(c.words for c in concepts))


def plan_one_prompt(
    base_prompt: str, concepts: Sequence[LoraConcept], tokenizer, embeddings: Sequence[str] = ()
) -> ConceptPlan:
    """The plan of a single-pass composition: every pass has one prompt, the base prompt with each
    trigger not yet in it inserted before its concept's words (own ``prompt``s are not used)."""
    prompt = base_prompt
    for concept in concepts:
        parsed = parse_prompt(prompt, tokenizer)
        if concept.trigger and not parsed.positions_of(concept.trigger):
            prompt = _with_trigger(parsed, concept)
    return plan_concepts(prompt, [LoraConcept(c.words, c.trigger, prompt) for c in concepts], tokenizer, embeddings)
