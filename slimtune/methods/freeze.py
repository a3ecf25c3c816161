"""Freeze tuning (LLaMA-Factory's `finetuning_type: freeze`): train only chosen transformer blocks.

    theta = theta_0 except every tensor of the chosen blocks (and of `extra` modules)
    params = sum of the chosen tensors' sizes

The blocks are the last N (`trainable_layers=N`, LLaMA-Factory's freeze_trainable_layers; N < 0: the
first -N), or exactly `layers`. `targets` narrows the tensors inside them to modules by name
(freeze_trainable_modules: ["mlp"], ["self_attn"]); `extra` adds modules outside the blocks trained
in full (freeze_extra_modules: ["norm"], ["embed_tokens"]). Structured and dense: the engine trains
copies of the chosen tensors (the base stays as it is, so a merge or `disabled()` is exact), saves
them under their own names and merges by writing them in. Memory: one extra copy of the chosen
tensors plus their optimizer state, nothing for the frozen blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError, TargetNotFoundError
from slimtune.methods._selective import base_tensors, in_saved, tied_names, under
from slimtune.methods.base import Method, PeftContext, Selection, register
from slimtune.targets import layer_index


@dataclass
class FreezeConfig(MethodConfig):
    """Freeze tuning. `layers` (block indices) overrides `trainable_layers`; `targets` / `exclude`
    pick modules inside the blocks by name (every tensor under a matching module)."""

    trainable_layers: int = 2  # N > 0: the last N blocks; N < 0: the first -N blocks
    extra: list[str] | None = None  # modules outside the blocks trained in full too, e.g. ["norm"]

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.trainable_layers, int) and not isinstance(self.trainable_layers, bool)
        check_field(ok and self.trainable_layers != 0, self, "trainable_layers",
                    "a non-zero int (N > 0: the last N blocks, N < 0: the first -N)")
        if isinstance(self.extra, str):
            self.extra = [self.extra]
        check_field(self.extra is None or (bool(self.extra) and all(isinstance(e, str) for e in self.extra)),
                    self, "extra", "None or a non-empty list of module names")
        if self.targets == "all-linear":
            raise ConfigError("FreezeConfig.targets='all-linear': expected module names inside the blocks, "
                              "e.g. ['mlp'] or ['self_attn'] (None: every tensor of the chosen blocks)")


def chosen_blocks(cfg: FreezeConfig, n_blocks: int) -> list[int]:
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if i >= n_blocks]
        if bad:
            raise ConfigError(f"FreezeConfig.layers={cfg.layers!r}: the model has blocks 0-{n_blocks - 1}")
        return list(cfg.layers)
    n = cfg.trainable_layers
    if abs(n) > n_blocks:
        raise ConfigError(f"FreezeConfig.trainable_layers={n}: the model has {n_blocks} blocks; "
                          f"expected 1 <= |N| <= {n_blocks}")
    return list(range(n_blocks - n, n_blocks)) if n > 0 else list(range(-n))


def _block_tensors(names: list[str], cfg: FreezeConfig, blocks: list[int]) -> list[str]:
    out = [n for n in names if layer_index(n) in blocks]
    if cfg.targets is not None:
        out = [n for n in out if under(n, cfg.targets)]
    if cfg.exclude:
        out = [n for n in out if not under(n, cfg.exclude)]
    return out


def _extra_tensors(names: list[str], cfg: FreezeConfig, model: nn.Module) -> list[str]:
    out = []
    for entry in cfg.extra or []:
        hits = [n for n in names if under(n, [entry])]
        if not hits:
            tops = sorted({n.rsplit(".", 1)[0] for n in names if layer_index(n) is None})
            raise TargetNotFoundError(f"FreezeConfig.extra: no module named {entry!r} with tensors in "
                                      f"{type(model).__name__}; modules outside the blocks: {', '.join(tops)}")
        out += hits
    return out


@register
class FreezeMethod(Method):
    name, config, shape = "freeze", FreezeConfig, "selective"
    category, params, paper = "selective", "sum of the chosen blocks' tensor sizes", "LLaMA-Factory freeze tuning"
    mergeable = True

    def select(self, model: nn.Module, cfg: FreezeConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        names = list(base_tensors(model))
        indices = [i for i in map(layer_index, names) if i is not None]
        if not indices:
            raise TargetNotFoundError(f"FreezeConfig: {type(model).__name__} has no numbered blocks "
                                      "('layers.3', 'h.3'); pick tensors with another selective method")
        blocks = chosen_blocks(cfg, max(indices) + 1)
        extra = _extra_tensors(names, cfg, model)
        tied = tied_names(model)
        if tied & set(extra):
            raise ConfigError(f"FreezeConfig.extra={cfg.extra!r}: {sorted(tied & set(extra))} are tied to other "
                              "modules (shared input / output embeddings), which selective methods cannot tune")
        picked = _block_tensors(names, cfg, blocks) + extra
        chosen = [n for n in dict.fromkeys(picked) if n not in tied and not in_saved(n, cfg)]
        if not chosen:
            raise TargetNotFoundError(f"FreezeConfig(targets={cfg.targets!r}, exclude={cfg.exclude!r}) picks no "
                                      f"tensor in blocks {blocks} of {type(model).__name__}")
        return [Selection(n) for n in chosen]

    def to_peft(self, cfg: FreezeConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for freeze: HF PEFT has no freeze tuning; save in slimtune's "
                                  "format (or merge it: slimtune merge)")
