"""Registered PEFT methods: importing this package registers every method file."""

from slimtune.methods import bitfit, ia3, lora, prompt_tuning  # noqa: F401
from slimtune.methods.base import METHODS, InputAdapter, LayerAdapter, Method, MethodInfo, Selection, register

__all__ = ["METHODS", "InputAdapter", "LayerAdapter", "Method", "MethodInfo", "Selection", "register"]
