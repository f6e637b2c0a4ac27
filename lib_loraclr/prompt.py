"""The token finder both engines use: an A1111 prompt -> the tokens the text encoder sees.

Positions are always derived from the tokenizer, never typed by hand. They refer to the
token sequence the text encoder receives for the prompt with A1111 syntax removed: BOS at 0,
so the first word token is at 1.

A1111 prompt syntax is handled the way A1111 does it: ``<lora:name:0.8>``-style
extra-network tags are removed, the attention grammar (``(word:1.2)``, ``((word))``,
``[word]``, ``\\(`` escapes) is stripped to its text, and each run of equal emphasis is
tokenized on its own, then concatenated; the weights are kept per token. Not supported
(clear errors): ``BREAK`` (a second 77-token chunk), brackets that split a word.

The tokenizer is any Hugging Face CLIP tokenizer (slow or fast): ``encode(text,
add_special_tokens=False)`` and ``convert_ids_to_tokens``; CLIP BPE marks a word's last
token with ``</w>`` and writes one character per UTF-8 byte.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

import regex

MAX_PROMPT_TOKENS = 75  # 77 minus BOS and EOS
MAX_PROMPT_CHARS = 20_000  # far beyond 75 tokens even with many <lora:...> tags: refused before tokenizing

# A1111 modules/extra_networks.py: <lora:name:0.8>, <hypernet:name:1>, ...
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# A1111 modules/prompt_parser.py attention grammar, token by token.
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\bBREAK\b")
_ROUND_BRACKET = 1.1
_SQUARE_BRACKET = 1 / 1.1
# CLIP's BPE pre-tokenizer: tokens never cross these pieces, so each is tokenized alone.
_CLIP_PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@dataclass(frozen=True)
class PromptFragment:
    """A run of prompt text with one emphasis weight, as A1111 tokenizes it.

    raw_offsets: for each character of ``text``, its index in the prompt as written.
    """

    text: str
    weight: float
    raw_offsets: tuple[int, ...]


def parse_attention(prompt: str) -> list[PromptFragment]:
    """Split an A1111 prompt into (text, weight) runs, extra-network tags removed.

    Same grammar and weights as A1111's ``parse_prompt_attention``: ``(x)`` x1.1,
    ``[x]`` /1.1, ``(x:w)`` xw, unbalanced brackets close at the end, a stray ``)`` or
    ``:w)`` is literal text, adjacent runs of equal weight are merged.
    """
    kept_text, kept_offsets, start = [], [], 0
    for tag in _EXTRA_NETWORK.finditer(prompt):
        kept_text.append(prompt[start : tag.start()])
        kept_offsets.extend(range(start, tag.start()))
        start = tag.end()
    kept_text.append(prompt[start:])
    kept_offsets.extend(range(start, len(prompt)))
    stripped = "".join(kept_text)

    runs: list[list] = []  # [text, weight, offsets]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(first_run: int, factor: float):
        for run in runs[first_run:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(stripped):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            runs.append([text[1:], 1.0, kept_offsets[match.start() + 1 : match.end()]])
        elif text == "(":
            round_open.append(len(runs))
        elif text == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"bad attention weight {text!r} in prompt {prompt!r}") from None
            multiply_from(round_open.pop(), factor)
        elif text == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND_BRACKET)
        elif text == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE_BRACKET)
        else:
            if _BREAK.search(text):
                raise ValueError(
                    f"prompt {prompt!r} uses BREAK, which starts a second 77-token chunk; "
                    "the engines read one 77-token chunk"
                )
            runs.append([text, 1.0, kept_offsets[match.start() : match.end()]])
    for first_run in round_open:
        multiply_from(first_run, _ROUND_BRACKET)
    for first_run in square_open:
        multiply_from(first_run, _SQUARE_BRACKET)

    fragments: list[PromptFragment] = []
    for weight, group in itertools.groupby(runs, key=lambda run: run[1]):
        group = list(group)
        text = "".join(run[0] for run in group)
        if text:
            offsets = tuple(o for run in group for o in run[2])
            fragments.append(PromptFragment(text, weight, offsets))
    return fragments


def _phrase_pattern(phrase: str) -> re.Pattern:
    """Whole-word, case-insensitive, any-whitespace match of a word or phrase."""
    parts = phrase.split()
    if not parts:
        raise ValueError("empty concept word: give the word(s) the prompt uses, e.g. 'cat'")
    body = r"\s+".join(re.escape(p) for p in parts)
    head = r"(?<!\w)" if re.match(r"\w", parts[0]) else ""
    tail = r"(?!\w)" if re.search(r"\w$", parts[-1]) else ""
    return re.compile(head + body + tail, re.IGNORECASE)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as the text encoder sees it, with a map from its characters to tokens.

    clean: the prompt with A1111 syntax and extra-network tags removed (the tokenized text).
    token_ids: the prompt's tokens, without BOS/EOS.
    char_to_token: per character of ``clean``, the encoder position of the token it belongs
        to (BOS = 0, first token = 1), -1 for whitespace and characters the tokenizer drops.
    raw_offsets: per character of ``clean``, its index in ``prompt``.
    token_weights: per token, the A1111 emphasis weight of its run (1.0 outside brackets).
    """

    prompt: str
    clean: str
    token_ids: tuple[int, ...]
    char_to_token: tuple[int, ...]
    raw_offsets: tuple[int, ...]
    token_weights: tuple[float, ...] = ()  # per token of token_ids: its emphasis weight

    def spans_of(self, phrase: str) -> list[tuple[int, int]]:
        """(start, end) character spans in ``clean`` of every whole-word occurrence."""
        return [m.span() for m in _phrase_pattern(phrase).finditer(self.clean)]

    def positions_of(self, phrase: str) -> list[tuple[int, ...]]:
        """Encoder token positions of every occurrence of ``phrase``, one tuple each."""
        occurrences = []
        for start, end in self.spans_of(phrase):
            positions = sorted({p for p in self.char_to_token[start:end] if p >= 0})
            occurrences.append(tuple(positions))
        return occurrences


def _piece_char_tokens(piece: str, tokens: list[str]) -> list[int]:
    """Index (into ``tokens``) of the token holding each character of one BPE piece.

    Byte-level BPE writes one character per UTF-8 byte of the lowercased piece, so a
    character's byte offset locates its token; offsets are rescaled in case the tokenizer's
    normalisation changed the byte count.
    """
    token_ends = list(itertools.accumulate(len(t.removesuffix("</w>")) for t in tokens))
    char_bytes = [len(c.lower().encode("utf-8")) for c in piece]
    total_chars, total_tokens = sum(char_bytes), token_ends[-1]
    indices, byte = [], 0
    for n in char_bytes:
        token_byte = byte * total_tokens // total_chars if total_chars else 0
        indices.append(min(bisect.bisect_right(token_ends, token_byte), len(tokens) - 1))
        byte += n
    return indices


def parse_prompt(prompt: str, tokenizer) -> ParsedPrompt:
    """Strip A1111 syntax from ``prompt`` and map each remaining character to its token.

    Positions assume the prompt fits one 77-token window (checked by ``plan_concepts``).
    """
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; CLoRA composes within one 77-token window "
                         f"({MAX_PROMPT_TOKENS} prompt tokens)")
    clean_parts: list[str] = []
    token_ids: list[int] = []
    token_weights: list[float] = []
    char_to_token: list[int] = []
    raw_offsets: list[int] = []
    for fragment in parse_attention(prompt):
        fragment_ids: list[int] = []
        fragment_map = [-1] * len(fragment.text)
        for piece in _CLIP_PIECE.finditer(fragment.text):
            ids = tokenizer.encode(piece.group(), add_special_tokens=False)
            if not ids:
                continue
            first_position = 1 + len(token_ids) + len(fragment_ids)
            tokens = tokenizer.convert_ids_to_tokens(ids)
            for j, k in enumerate(_piece_char_tokens(piece.group(), tokens)):
                fragment_map[piece.start() + j] = first_position + k
            fragment_ids.extend(ids)
        if fragment_ids != list(tokenizer.encode(fragment.text, add_special_tokens=False)):
            raise ValueError(
                f"cannot align the tokens of {fragment.text!r} (prompt {prompt!r}) with its "
                "characters: the tokenizer splits it differently piece by piece"
            )
        clean_parts.append(fragment.text)
        token_ids.extend(fragment_ids)
        token_weights.extend([fragment.weight] * len(fragment_ids))
        char_to_token.extend(fragment_map)
        raw_offsets.extend(fragment.raw_offsets)
    clean = "".join(clean_parts)
    if token_ids != list(tokenizer.encode(clean, add_special_tokens=False)):
        # the encoders tokenize the clean prompt as a whole: positions and weights would shift
        raise ValueError(
            f"prompt {prompt!r}: an emphasis bracket or weight splits a word; put the brackets around whole words"
        )
    return ParsedPrompt(
        prompt, clean, tuple(token_ids), tuple(char_to_token), tuple(raw_offsets), tuple(token_weights)
    )
