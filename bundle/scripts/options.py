"""Parsing of command-line overrides that the bundle runner passes through as text."""
from __future__ import annotations

from typing import Any

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool. ``--resume false`` reaches the config as the string "false" (only
    ``False`` is parsed by the runner), which Python would treat as true; this reads it as meant."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")
