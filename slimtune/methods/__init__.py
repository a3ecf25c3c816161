"""Registered PEFT methods: importing this package registers every method file."""

from slimtune.methods import (  # noqa: F401
    adalora,
    bitfit,
    dylora,
    fourierft,
    hra,
    ia3,
    loha_lokr,
    lora,
    oft,
    prompt_tuning,
    sora,
    vera,
)
from slimtune.methods.base import METHODS, InputAdapter, LayerAdapter, Method, MethodInfo, Selection, register

__all__ = ["METHODS", "InputAdapter", "LayerAdapter", "Method", "MethodInfo", "Selection", "register"]
