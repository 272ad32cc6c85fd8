"""The checks that config values share across modules: one-sentence ValueErrors naming the key,
the value and what is allowed (standard library only, so that any module may use them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_int(key: str, value: Any, minimum: int = 1) -> None:
    """A one-sentence ValueError naming `key` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: it must be an integer >= {minimum}.")


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """A one-sentence ValueError naming `key` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is unknown: allowed are {', '.join(allowed)}.")


def check_positive(key: str, value: Any) -> None:
    """A one-sentence ValueError naming `key` unless `value` is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}={value!r} is invalid: it must be a number > 0.")
