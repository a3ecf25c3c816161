"""SoRA: a LoRA whose ranks are switched off by a gate trained with an L1 proximal step.

SoRA (Ding et al. 2023, EMNLP, "Sparse Low-rank Adaptation of Pre-trained Language Models",
arXiv:2311.11696):
    y = base(x) + s * drop(x) @ A.T @ (B * g).T  =  base(x) + s * B (g * (A x))      g: (r,), init 1
After every optimizer step the gate gets the proximal step of an L1 penalty lambda * |g|_1:
    g <- sign(g) * max(|g| - eta * lambda, 0)
eta: the learning rate of the optimizer param group holding g (config `gate_lr` when model.step gets
no optimizer, or one without the gates); lambda: `sparsity`, optionally warmed up linearly over
`sparsity_warmup` steps. A, B and g otherwise train as usual. The authors' code runs AdamW on g and then
thresholds by a fixed xi per step (their `sparse_lambda_2`): here xi = lr * lambda, so lambda = xi / lr.
Init A kaiming-uniform, B = 0, g = 1: identity at start. Merge: W += s * (B * g) @ A.
Saving prunes: ranks with g_i = 0 are dropped and g is folded into B, so the file is a plain LoRA
(method "lora") with per-module ranks (rank_pattern) and the same per-module scales (alpha_pattern);
it loads with st.load or HF PEFT as any LoRA. A module whose gates are all zero is saved as a rank-1
LoRA with B = 0 (it adds nothing; A keeps its first row so the LoRA can still train).
Parameters per module: r * (d_in + d_out) + r while training.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.config import check_field
from slimtune.errors import ConfigError
from slimtune.methods.base import AdapterView, LayerAdapter, factory, register
from slimtune.methods.lora import Lora, LoraConfig, LoraMethod


@dataclass
class SoraConfig(LoraConfig):
    """SoRA: LoRA of rank r (the maximum) with a gate per rank, sparsified by an L1 proximal step.

    Paper: Ding et al. 2023, arXiv:2311.11696. Linear and GPT-2 Conv1D targets. LoraConfig's fields
    apply (r, alpha, dropout, rslora, bias, freeze_A, rank_pattern, alpha_pattern), except init (only
    "default" or "gaussian").

    Args:
        sparsity: lambda, the L1 weight of the gates; the threshold per step is lr * lambda. With AdamW a gate
            moves by about lr per step, so lambda must be a sizeable fraction of 1 to prune within a run; the
            authors' GLUE runs (a fixed threshold of 3e-4 at lr 8e-4) correspond to lambda ~ 0.4.
        sparsity_warmup: steps over which lambda rises linearly from 0 (0: full lambda from step 1).
        gate_lr: eta for the proximal step when model.step() gets no optimizer or one without the gates
            (None: such a call is an error).
    """

    sparsity: float = 0.4
    sparsity_warmup: int = 0
    gate_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.init in ("default", "gaussian"), self, "init",
                    "'default' or 'gaussian' (PiSSA/OLoRA inits are not implemented for SoRA)")
        check_field(_is_number(self.sparsity) and math.isfinite(self.sparsity) and self.sparsity >= 0, self,
                    "sparsity", "a finite number >= 0, e.g. 0.4")
        check_field(isinstance(self.sparsity_warmup, int) and not isinstance(self.sparsity_warmup, bool)
                    and self.sparsity_warmup >= 0, self, "sparsity_warmup", "an int >= 0 (steps)")
        check_field(self.gate_lr is None or (_is_number(self.gate_lr) and self.gate_lr > 0), self, "gate_lr",
                    "None or a number > 0")

    def lambda_at(self, step: int) -> float:
        """lambda after optimizer step `step` (1 after the first)."""
        if self.sparsity_warmup == 0:
            return float(self.sparsity)
        return float(self.sparsity) * min(1.0, step / self.sparsity_warmup)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@torch.no_grad()
def proximal_l1_(g: Tensor, threshold: float) -> None:
    """In place: g <- sign(g) * max(|g| - threshold, 0) (soft thresholding)."""
    g.copy_(g.sign() * (g.abs() - threshold).clamp_min(0))


class Sora(Lora):
    """SoRA on a Linear or GPT-2 Conv1D: LoRA with B's columns scaled by the gate g."""

    peft_keys = {**Lora.peft_keys, "g": "sora_gate"}  # g lives in memory only: files hold the pruned LoRA

    def __init__(self, base: nn.Module, cfg: SoraConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        self.g = nn.Parameter(torch.ones(cfg.r, **factory(base)))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.A, self.B * self.g, self.scale  # B diag(g): (d_out, r)

    def kept(self) -> Tensor:
        """Indices of the ranks whose gate is not zero."""
        return (self.g != 0).nonzero().flatten()

    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """The pruned plain LoRA: kept rows of A, kept columns of B * g (rank 1 with B = 0 if none is kept)."""
        keep = self.kept()
        if keep.numel() == 0:
            return {"A": self.A[:1].clone(), "B": torch.zeros_like(self.B[:, :1])}
        if keep.numel() == self.r:
            return {"A": self.A.clone(), "B": self.B * self.g}
        return {"A": self.A[keep], "B": (self.B * self.g)[:, keep]}


# -- the method ---------------------------------------------------------------------------------------
@register
class SoraMethod(LoraMethod):
    name, config = "sora", SoraConfig
    params, paper = "r*(d_in+d_out)+r", "arXiv:2311.11696"
    peft_type = None  # PEFT has no SoRA; the saved (pruned) file is a PEFT LORA
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: SoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Sora(base, cfg, init)

    def step(self, adapter: AdapterView, cfg: SoraConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """The proximal L1 step on every gate, with eta = the lr of the param group holding it."""
        lam = cfg.lambda_at(global_step)
        if lam == 0:
            return
        lrs = {id(p): group["lr"] for group in (optimizer.param_groups if optimizer else []) for p in group["params"]}
        for name, layer in adapter.layers.items():
            lr = lrs.get(id(layer.g), cfg.gate_lr)
            if lr is None:
                got = "an optimizer without" if optimizer else "no optimizer for"
                raise ConfigError(f"SoraConfig.gate_lr=None: model.step() got {got} the gate of {name}; pass the "
                                  "optimizer that trains the gates (model.step(step, optimizer)) or set gate_lr")
            proximal_l1_(layer.g, float(lr) * lam)

    def describe(self, adapter: AdapterView, cfg: SoraConfig) -> str:
        """'ranks kept: 37/64 (q_proj 10/16, v_proj 27/48)', grouped by module leaf name."""
        per_leaf: dict[str, list[int]] = {}
        for name, layer in adapter.layers.items():
            counts = per_leaf.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            counts[0] += int((layer.g != 0).sum())
            counts[1] += layer.g.numel()
        kept, total = sum(c[0] for c in per_leaf.values()), sum(c[1] for c in per_leaf.values())
        detail = ", ".join(f"{leaf} {k}/{n}" for leaf, (k, n) in per_leaf.items())
        return f"ranks kept: {kept}/{total} ({detail})"

    def saved_config(self, cfg: SoraConfig, adapter: AdapterView) -> LoraConfig:
        """The pruned plain LoRA: per-module ranks = gates kept, alphas giving each module its SoRA scale."""
        ranks = {name: max(int(layer.kept().numel()), 1) for name, layer in adapter.layers.items()}
        alphas = {name: _alpha_for(cfg.resolve(name), k) for name, k in ranks.items()}
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else cfg.r
        alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else cfg.alpha
        lora = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{
            **lora, "r": r, "alpha": alpha,
            "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r} or None,
            "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha} or None,
        })


def _alpha_for(cfg: SoraConfig, k: int) -> float:
    """The LoRA alpha that gives rank k the scale this module has at its SoRA rank (alpha / r or alpha / sqrt(r))."""
    if k == cfg.r:
        return cfg.alpha  # unchanged: the saved scale is bit-identical
    return cfg.scale * (math.sqrt(k) if cfg.rslora else k)


__all__ = ["Sora", "SoraConfig", "SoraMethod", "proximal_l1_"]
