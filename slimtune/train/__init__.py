"""Training pipeline: config schema, data, Trainer, evaluation, checkpoints, metrics and plots."""

from slimtune.train.config import TrainConfig, load_train_config
from slimtune.train.errors import CheckpointError, DataError, TrainConfigError
from slimtune.train.trainer import Trainer, TrainingAborted, train


def __getattr__(name: str):
    """`SlimtuneCallback` without importing transformers' Trainer at `import slimtune.train`."""
    if name == "SlimtuneCallback":
        from slimtune.train.hf import SlimtuneCallback

        return SlimtuneCallback
    raise AttributeError(f"module 'slimtune.train' has no attribute {name!r}")


__all__ = ["CheckpointError", "DataError", "SlimtuneCallback", "TrainConfig", "TrainConfigError", "Trainer",
           "TrainingAborted", "load_train_config", "train"]
