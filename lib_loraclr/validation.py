"""Typed, bounded fields for every settings and request dataclass, checked by pydantic's v1 API.

Why one module: every value that crosses a boundary (CLI options, the tab, the REST API, the
script's arguments, infotext) lands in one of a few dataclasses (``MergeSettings``,
``ComposeSettings``, ``MergeRequest``, ``ComposeRequest``); ``checked`` makes their field
annotations the one declaration of each value's type and range, checked at construction
(also through ``dataclasses.replace``), so no boundary can skip or re-implement a check.

The v1 API is what both hosts have: A1111 pins pydantic 1.10, Forge pydantic 2 (which ships
it as ``pydantic.v1``). Strict types: a string is never a number or a boolean, a float never an
integer, a bool never a number; numbers must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping

try:
    from pydantic import v1 as pydantic
except ImportError:  # pydantic < 1.10.17 has no v1 alias
    import pydantic

StrictBool = pydantic.StrictBool


class InputError(ValueError):
    """Bad input, one line: ``problems`` are (field path, message) pairs, e.g. ("settings.iters", "...")."""

    def __init__(self, what: str, problems: list[tuple[str, str]]):
        self.what = what
        self.problems = list(dict.fromkeys(problems))  # renamed fields can repeat a problem
        listing = "; ".join(f"{path}: {message}" if path else message for path, message in self.problems)
        super().__init__(f"{what}: {listing}" if what else listing)

    def renamed(self, names: Mapping[str, str], what: str | None = None) -> "InputError":
        """The same problems with field paths renamed (e.g. to CLI option names), under ``what`` if given."""
        problems = [(names.get(path, path), message) for path, message in self.problems]
        return InputError(self.what if what is None else what, problems)


class _Real(pydantic.ConstrainedFloat):
    @classmethod
    def __get_validators__(cls):
        yield cls._finite_number
        yield from super().__get_validators__()

    @classmethod
    def _finite_number(cls, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
            raise TypeError("must be a number")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)


def real(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A finite int or float (returned as float) in the given bounds; never a string or bool."""
    return type("Real", (_Real,), {"ge": ge, "gt": gt, "le": le, "lt": lt})


def integer(*, ge: int, le: int, multiple_of: int | None = None):
    """An int (not a float, bool or string) in [ge, le]."""
    return pydantic.conint(strict=True, ge=ge, le=le, multiple_of=multiple_of)


class _Text(pydantic.ConstrainedStr):
    strict = True

    @classmethod
    def __get_validators__(cls):
        yield from super().__get_validators__()
        yield cls._printable

    @classmethod
    def _printable(cls, value: str):
        if any(not ch.isprintable() for ch in value):
            raise ValueError("must not hold control or invisible formatting characters (newlines, U+202E...)")
        return value


def text(*, max_length: int, min_length: int = 0):
    """A str of printable characters (no newline, tab or bidi override), at most ``max_length`` long."""
    return type("Text", (_Text,), {"max_length": max_length, "min_length": min_length})


# Values several requests share.
LoraName = text(min_length=1, max_length=255)  # a LoRA's name in the host's list
Trigger = text(min_length=1, max_length=200)  # a concept's trigger words
Strength = real(ge=0, le=10)  # a LoRA's multiplier: NaN or 1e30 would only give a black image
Seed = integer(ge=0, le=2**32 - 1)


def _flatten(errors, prefix: tuple = ()) -> list[tuple[str, str]]:
    """pydantic's nested errors -> (dotted path, message), nested ``InputError``s expanded in place."""
    problems = []
    for item in errors:
        if isinstance(item, (list, tuple)):
            problems += _flatten(item, prefix)
            continue
        location = prefix + tuple(p for p in item.loc_tuple() if p != "__root__")
        error = item.exc
        if isinstance(error, InputError):
            problems += [(".".join(map(str, location + ((path,) if path else ()))), message)
                         for path, message in error.problems]
        elif isinstance(error, pydantic.ValidationError):
            problems += _flatten(error.raw_errors, location)
        else:
            problems.append((".".join(map(str, location)), str(error)))
    return problems


class _Config:
    extra = pydantic.Extra.forbid


def checked(cls=None, *, frozen: bool = False, what: str | None = None, unknown: str = "key"):
    """Make ``cls`` a dataclass whose fields are validated on construction (pydantic v1 dataclass).

    Unknown or missing fields and bad values raise one ``InputError`` naming every bad field
    (nested dataclasses by their path: ``concepts.0.weight``). ``what`` names the class in
    messages ("merge settings"), ``unknown`` a field of it ("unknown merge setting").
    Cross-field checks go in ``__post_init_post_parse__``.
    """
    if cls is None:
        return functools.partial(checked, frozen=frozen, what=what, unknown=unknown)
    validated = pydantic.dataclasses.dataclass(cls, frozen=frozen, config=_Config)
    names = [f.name for f in dataclasses.fields(validated) if f.init]
    required = [f.name for f in dataclasses.fields(validated)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    what = cls.__name__ if what is None else what
    pydantic_init = validated.__init__

    @functools.wraps(pydantic_init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise InputError(what, [("", f"takes at most {len(names)} values, got {len(args)}")])
        given = dict(zip(names, args))
        extra = sorted(set(kwargs) - set(names))
        if extra:
            raise InputError(what, [(key, f"unknown {unknown} (known: {', '.join(names)})") for key in extra])
        given.update(kwargs)
        missing = [name for name in required if name not in given]
        if missing:
            raise InputError(what, [(name, "missing") for name in missing])
        try:
            pydantic_init(self, **given)
        except pydantic.ValidationError as error:
            raise InputError(what, _flatten(error.raw_errors)) from None
        except InputError:
            raise
        except ValueError as error:  # a cross-field check of __post_init_post_parse__
            raise InputError(what, [("", str(error))]) from None

    validated.__init__ = __init__
    validated._what = what
    return validated


def from_mapping(cls, values, what: str | None = None):
    """Build a ``checked`` dataclass from a JSON-style object; anything but a mapping is refused."""
    what = cls._what if what is None else what
    if not isinstance(values, Mapping):
        raise InputError(what, [("", f"expected an object with named fields, got {type(values).__name__}")])
    keys = [key for key in values if not isinstance(key, str)]
    if keys:
        raise InputError(what, [("", f"field names must be strings, got {keys[0]!r}")])
    return cls(**values)
