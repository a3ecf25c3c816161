"""Registered PEFT methods: importing this package registers every method file."""

from slimtune.methods import (  # noqa: F401
    adalora,
    adamix,
    adapters,
    adaption_prompt,
    aflora,
    bitfit,
    child_tuning,
    compacter,
    diff_pruning,
    dylora,
    fishmask,
    fourierft,
    freeze,
    hra,
    hybrid,
    ia3,
    ln_tuning,
    loha_lokr,
    lora,
    lora_sp,
    lt_sft,
    oft,
    p_tuning,
    pasta,
    periodic_lora,
    prefix_tuning,
    prompt_tuning,
    sora,
    spt,
    ssf,
    trainable_tokens,
    vera,
)
from slimtune.methods.base import METHODS, InputAdapter, LayerAdapter, Method, MethodInfo, Selection, register

__all__ = ["METHODS", "InputAdapter", "LayerAdapter", "Method", "MethodInfo", "Selection", "register"]
