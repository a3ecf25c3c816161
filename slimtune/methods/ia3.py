"""(IA)3: learned per-feature scales on the activations of frozen layers.

(IA)3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638, T-Few). One vector l per target, initialised to 1 (exactly the base):
    other targets (k_proj, v_proj):   y = l * base(x)        l: (d_out, 1)   the bias is scaled too
    feed-forward targets (down_proj):  y = base(l * x)        l: (1, d_in)
Merge: W' = diag(l) W, b' = l * b (output side); W' = W diag(l) (input side: folded in after the other
adapters of the layer, as it scales their input too). Unmerge divides by the l used at merge time,
keeping the rows / columns where l = 0. Parameters per module: d_out, or d_in on feed-forward targets.
l is stored in HF PEFT's shape, so `ia3_l` tensors load and save as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.base import LayerAdapter, Method, PeftContext, Selection, factory, peft_target_fields, register
from slimtune.targets import matches


@dataclass
class IA3Config(MethodConfig):
    """(IA)3: y = l * base(x), or y = base(l * x) on feed-forward targets; l starts at 1.

    Args:
        feedforward: which targets get their input scaled: module-name suffixes (a list), one regex
            or suffix (a string, matched like `targets`), True (every target) or None (none). Must
            name modules among the targets.
    """

    aliases = {**MethodConfig.aliases, "feedforward_modules": "feedforward"}

    feedforward: str | list[str] | bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, tuple):
            self.feedforward = list(self.feedforward)
        ff = self.feedforward
        check_field(ff is None or isinstance(ff, (bool, str, list)), self, "feedforward",
                    "module-name suffixes (a list), a regex string, True (every target) or None")
        if isinstance(ff, list):
            check_field(bool(ff) and all(isinstance(f, str) and f for f in ff), self, "feedforward",
                        "a non-empty list of module names (None: no feed-forward targets)")
            self._check_among_targets(ff)
        elif isinstance(ff, str):
            check_field(_compiles(ff), self, "feedforward", "a module-name suffix or a valid regex")

    def _check_among_targets(self, ff: list[str]) -> None:
        """With both given as lists: every entry must be able to name a module some target names."""
        if not isinstance(self.targets, list):
            return  # a regex or "all-linear": checked against the modules when the adapter is built
        outside = [f for f in ff if not any(f == t or f.endswith("." + t) or t.endswith("." + f)
                                            for t in self.targets)]
        check_field(not outside, self, "feedforward",
                    f"module names among targets={self.targets} ({outside[0]!r} is none of them)" if outside else "")

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the target `module_name` gets its input scaled."""
        ff = self.feedforward
        return ff if isinstance(ff, bool) else ff is not None and matches(module_name, ff)

    def resolve(self, module_name: str) -> IA3Config:
        """The config for one target: `feedforward` becomes True or False."""
        return replace(self, feedforward=self.is_feedforward(module_name))


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


class IA3(LayerAdapter):
    """l on a Linear or GPT-2 Conv1D: scales the output (l: (d_out, 1)) or, feed-forward, the input (l: (1, d_in))."""

    peft_keys = {"l": "ia3_l"}

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        self.transforms_input = feedforward
        self.l = nn.Parameter(torch.ones((1, d_in) if feedforward else (d_out, 1), **factory(base)))
        self._merged: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if self.transforms_input:
            return base_out
        return (base_out * self.l.view(-1)).to(base_out.dtype)

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        return (x * self.l.view(-1)).to(x.dtype)

    # -- merging: multiplicative, so through the weight itself -------------------------------------
    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind, bias = kind_of(base), _bias(base)
        W = kind.weight(base)  # (d_out, d_in)
        l = self.l.detach().clone()
        dim = 1 if self.transforms_input else 0
        dead = (l.view(-1) == 0).nonzero().view(-1)  # W * 0 cannot be divided back: keep those slices
        kept_b = None if bias is None or dim else bias.index_select(0, dead).clone()
        self._merged = (l, dead, W.index_select(dim, dead).clone(), kept_b)
        kind.write_weight(base, W * l.to(W.dtype))
        if bias is not None and not dim:
            bias.mul_(l.view(-1).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self._merged is None:
            return
        (l, dead, kept_W, kept_b), self._merged = self._merged, None
        kind, bias = kind_of(base), _bias(base)
        W = kind.weight(base)
        safe = torch.where(l == 0, torch.ones_like(l), l)
        dim = 1 if self.transforms_input else 0
        kind.write_weight(base, (W / safe.to(W.dtype)).index_copy(dim, dead, kept_W.to(W.dtype)))
        if kept_b is not None:
            bias.copy_((bias / safe.view(-1).to(bias.dtype)).index_copy(0, dead, kept_b))

    # -- mixed batches: output scales of one dtype in one broadcast multiply ---------------------------
    @property
    def route_key(self) -> tuple | None:
        return None if self.transforms_input else ("ia3", self.l.dtype)

    @staticmethod
    def stack(adapters: list[IA3]) -> Tensor:
        """(k, d_out): one row of output scales per adapter."""
        return torch.stack([a.l.view(-1) for a in adapters])

    @staticmethod
    def forward_rows(stacks: Tensor, x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        """Row i of the batch gets the scales of adapter slot[i] (None: slot i is row i)."""
        scales = stacks if slot is None else stacks.index_select(0, slot)
        scales = scales.view(scales.shape[0], *(1,) * (base_out.dim() - 2), scales.shape[1])
        return (base_out * scales).to(base_out.dtype)


def _bias(base: nn.Module) -> Tensor | None:
    """The base's own bias tensor (not a selective method's view of it), or None."""
    return base._parameters.get("bias")


# -- the method ---------------------------------------------------------------------------------------
@register
class IA3Method(Method):
    name, config, shape = "ia3", IA3Config, "layer"
    category, params, paper = "additive", "d_out (d_in on feed-forward targets)", "arXiv:2205.05638"
    mergeable, peft_type = True, "IA3"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: IA3Config, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        """`cfg` is resolved for this module: `cfg.feedforward` is True or False."""
        return IA3(base, feedforward=cfg.feedforward is True)

    def select(self, model: nn.Module, cfg: IA3Config, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """Nothing to select; checks, with every target known, that `feedforward` names some of them."""
        _check_feedforward_hits(cfg, targets)
        return []

    def to_peft(self, cfg: IA3Config, ctx: PeftContext) -> dict[str, Any]:
        feedforward = [t for t in ctx.targets if cfg.is_feedforward(t)]
        target_modules, feedforward_modules = _peft_lists(ctx, feedforward)
        return {
            **ctx.common("IA3"),
            "auto_mapping": None,
            "target_modules": target_modules,
            "exclude_modules": None,
            "feedforward_modules": feedforward_modules,
            "fan_in_fan_out": "conv1d_gpt2" in ctx.target_kinds,
            "modules_to_save": ctx.modules_to_save,
            "init_ia3_weights": True,
        }

    def from_peft(self, data: dict[str, Any]) -> IA3Config:
        """Our config for an HF PEFT IA3 adapter_config.json.

        PEFT takes a target as feed-forward when its name ends with a `feedforward_modules` entry, with or
        without a '.' before it; ours needs the '.', as `targets` do. The two differ only for an entry that
        ends a target's name mid-segment ("proj" for "q_proj"), which PEFT's own configs never use.
        """
        ff = data.get("feedforward_modules")
        if ff is None:
            raise NotImplementedError("PEFT IA3 adapter without feedforward_modules: PEFT picks them per "
                                      "architecture; write them into adapter_config.json")
        if isinstance(ff, (list, set, tuple)):
            ff = sorted(ff) or None
        return config_from_dict({
            "method": "ia3",
            **peft_target_fields(data),
            "feedforward": ff,
        })


def _check_feedforward_hits(cfg: IA3Config, targets: list[str]) -> None:
    """Every feedforward entry (or the regex) must pick at least one target; entries that are themselves
    `targets` entries are as lenient as targets are (they may match nothing in this model)."""
    ff = cfg.feedforward
    if ff is None or isinstance(ff, bool):
        return
    listed = set(cfg.targets) if isinstance(cfg.targets, list) else set()
    entries = [(ff, ff)] if isinstance(ff, str) else [(f, [f]) for f in ff]
    for entry, pattern in entries:
        if entry not in listed and not any(matches(t, pattern) for t in targets):
            leaves = sorted({t.split(".")[-1] for t in targets})
            raise ConfigError(f"IA3Config.feedforward={ff!r}: {entry!r} matches none of the {len(targets)} target "
                              f"modules; expected feed-forward modules among the targets ({', '.join(leaves)})")


def _peft_lists(ctx: PeftContext, feedforward: list[str]) -> tuple[list[str] | None, list[str] | str]:
    """(target_modules, feedforward_modules) for PEFT, which takes a target as feed-forward when its name
    ends with an entry ('.' or not): the names `target_modules` uses where they pick exactly `feedforward`,
    else full names for both (BERT's `attention.output.dense` / `output.dense`), else an exact regex."""
    names = ctx.peft_names(feedforward)
    if _peft_feedforward(ctx.targets, names) == set(feedforward):
        return ctx.target_modules, names
    names = sorted(feedforward)
    if _peft_feedforward(ctx.targets, names) == set(feedforward):
        return sorted(ctx.targets), names
    return sorted(ctx.targets), "|".join(re.escape(n) for n in names)  # PEFT: re.fullmatch on the name


def _peft_feedforward(targets: list[str], names: list[str]) -> set[str]:
    return {t for t in targets if any(t.endswith(n) for n in names)}


__all__ = ["IA3", "IA3Config", "IA3Method"]
