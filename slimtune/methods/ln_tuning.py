"""LN-tuning (Qi et al. 2022, arXiv:2211.08682; Zhao et al. 2024, arXiv:2312.11420 for multimodal
LLMs): train only the gains and biases of the normalisation layers.

    LN(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b      RMSNorm(x) = g * x / rms(x)
    theta = theta_0 except g, b of the chosen norms;        params = sum of their sizes (2d per LayerNorm)

Every LayerNorm / RMSNorm / GroupNorm (and HF's *LayerNorm / *RMSNorm classes) by default; `targets`
narrows by module name (Zhao et al. tune the attention norms: targets=["input_layernorm"]). Dense
selections: the engine trains copies of the chosen tensors and merges by writing them in.

HF PEFT's LN_TUNING keeps a trained copy of each norm module, saved as `<norm>.ln_tuning_layers.weight`
(and `.bias`); `selection_key` writes and reads our tensors under those names, so
`save(format="peft")` loads in PEFT and PEFT's files load here, with the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtune.config import MethodConfig, config_from_dict
from slimtune.errors import TargetNotFoundError
from slimtune.methods._selective import in_saved, tied_names
from slimtune.methods.base import Method, PeftContext, Selection, peft_target_fields, register
from slimtune.targets import base_modules, narrow

PEFT_PART = "ln_tuning_layers"  # HF PEFT's module holding the trained copy


@dataclass
class LnTuningConfig(MethodConfig):
    """LN-tuning. `targets` (None: every norm layer), `exclude` and `layers` pick the norms whose
    gains and biases train, matched as for every method."""


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm and HF's own norm classes (LlamaRMSNorm, T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) and "weight" in module._parameters


def norm_modules(model: nn.Module) -> list[str]:
    return [n for n, m in base_modules(model) if is_norm(m)]


def chosen_norms(model: nn.Module, cfg: LnTuningConfig) -> list[str]:
    norms = norm_modules(model)
    chosen = narrow(norms, cfg)
    if not chosen:
        leaves = ", ".join(sorted({n.split(".")[-1] for n in norms})) or "none"
        raise TargetNotFoundError(f"LnTuningConfig(targets={cfg.targets!r}, layers={cfg.layers!r}) selects no norm "
                                  f"layer in {type(model).__name__}; norm layers here: {leaves}")
    return chosen


@register
class LnTuningMethod(Method):
    name, config, shape = "ln_tuning", LnTuningConfig, "selective"
    category, params, paper = "selective", "sum of the chosen norms' gains and biases", "arXiv:2211.08682"
    mergeable, peft_type = True, "LN_TUNING"

    def select(self, model: nn.Module, cfg: LnTuningConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        tied = tied_names(model)
        out = []
        for norm in chosen_norms(model, cfg):
            module = model.get_submodule(norm)
            for attr, p in module._parameters.items():
                name = f"{norm}.{attr}"
                if p is not None and p.is_floating_point() and name not in tied and not in_saved(name, cfg):
                    out.append(Selection(name))
        return out

    def selection_key(self, name: str) -> str:
        """'model.norm.weight' -> 'model.norm.ln_tuning_layers.weight', as HF PEFT names it."""
        module, _, attr = name.rpartition(".")
        return f"{module}.{PEFT_PART}.{attr}"

    def to_peft(self, cfg: LnTuningConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **ctx.common("LN_TUNING"),
            "auto_mapping": None,
            "target_modules": peft_targets(ctx.model, chosen_norms(ctx.model, cfg)),
            "exclude_modules": None,
            "modules_to_save": ctx.modules_to_save,
        }

    def from_peft(self, data: dict[str, Any]) -> LnTuningConfig:
        fields = peft_target_fields(data)
        fields.pop("layers")  # PEFT's LN_TUNING has no layers_to_transform
        return config_from_dict({"method": "ln_tuning", **fields})


def peft_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """Leaf names when they pick exactly the chosen norms among all modules (PEFT matches any module
    by name suffix), else the full names."""
    leaves = sorted({n.split(".")[-1] for n in chosen})
    picked = {n for n, _ in base_modules(model) if n.split(".")[-1] in leaves}
    return leaves if picked == set(chosen) else sorted(chosen)
