"""The one check that config values share across modules (schedules and diffusion keep their own,
as they import only torch)."""

from __future__ import annotations

from typing import Any


def check_int(key: str, value: Any, minimum: int = 1) -> None:
    """A one-sentence ValueError naming `key` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: it must be an integer >= {minimum}.")
