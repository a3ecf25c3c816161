"""Multi-task methods over several named adapters of one model: merging (task arithmetic, TIES, DARE, SVD)."""

from slimtune.multitask.merging import MERGE_METHODS, merge_adapters

__all__ = ["MERGE_METHODS", "merge_adapters"]
