"""FishMask (Sung et al. 2021, arXiv:2111.09839): train a fixed sparse mask of the entries with the
largest empirical Fisher information, chosen once before training.

    F_i = sum_n (d log p(y_n | x_n) / d theta_i)^2       over the calibration examples n
    mask = top-k entries of F,  k = density * (entries of the chosen tensors)
    theta = theta_0 + mask * delta                         params = k

`density` counts over all chosen tensors together (scope="global", the paper's choice: tensors
with more informative entries get more of the budget) or within each tensor (scope="per_tensor",
every tensor keeps at least one entry). The scores come from the batches given to
`st.attach(model, cfg, data=batches)` (`slimtune train` passes its first `train.calibration_batches`),
one backward pass per example (per_example=True, the paper's definition) or per batch (faster,
squared batch gradients). They are streamed: memory holds one float32 copy of the chosen tensors
plus one tensor's gradient, however many batches. The engine trains k values (optimizer state is
k-sized), saves `<tensor>.sparse_index` + `.sparse_values`, and merges by writing them into the base.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtune.config import MethodConfig, check_field
from slimtune.methods._selective import chosen_tensors, density_line, empirical_fisher, is_fraction, top_k_masks
from slimtune.methods.base import AdapterView, Method, PeftContext, Selection, register


@dataclass
class FishMaskConfig(MethodConfig):
    """FishMask. `targets` / `exclude` / `layers` pick the tensors scored (None: every base tensor
    except tied embeddings and `modules_to_save`; see methods/_selective.py)."""

    density: float = 0.005  # fraction of the chosen entries that train (the paper: 0.005, 0.001)
    scope: str = "global"  # "global": top-k over all chosen tensors together; "per_tensor": within each
    per_example: bool = True  # one backward per example (the paper's Fisher); False: per batch

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.density), self, "density", "a fraction in (0, 1], e.g. 0.005")
        check_field(self.scope in ("global", "per_tensor"), self, "scope", "'global' or 'per_tensor'")
        check_field(isinstance(self.per_example, bool), self, "per_example", "True or False")


def fisher_selections(model: nn.Module, cfg: MethodConfig, init: bool, data: Iterable[dict] | None,
                      density: float, scope: str, per_example: bool) -> list[Selection]:
    """Sparse selections of the top-Fisher entries (init), or placeholders whose entries come from a file."""
    names = chosen_tensors(model, cfg)
    if not init:
        return [Selection(n, sparse=True) for n in names]
    masks = top_k_masks(empirical_fisher(model, names, data, per_example), density, scope)
    return [Selection(n, masks[n]) for n in names]  # a tensor may keep 0 entries (global scope): saved empty


@register
class FishMaskMethod(Method):
    name, config, shape = "fishmask", FishMaskConfig, "selective"
    category, params, paper = "selective", "density * entries of the chosen tensors", "arXiv:2111.09839"
    mergeable, needs_data = True, True

    def select(self, model: nn.Module, cfg: FishMaskConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        return fisher_selections(model, cfg, init, data, cfg.density, cfg.scope, cfg.per_example)

    def describe(self, adapter: AdapterView, cfg: FishMaskConfig) -> str:
        return density_line(adapter.selections)

    def to_peft(self, cfg: FishMaskConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for fishmask: HF PEFT has no FishMask; save in slimtune's format "
                                  "(or merge it: slimtune merge)")
