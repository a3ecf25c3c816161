"""The method contract and the registry.

A *layer method* is an `nn.Module` built as `build(base, cfg)` for one wrapped base module:

    forward(x, base_out, base) -> out          what the wrapped module now computes
    delta_weight(base) -> Tensor   (optional)  additive merge: W += delta   (base's layout)
    merge(base) / unmerge(base)    (optional)  non-additive merges (DoRA)
    frozen: set[str]                            parameter names that never train (LoRA-FA's A)
    peft_keys: dict[str, str]                   our tensor name -> HF PEFT's suffix on disk

The engine (layer.py / tuned.py) owns adapter names, the active set, routing, merge bookkeeping
and saving; a method never sees an adapter name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from slimtune.config import MethodConfig, register_config


class LayerMethod(Protocol):
    frozen: set[str]
    peft_keys: dict[str, str]

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor: ...


@dataclass(frozen=True)
class MethodInfo:
    """What `slimtune methods` prints about a registered method."""

    name: str
    config: type[MethodConfig]
    build: Callable[[nn.Module, MethodConfig], nn.Module]
    category: str
    params: str
    paper: str
    mergeable: bool
    peft_type: str | None = None


METHODS: dict[str, MethodInfo] = {}


def register(
    name: str,
    config: type[MethodConfig],
    *,
    category: str,
    params: str,
    paper: str,
    mergeable: bool,
    peft_type: str | None = None,
) -> Callable:
    """Decorator on a builder `build(base, cfg) -> nn.Module` that registers a method."""

    def wrap(build: Callable) -> Callable:
        register_config(name, config)
        METHODS[name] = MethodInfo(name, config, build, category, params, paper, mergeable, peft_type)
        return build

    return wrap
