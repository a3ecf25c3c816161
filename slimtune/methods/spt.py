"""SPT, sensitivity-aware parameter-efficient fine-tuning (He et al. 2023, arXiv:2303.08566): a budget
spent where the task's loss is most sensitive, as sparse entries or, where a weight matrix has many
sensitive entries, as a LoRA on that matrix.

    s_i = sum_b (dL_b / dtheta_i)^2      over the calibration batches b: the first-order Taylor estimate of
                                         the loss drop from one gradient step on entry i (the step size dropped)
    B   = density * (entries of the chosen tensors)                  the parameter budget
    S_t = {i : s_i >= t}                 the sensitive entries at score threshold t
    a weight matrix W of a linear module gets a LoRA when |S_t in W| >= threshold * r (d_in + d_out);
    cost(t) = sum over LoRA matrices of r (d_in + d_out) + |S_t| outside them; t: the lowest with cost <= B
    theta = theta_0 + sparse delta on S (outside the LoRA matrices) + s B A on the LoRA matrices

The sparse entries then fill the budget exactly: the top-(B - LoRA parameters) entries of the other tensors.
One method, both contract hooks: `find_targets` returns the LoRA modules and `build_layer` builds lora.py's
`Lora` on them; `select` returns the sparse masks of every other chosen tensor. Merge: both parts fold in.

Choosing the LoRA modules needs the calibration batches before the modules are built, so the config records
them (`lora_modules`, also what the saved config holds, so `st.load` wraps the same modules):

    cfg = spt.plan(base, SptConfig(density=0.01), batches)     # scores once, fills cfg.lora_modules
    model = st.attach(base, cfg, data=batches)                 # scores the other tensors, picks the entries

A config with `lora_modules` given (by plan, or by hand) runs only the second pass. The batches are read
once per pass: pass a list, not a one-shot iterator. Both passes run in eval mode (no dropout), streamed
as FishMask's (memory: one float32 copy of the scored tensors plus one gradient).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import base_kind
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError, TargetNotFoundError, did_you_mean
from slimtune.methods._selective import (
    base_tensors,
    budget,
    chosen_tensors,
    density_line,
    empirical_fisher,
    is_fraction,
    top_k,
)
from slimtune.methods.base import AdapterView, LayerAdapter, Method, PeftContext, Selection, register
from slimtune.methods.lora import Lora, LoraConfig
from slimtune.targets import base_modules


@dataclass
class SptConfig(MethodConfig):
    """SPT (module docstring). `targets` / `exclude` / `layers` pick the tensors scored (default
    "all-linear": the weights and biases of the linear layers except the output head)."""

    targets: str | list[str] | None = "all-linear"
    density: float = 0.01  # the budget: LoRA parameters + sparse entries, as a fraction of the chosen entries
    r: int = 8  # rank of the LoRAs (the paper: 8)
    alpha: float = 16.0  # LoRA scale numerator: s = alpha / r
    threshold: float = 0.1  # LoRA when sensitive entries >= threshold * r (d_in + d_out) (the authors' 1/alpha, 10)
    lora_modules: list[str] | None = None  # the modules that get a LoRA; None: chosen by plan() from the data

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.density), self, "density", "a fraction in (0, 1], e.g. 0.01")
        check_field(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, self, "r",
                    "an int >= 1, e.g. 8")
        check_field(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
                    self, "alpha", "a number > 0")
        check_field(is_fraction(self.threshold), self, "threshold", "a fraction in (0, 1], e.g. 0.1")
        if self.lora_modules is not None:
            check_field(isinstance(self.lora_modules, (list, tuple)) and
                        all(isinstance(m, str) for m in self.lora_modules), self, "lora_modules",
                        "a list of module names, or None (chosen from the calibration data)")
            self.lora_modules = list(dict.fromkeys(self.lora_modules))


# -- the allocation rule -----------------------------------------------------------------------------
def sensitivity(model: nn.Module, names: list[str], data: Iterable[dict]) -> dict[str, Tensor]:
    """s = sum over batches of the squared batch gradient, per entry of each tensor in `names` (streamed)."""
    return empirical_fisher(model, names, data, per_example=False)


def lora_sizes(model: nn.Module, names: list[str], r: int) -> dict[str, int]:
    """Tensor name -> parameters of a rank-r LoRA on its module, for the tensors a LoRA may replace: the
    weight of a linear module (Linear, GPT-2 Conv1D) where the LoRA is smaller than the matrix."""
    modules = dict(base_modules(model))
    out = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        kind = base_kind(modules[module_name]) if module_name in modules else None
        if attr == "weight" and kind is not None and kind.linear:
            d_in, d_out = kind.sizes(modules[module_name])
            if r * (d_in + d_out) < d_in * d_out:
                out[name] = r * (d_in + d_out)
    return out


def choose_lora(scores: dict[str, Tensor], sizes: dict[str, int], budget: int, threshold: float) -> list[str]:
    """The tensors (of `sizes`) that get a LoRA under the rule of the module docstring: at the lowest score
    threshold t whose cost fits `budget`. cost(t) only grows as t falls (a switch to LoRA costs at least the
    entries it replaces, as threshold <= 1), so t is found by bisection over the scores' float bits."""
    bits = {n: s.detach().float().contiguous().view(torch.int32) for n, s in scores.items()}  # scores >= 0

    def plan_at(t: int) -> tuple[int, list[str]]:
        counts = {n: int((b >= t).sum()) for n, b in bits.items()}
        lora = [n for n in sizes if n in counts and counts[n] >= threshold * sizes[n]]
        return sum(sizes[n] if n in lora else c for n, c in counts.items()), lora

    lo, hi = 0, 0x7F800000  # at +inf nothing is sensitive: cost 0
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan_at(mid)[0] <= budget else (mid + 1, hi)
    return plan_at(lo)[1]


def plan(model: nn.Module, cfg: SptConfig, data: Iterable[dict] | None) -> SptConfig:
    """`cfg` with `lora_modules` chosen from the sensitivity on `data` (unchanged when already given).

    Raises:
        ConfigError: no calibration data, or batches without labels.
        TargetNotFoundError: the config picks no tensor.
    """
    if cfg.lora_modules is not None:
        return cfg
    if data is None:
        raise ConfigError("SptConfig chooses what to train from gradients: pass calibration batches, "
                          "spt.plan(model, cfg, batches) / st.attach(model, cfg, data=batches)")
    names = chosen_tensors(model, cfg)
    sizes = lora_sizes(model, names, cfg.r)
    total = budget(cfg.density, sum(t.numel() for t in _tensors(model, names).values()))
    lora = choose_lora(sensitivity(model, names, data), sizes, total, cfg.threshold)
    return cfg.replace(lora_modules=[n.rpartition(".")[0] for n in lora])


def _tensors(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    params = base_tensors(model)
    return {n: params[n] for n in names}


@register
class SptMethod(Method):
    name, config, shape = "spt", SptConfig, "selective"
    category, params, paper = "selective", "<= density * entries of the chosen tensors (LoRAs + sparse entries)", \
        "arXiv:2303.08566"
    mergeable, needs_data = True, True

    def plan(self, model: nn.Module, cfg: SptConfig, data: Iterable[dict] | None) -> SptConfig:
        """The engine hook (when `TunedModel.add` calls it): `plan()` above."""
        return plan(model, cfg, data)

    def find_targets(self, model: nn.Module, cfg: SptConfig, skip: set[str]) -> list[str]:
        if cfg.lora_modules is None:
            raise ConfigError("SptConfig.lora_modules=None: SPT picks its LoRA modules from the calibration data "
                              "before the modules are built: cfg = spt.plan(model, cfg, batches), then "
                              "st.attach(model, cfg, data=batches)")
        modules = dict(base_modules(model))
        for name in cfg.lora_modules:
            kind = base_kind(modules[name]) if name in modules else None
            if kind is None or not kind.linear:
                raise TargetNotFoundError(f"SptConfig.lora_modules: {name!r} is not a linear module of "
                                          f"{type(model).__name__}." + did_you_mean(name, modules))
        return [n for n in cfg.lora_modules if n not in skip]

    def build_layer(self, base: nn.Module, cfg: SptConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Lora(base, LoraConfig(r=cfg.r, alpha=cfg.alpha), init)

    def select(self, model: nn.Module, cfg: SptConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """Sparse masks of every chosen tensor outside the LoRA modules: the top entries by sensitivity that
        fill the budget left by the LoRAs (init), or placeholders whose entries come from a file."""
        chosen = chosen_tensors(model, cfg)
        lora = {f"{m}.weight" for m in cfg.lora_modules or []}
        names = [n for n in chosen if n not in lora]
        if not init or not names:
            return [Selection(n, sparse=True) for n in names]
        tensors = _tensors(model, chosen)
        modules = dict(base_modules(model))
        lora_cost = sum(cfg.r * sum(base_kind(modules[m]).sizes(modules[m])) for m in cfg.lora_modules or [])
        left = budget(cfg.density, sum(t.numel() for t in tensors.values())) - lora_cost
        if left < 0:
            raise ConfigError(f"SptConfig.lora_modules: their LoRAs hold {lora_cost:,} parameters, over the budget of "
                              f"{left + lora_cost:,} (density={cfg.density}); raise density or list fewer modules")
        masks = top_k(sensitivity(model, names, data), min(left, sum(tensors[n].numel() for n in names)))
        return [Selection(n, masks[n]) for n in names]

    def saved_config(self, cfg: SptConfig, adapter: AdapterView) -> SptConfig:
        return cfg.replace(lora_modules=list(adapter.layers))  # the modules wrapped now, in model order

    def describe(self, adapter: AdapterView, cfg: SptConfig) -> str:
        leaves = Counter(n.rsplit(".", 1)[-1] for n in adapter.layers)
        lora = ", ".join(f"{leaf} x{c}" for leaf, c in leaves.most_common(3)) + (", ..." if len(leaves) > 3 else "")
        return (f"LoRA r={cfg.r} on {len(adapter.layers)} matrices" + (f" ({lora})" if lora else "")
                + "; sparse: " + density_line(adapter.selections))

    def to_peft(self, cfg: SptConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for spt: HF PEFT has no sparse + LoRA hybrid; save in slimtune's "
                                  "format (or merge it: slimtune merge)")


__all__ = ["SptConfig", "SptMethod", "choose_lora", "lora_sizes", "plan", "sensitivity"]
