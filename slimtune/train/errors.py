"""Errors raised by the training pipeline. They subclass slimtune's own types (and so ``ValueError``)."""

from __future__ import annotations

from slimtune.errors import ConfigError, SlimtuneError, did_you_mean


class TrainConfigError(ConfigError):
    """A training config (YAML, ``--set`` override or Python dict) is invalid."""


class DataError(SlimtuneError, ValueError):
    """Training or evaluation data cannot be read or does not have the expected layout."""


class CheckpointError(SlimtuneError, ValueError):
    """A checkpoint directory is missing, incomplete, or does not match the run."""


__all__ = ["CheckpointError", "DataError", "TrainConfigError", "did_you_mean"]
