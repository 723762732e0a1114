"""The few typed errors of diffrt. Each subclasses a builtin so callers can catch ValueError / RuntimeError."""
from __future__ import annotations

from typing import Any, Sequence


class DiffrtError(Exception):
    """Base of every diffrt-specific error."""


class ConfigError(DiffrtError, ValueError):
    """A configuration value is not supported; the message names the key, what was expected and what was got."""


class InputError(DiffrtError, ValueError):
    """A call argument is invalid; raised before any heavy work."""


class PackageError(DiffrtError, ValueError):
    """A model package is missing a file or component, or its manifest is invalid."""


class EngineError(DiffrtError, RuntimeError):
    """An inference engine could not be created or run (provider missing, engine incompatible)."""


class ExportError(DiffrtError, RuntimeError):
    """Export failed (validation above tolerance, unsupported model, write failure)."""


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first `limit` of `names` for a message, "a, b, c and 4 more" when there are more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def invalid(name: str, expected: str, got: Any, cls: type[DiffrtError] = InputError) -> DiffrtError:
    """Build an error that names the parameter, the allowed values and what was received."""
    return cls(f"`{name}` must be {expected}; got {got!r}")
