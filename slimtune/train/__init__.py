"""Training pipeline: config schema, data, Trainer, evaluation, checkpoints, metrics and plots."""

from slimtune.train.config import TrainConfig, load_train_config
from slimtune.train.errors import CheckpointError, DataError, TrainConfigError
from slimtune.train.trainer import Trainer, TrainingAborted, train

__all__ = ["CheckpointError", "DataError", "TrainConfig", "TrainConfigError", "Trainer", "TrainingAborted",
           "load_train_config", "train"]
