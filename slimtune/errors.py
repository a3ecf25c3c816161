"""Error types. Each subclasses a builtin so callers can catch either; messages say where,
the bad value, what was expected and, where one exists, the nearest valid option."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlimtuneError(Exception):
    """Base of every slimtune error."""


class ConfigError(SlimtuneError, ValueError):
    """A config field has a bad value or an unknown key."""


class TargetNotFoundError(SlimtuneError, ValueError):
    """A target pattern matched no module of the model."""


class AdapterLoadError(SlimtuneError, ValueError):
    """An adapter file is missing, unsafe, corrupt, or made for another base model."""


class AdapterNameError(SlimtuneError, KeyError):
    """An adapter name is unknown, or already taken."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class AdapterSaveError(SlimtuneError, OSError):
    """An adapter cannot be written where asked (the path is a file, say)."""
