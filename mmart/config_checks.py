"""Range checks for config fields, called from each config dataclass's ``__post_init__``.

A bad size, rate or probability must fail when the config loads, with the key and what it
may be, not deep inside TRL, PEFT or torch (or, worse, train nothing and exit 0).
mmart.config turns a ``FieldError`` into a one-line ConfigError with the full dotted key
(``sft.epochs``) and the file it came from.
"""

from __future__ import annotations

import math
from argparse import ArgumentTypeError
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any


class FieldError(ValueError):
    """A field's value is outside what it may be; ``field`` is the name inside its dataclass."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} must be {allowed}, got {value!r}")


def _values(obj: Any, names: Sequence[str]) -> Iterator[tuple[str, Any]]:
    for name in names:
        value = getattr(obj, name)
        if value is not None:  # an Optional field left unset means "off"; its own help says so
            yield name, value


def at_least(obj: Any, minimum: float, *names: str) -> None:
    """Each named field is >= ``minimum`` (counts, sizes, steps)."""
    for name, v in _values(obj, names):
        if not v >= minimum:
            raise FieldError(name, v, f">= {minimum}")


def positive(obj: Any, *names: str) -> None:
    """Each named field is > 0 (rates, temperatures, epochs)."""
    for name, v in _values(obj, names):
        if not v > 0:
            raise FieldError(name, v, "> 0")


def within(obj: Any, name: str, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> None:
    """``lo <= field <= hi`` (``[lo, hi]``), either end open on request (probabilities, fractions)."""
    for _, v in _values(obj, (name,)):
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        if not (above and below):
            raise FieldError(name, v, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def probability(obj: Any, *names: str) -> None:
    """Each named field is in [0, 1]."""
    for name in names:
        within(obj, name, 0, 1)


def one_of(obj: Any, name: str, choices: Sequence[Any]) -> None:
    """A free-text field that only some values make sense for (a split name, a resize mode)."""
    for _, v in _values(obj, (name,)):
        if v not in choices:
            raise FieldError(name, v, f"one of {list(choices)}")


def length(obj: Any, name: str, n: int, what: str) -> None:
    """A list field with exactly ``n`` items (``what`` says which, e.g. 'shot, tone, title size')."""
    for _, v in _values(obj, (name,)):
        if len(v) != n:
            raise FieldError(name, v, f"a list of {n} ({what})")


def not_empty(obj: Any, *names: str) -> None:
    """Each named string field is not empty."""
    for name, v in _values(obj, names):
        if not str(v).strip():
            raise FieldError(name, v, "a non-empty string")


def seeds(obj: Any, *names: str) -> None:
    """Seeds are >= 0 (numpy, and so transformers' set_seed, refuse negative ones)."""
    at_least(obj, 0, *names)


# --- The same checks for command-line numbers. ---

_NAME_FIRST = (within, one_of, length)  # these take the field name before their bounds


def cli_number(kind: type, check: Callable[..., None], *bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` parsing ``kind`` and holding it to a range check of this module.

    A CLI number gets the config's rule and message (``argument --max-pairs: must be >= 0,
    got -3``) instead of running with a value that only fails, or silently means something
    else, deep in a stage: ``cli_number(int, at_least, 0)``, ``cli_number(float, positive)``,
    ``cli_number(int, seeds)``, ``cli_number(float, within, 0, 1)``.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise ArgumentTypeError(f"expected a finite number, got {text!r}")
        holder = SimpleNamespace(value=value)
        try:
            if check in _NAME_FIRST:
                check(holder, "value", *bounds)
            else:
                check(holder, *bounds, "value")
        except FieldError as e:
            raise ArgumentTypeError(f"must be {e.allowed}, got {value!r}") from None
        return value

    parse.__name__ = kind.__name__
    parse.cli_check = (kind, check, bounds)  # type: ignore[attr-defined]  # tests find unchecked numbers by it
    return parse
