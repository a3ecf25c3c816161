"""Registered PEFT methods: importing this package registers every method file."""

from slimtune.methods import lora  # noqa: F401
from slimtune.methods.base import METHODS, MethodInfo, register

__all__ = ["METHODS", "MethodInfo", "register"]
