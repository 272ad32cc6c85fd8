"""The checks that config values share across modules (schedules and diffusion keep their own,
as they import only torch)."""

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
