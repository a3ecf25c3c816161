"""Multi-task methods over several named adapters of one model: merging (task arithmetic, TIES, DARE, SVD),
LoRAHub (gradient-free composition of LoRAs for a new task)."""

from slimtune.multitask.lorahub import LoraHubResult, lorahub
from slimtune.multitask.merging import MERGE_METHODS, merge_adapters

__all__ = ["MERGE_METHODS", "LoraHubResult", "lorahub", "merge_adapters"]
