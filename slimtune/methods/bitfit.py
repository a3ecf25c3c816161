"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199): train only the bias terms.

    theta = theta_0 everywhere except b_l for the chosen layers l;   params = sum_l |b_l|

All biases by default; `targets` narrows to the modules whose bias trains (the paper's ablation
trains only the query and the second MLP layer's biases: targets=["query", "output.dense"] on
BERT). Pair with `modules_to_save=["classifier"]` to train a new head, as the paper does.
The engine trains copies of the chosen biases (the base tensors stay as they were) and saves
only them; merging writes them into the base.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtune.config import MethodConfig
from slimtune.errors import TargetNotFoundError
from slimtune.layer import base_parameters
from slimtune.methods.base import Method, PeftContext, Selection, register
from slimtune.targets import narrow


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit. `targets` (None: every module with a bias), `exclude` and `layers` pick the modules
    whose biases train, matched as for every method."""


@register
class BitFitMethod(Method):
    name, config, shape = "bitfit", BitFitConfig, "selective"
    category, params, paper = "selective", "sum of the chosen biases' sizes", "arXiv:2106.10199"
    mergeable = True

    def select(self, model: nn.Module, cfg: BitFitConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        owners = [n.removesuffix(".bias") for n, _ in base_parameters(model) if n.endswith(".bias")]
        chosen = narrow(owners, cfg)
        if not chosen:
            leaves = ", ".join(sorted({o.split(".")[-1] for o in owners}))
            where = f"; modules with a bias here: {leaves}" if owners else ""
            raise TargetNotFoundError(f"BitFitConfig(targets={cfg.targets!r}, layers={cfg.layers!r}) selects no bias "
                                      f"in {type(model).__name__}" + (where or " (its layers have no biases)"))
        return [Selection(o + ".bias") for o in chosen]

    def to_peft(self, cfg: BitFitConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for bitfit: HF PEFT has no BitFit; save in slimtune's format "
                                  "(or merge it: slimtune merge)")
