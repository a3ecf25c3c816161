"""Child-tuning (Xu et al. 2021, arXiv:2109.05687): update only a "child network" of the weights.

    w <- w - lr * update(dL/dw * M)

- Child-Tuning_D (`child_tuning_d`, task-driven): M is fixed, the top `density` of the entries by
  Fisher information on the task data, F_i = sum_n (dL_n/dw_i)^2 (computed as for FishMask, by
  default from batch gradients as the paper's code does). The engine then trains only those
  entries: sparse storage (index + values), k-sized optimizer state.
- Child-Tuning_F (`child_tuning_f`, task-free): the chosen tensors train in full (dense selections),
  and each optimizer step masks their gradient with M ~ Bernoulli(p), scaled by 1/p so that
  E[g * M / p] = g. The mask is a gradient hook on the trained values, drawn from a generator seeded
  by (seed, optimizer step, tensor name): deterministic, the same on every data-parallel rank and
  for every micro-batch of one step (gradient accumulation), and redrawn when `model.step()` runs.
  The hook is armed by `model.regularization_loss()` (st.Trainer calls it on every forward; with HF
  Trainer or a plain loop add it to the loss as for every method, it is None here) or, at the
  latest, by the first `model.step()` (then step 1 ran unmasked, and a warning says so).

Unlike the paper's ChildTuningAdamW, weight decay reaches only the child entries (D) or the chosen
tensors (F): the engine keeps every other entry bit for bit. Merge: the tuned values are written in.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.methods._selective import chosen_tensors, density_line, is_fraction
from slimtune.methods.base import AdapterView, Method, PeftContext, Selection, register
from slimtune.methods.fishmask import fisher_selections


@dataclass
class ChildTuningDConfig(MethodConfig):
    """Child-Tuning_D. `targets` / `exclude` / `layers` pick the tensors scored (None: every base
    tensor except tied embeddings and `modules_to_save`); the paper scores the encoder blocks
    (`layers="0-11"` on BERT-base) and trains the new classifier in full (`modules_to_save`)."""

    density: float = 0.3  # p_D: fraction of the chosen entries in the child network (paper: 0.1-0.3)
    per_example: bool = False  # True: per-example squared gradients (FishMask's Fisher); False: per batch

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.density), self, "density", "a fraction in (0, 1], e.g. 0.3")
        check_field(isinstance(self.per_example, bool), self, "per_example", "True or False")


@dataclass
class ChildTuningFConfig(MethodConfig):
    """Child-Tuning_F. `targets` / `exclude` / `layers` pick the tensors trained (None: every base
    tensor except tied embeddings and `modules_to_save`)."""

    p: float = 0.3  # p_F: probability that a gradient entry is kept in a step (paper: 0.2-0.4)
    seed: int = 0  # of the per-step masks

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.p), self, "p", "a probability in (0, 1], e.g. 0.3")
        check_field(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, self,
                    "seed", "an int >= 0")


@register
class ChildTuningDMethod(Method):
    name, config, shape = "child_tuning_d", ChildTuningDConfig, "selective"
    category, params, paper = "selective", "density * entries of the chosen tensors", "arXiv:2109.05687"
    mergeable, needs_data = True, True

    def select(self, model: nn.Module, cfg: ChildTuningDConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        return fisher_selections(model, cfg, init, data, cfg.density, "global", cfg.per_example)

    def describe(self, adapter: AdapterView, cfg: ChildTuningDConfig) -> str:
        return density_line(adapter.selections)

    def to_peft(self, cfg: MethodConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for child_tuning_d: HF PEFT has no child-tuning; save in "
                                  "slimtune's format (or merge it: slimtune merge)")


class GradientMask:
    """The gradient hook of one tensor: g -> g * M / p, M ~ Bernoulli(p) drawn for the current step."""

    def __init__(self, values: nn.Parameter, p: float, seed: int, name: str) -> None:
        self.values, self.p, self.step = values, p, 0
        self.base_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62
        self.handle = values.register_hook(self)

    def mask(self, shape: torch.Size, device: torch.device) -> Tensor:
        g = torch.Generator(device=device).manual_seed(self.base_seed + 7919 * self.step)
        return torch.rand(shape, generator=g, device=device) < self.p

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.mask(grad.shape, grad.device).to(grad.dtype) / self.p


_MASKS: weakref.WeakKeyDictionary[nn.Module, GradientMask] = weakref.WeakKeyDictionary()


def arm(adapter: AdapterView, cfg: ChildTuningFConfig) -> list[GradientMask]:
    """Install (once; again if the values tensor was replaced) the gradient hook of every tensor."""
    out = []
    for name, entries in adapter.selections.items():
        hook = _MASKS.get(entries)
        if hook is None or hook.values is not entries.values:
            if hook is not None:
                hook.handle.remove()
            hook = _MASKS[entries] = GradientMask(entries.values, cfg.p, cfg.seed, name)
        out.append(hook)
    return out


@register
class ChildTuningFMethod(Method):
    name, config, shape = "child_tuning_f", ChildTuningFConfig, "selective"
    category, params, paper = "selective", "entries of the chosen tensors (dense)", "arXiv:2109.05687"
    mergeable = True

    def select(self, model: nn.Module, cfg: ChildTuningFConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        return [Selection(n) for n in chosen_tensors(model, cfg)]

    def attached(self, adapter: AdapterView, cfg: ChildTuningFConfig) -> None:
        """The gradient masks live as long as the adapter: every backward of a step gets that step's mask."""
        arm(adapter, cfg)

    def step(self, adapter: AdapterView, cfg: ChildTuningFConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """Draw the next step's masks (re-arming tensors replaced since, e.g. by a load)."""
        for hook in arm(adapter, cfg):
            hook.step = global_step

    def to_peft(self, cfg: MethodConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for child_tuning_f: HF PEFT has no child-tuning; save in "
                                  "slimtune's format (or merge it: slimtune merge)")
