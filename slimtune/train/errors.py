"""Errors raised by the training pipeline (all ``ValueError`` subclasses, so callers can catch them)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TrainConfigError(ValueError):
    """A training config (YAML, ``--set`` override or Python dict) is invalid."""


class DataError(ValueError):
    """Training or evaluation data cannot be read or does not have the expected layout."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or does not match the run."""


def closest(name: str, valid: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the nearest valid name, or "" when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
