"""Registered PEFT methods: importing this package registers every method file."""

from slimtune.methods import adalora, bitfit, fourierft, hra, ia3, loha_lokr, lora, oft, prompt_tuning, vera  # noqa: F401
from slimtune.methods.base import METHODS, InputAdapter, LayerAdapter, Method, MethodInfo, Selection, register

__all__ = ["METHODS", "InputAdapter", "LayerAdapter", "Method", "MethodInfo", "Selection", "register"]
