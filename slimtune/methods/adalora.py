"""AdaLoRA: an SVD-shaped low-rank update whose rank budget is reallocated across layers in training.

AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR,
arXiv:2303.10512):
    y = base(x) + s * drop(x) @ (A * E).T @ B.T        delta_W = s * B diag(E) A
    A = Q: (r, d_in)   E = diag(Lambda): (r, 1)   B = P: (d_out, r)   s = alpha / (init_r + 1e-5)
(HF PEFT's scale, kept so files are interchangeable; it does not change when ranks are pruned.)
Init: E = 0 (identity at start), A, B ~ N(0, 0.02).
Regulariser: orth_reg_weight * mean over A, B of ||A A^T - I||_F and ||B^T B - I||_F.
Importance (after every optimizer step, gradients still there): I = |w * dL/dw| per entry,
    I_bar = beta1 I_bar + (1 - beta1) I      U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|
    score of triplet i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji),   s = I_bar * U_bar.
Budget (total kept ranks of the adapter): b_0 = sum of init ranks until tinit, then the cubic
    b(t) = b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3,  b_T = target_r * layers,
and b_T for the last tfinal steps; every deltaT steps the E entries outside the global top b(t) are zeroed.
Merge: W += delta_W. Saved with the kept ranks only (PEFT's `rank_pattern`), so files shrink.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import AdapterView, LayerAdapter, Method, PeftContext, factory, peft_target_fields, register
from slimtune.methods.lora import _add_low_rank, _LoraLinear

_EPS = 1e-5  # HF PEFT's ranknum offset in the scale


@dataclass
class AdaLoraConfig(MethodConfig):
    """AdaLoRA: y = base(x) + s * B diag(E) A x with a rank budget moved across layers in training.

    Args:
        init_r: rank of every layer at the start.
        target_r: average rank per layer after the budget schedule (the total is target_r * layers).
        alpha: numerator of the scale s = alpha / init_r.
        dropout: dropout on the adapter branch input only.
        total_step: optimizer steps of the run (required to shape the schedule).
        tinit / tfinal: steps at the full budget first / at the target budget last.
        delta_t: steps between two reallocations (PEFT's deltaT).
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser (0: none).
        rank_pattern: filled at save: {module name: [kept?] * init_r}; a loaded adapter keeps those ranks.
    """

    aliases = {**MethodConfig.aliases, "lora_alpha": "alpha", "lora_dropout": "dropout", "deltaT": "delta_t"}

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "delta_t"):
            check_field(_is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "an int >= 1")
        check_field(self.target_r <= self.init_r, self, "target_r", f"an int <= init_r={self.init_r}")
        check_field(_is_number(self.alpha) and self.alpha > 0, self, "alpha", "a number > 0")
        check_field(_is_number(self.dropout) and 0 <= self.dropout < 1, self, "dropout", "a float in [0, 1)")
        check_field(_is_int(self.total_step) and self.total_step >= 1, self, "total_step",
                    "the number of optimizer steps of the run (an int >= 1): the budget schedule needs it")
        for name in ("tinit", "tfinal"):
            check_field(_is_int(getattr(self, name)) and getattr(self, name) >= 0, self, name, "an int >= 0")
        check_field(self.tinit < self.total_step - self.tfinal, self, "tinit",
                    f"tinit < total_step - tfinal = {self.total_step - self.tfinal}, so the budget can shrink")
        for name in ("beta1", "beta2"):
            check_field(_is_number(getattr(self, name)) and 0 < getattr(self, name) < 1, self, name,
                        "a float in (0, 1)")
        check_field(_is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, self, "orth_reg_weight",
                    "a number >= 0")
        check_field(self.rank_pattern is None or (isinstance(self.rank_pattern, dict) and all(
            isinstance(v, list) and len(v) == self.init_r for v in self.rank_pattern.values())),
            self, "rank_pattern", f"a dict {{module name: list of init_r={self.init_r} bools}}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + _EPS)

    def kept(self, module_name: str) -> list[bool]:
        """Which of the init_r ranks module `module_name` has (all, unless a saved pattern says otherwise)."""
        pattern = (self.rank_pattern or {}).get(module_name)
        return [True] * self.init_r if pattern is None else [bool(v) for v in pattern]

    def resolve(self, module_name: str) -> AdaLoraConfig:
        """The config for one module: `rank_pattern` narrowed to that module's entry."""
        return self.replace(rank_pattern={module_name: self.kept(module_name)})

    @property
    def module_rank(self) -> int:
        """The rank of the one module a resolved config is for."""
        return sum(next(iter(self.rank_pattern.values()))) if self.rank_pattern else self.init_r


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class AdaLora(LayerAdapter):
    """AdaLoRA on a Linear or GPT-2 Conv1D: y = base(x) + s * drop(x) @ (A * E).T @ B.T."""

    peft_keys = {"A": "lora_A", "B": "lora_B", "E": "lora_E"}

    def __init__(self, base: nn.Module, cfg: AdaLoraConfig, rank: int, init: bool) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.zeros(rank, d_in, **kw))  # Q
        self.E = nn.Parameter(torch.zeros(rank, 1, **kw))  # Lambda, zero: identity at start
        self.B = nn.Parameter(torch.zeros(d_out, rank, **kw))  # P
        if init:
            nn.init.normal_(self.A, std=0.02)
            nn.init.normal_(self.B, std=0.02)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        # ranks the budget keeps, and the EMAs of sensitivity and uncertainty (not saved: training state)
        self.register_buffer("kept", torch.ones(rank, dtype=torch.bool, device=kw["device"]), persistent=False)
        for name in ("A", "E", "B"):
            self.register_buffer(f"_ipt_{name}", torch.zeros_like(getattr(self, name)), persistent=False)
            self.register_buffer(f"_unc_{name}", torch.zeros_like(getattr(self, name)), persistent=False)

    @property
    def rank(self) -> int:
        return self.E.shape[0]

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = x if self.drop is None else self.drop(x)
        h = h.to(self.A.dtype) @ (self.A * self.E).T  # (..., r)
        return _add_low_rank(base_out, h, self.B, self.scale)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Base and adapter in one autograd node (LoRA's kernel, with A * E as its A)."""
        W = kind_of(base).matmul_weight(base)
        if W is None or (self.drop is not None and self.training) or x.dtype != self.A.dtype or W.dtype != x.dtype:
            return None
        return _LoraLinear.apply(x, W, base.bias, self.A * self.E, self.B, self.scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.scale * (self.B @ (self.A * self.E))

    def export_tensors(self) -> dict[str, Tensor]:
        """Only the kept ranks (PEFT's `resize_state_dict_by_rank_pattern`)."""
        if bool(self.kept.all()):
            return dict(self.named_parameters())
        keep = self.kept
        return {"A": self.A[keep], "E": self.E[keep], "B": self.B[:, keep]}

    # -- the rank allocator's per-layer parts ------------------------------------------------------
    def update_importance(self, beta1: float, beta2: float) -> None:
        """EMA of |w * grad| and of its deviation, per entry of A, E, B."""
        for name in ("A", "E", "B"):
            update_importance(getattr(self, name), getattr(self, f"_ipt_{name}"), getattr(self, f"_unc_{name}"),
                              beta1, beta2)

    @torch.no_grad()
    def triplet_scores(self) -> Tensor:
        """(r,) score of each (A row, E entry, B column) triplet."""
        s_A, s_E, s_B = (getattr(self, f"_ipt_{n}") * getattr(self, f"_unc_{n}") for n in ("A", "E", "B"))
        return s_E.view(-1) + s_A.mean(1) + s_B.mean(0)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.E.masked_fill_(~self.kept[:, None], 0.0)

    @torch.no_grad()
    def reset_importance(self) -> None:
        for name in ("A", "E", "B"):
            getattr(self, f"_ipt_{name}").zero_()
            getattr(self, f"_unc_{name}").zero_()

    def orthogonality(self) -> list[Tensor]:
        """||A A^T - I||_F and ||B^T B - I||_F (each r x r)."""
        out = []
        for cov in (self.A @ self.A.T, self.B.T @ self.B):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            out.append(torch.linalg.matrix_norm(cov - eye))
        return out


@torch.no_grad()
def update_importance(p: Tensor, avg: Tensor, unc: Tensor, beta1: float, beta2: float) -> None:
    """One step of AdaLoRA's importance EMAs for parameter `p`, in place (nothing where `p` has no gradient):
    I = |p * grad|,  avg <- beta1 avg + (1 - beta1) I,  unc <- beta2 unc + (1 - beta2) |I - avg|."""
    if p.grad is None:
        return
    ipt = (p * p.grad).abs()
    avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
    unc.mul_(beta2).add_((ipt - avg).abs(), alpha=1 - beta2)


def budget(step: int, initial: int, target: int, cfg: AdaLoraConfig) -> tuple[int, bool]:
    """(total ranks allowed at optimizer step `step`, whether to mask now): PEFT's `budget_schedule`."""
    T, ti, tf = cfg.total_step, cfg.tinit, cfg.tfinal
    if step <= ti:
        return initial, False
    if step > T - tf:
        return target, True
    left = 1 - (step - ti) / (T - tf - ti)
    return int((initial - target) * left**3 + target), step % cfg.delta_t == 0


def mask_to_budget(layers: list[AdaLora], allowed: int) -> None:
    """Keep the `allowed` best-scoring triplets over all layers, zero the E of the others."""
    scores = torch.cat([m.triplet_scores().float().cpu() for m in layers])
    cut = scores.numel() - allowed
    if cut <= 0:
        return
    threshold = torch.kthvalue(scores, cut).values.item()
    for m in layers:
        m.kept.copy_(m.triplet_scores() > threshold)
        m.apply_mask()


# -- the method ---------------------------------------------------------------------------------------
@register
class AdaLoraMethod(Method):
    name, config, shape = "adalora", AdaLoraConfig, "layer"
    category, params, paper = "reparameterized", "init_r*(d_in+d_out+1)", "arXiv:2303.10512"
    mergeable, peft_type = True, "ADALORA"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: AdaLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return AdaLora(base, cfg, cfg.module_rank, init)

    def step(self, adapter: AdapterView, cfg: AdaLoraConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """PEFT's `update_and_allocate`: importance until the final phase, masks on the schedule,
        the final pattern fixed at step total_step - tfinal and re-applied afterwards."""
        layers = [m for m in adapter.layers.values() if isinstance(m, AdaLora)]
        if not layers:
            return
        final = cfg.total_step - cfg.tfinal
        if global_step > final:
            for m in layers:
                m.apply_mask()
            return
        for m in layers:
            m.update_importance(cfg.beta1, cfg.beta2)
        initial = sum(m.rank for m in layers)
        allowed, now = budget(global_step, initial, cfg.target_r * len(layers), cfg)
        if now or global_step == final:
            mask_to_budget(layers, allowed)
        if global_step == final:
            for m in layers:
                m.reset_importance()

    def regularizer(self, adapter: AdapterView, cfg: AdaLoraConfig) -> Tensor | None:
        if not cfg.orth_reg_weight or not adapter.layers:
            return None
        terms = [t for m in adapter.layers.values() for t in m.orthogonality()]
        return cfg.orth_reg_weight * torch.stack(terms).mean()

    def describe(self, adapter: AdapterView, cfg: AdaLoraConfig) -> str | None:
        kept = {n: int(m.kept.sum()) for n, m in adapter.layers.items()}
        if not kept:
            return None
        total = sum(m.rank for m in adapter.layers.values())
        return (f"ranks kept: {sum(kept.values())}/{total} (target {cfg.target_r * len(kept)}); "
                f"per module {min(kept.values())}-{max(kept.values())}")

    def saved_config(self, cfg: AdaLoraConfig, adapter: AdapterView) -> AdaLoraConfig:
        """The config with the kept ranks of every module (when the budget pruned any)."""
        pattern = dict(cfg.rank_pattern or {})
        for name, m in adapter.layers.items():
            if not bool(m.kept.all()):
                kept = iter(m.kept.tolist())
                pattern[name] = [next(kept) if was else False for was in cfg.kept(name)]
        return cfg.replace(rank_pattern=pattern or None)

    def to_peft(self, cfg: AdaLoraConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **ctx.common("ADALORA"),
            "r": 8,  # unused by PEFT's AdaLoRA (init_r is the rank)
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "fan_in_fan_out": "conv1d_gpt2" in ctx.target_kinds,
            "bias": "none",
            "modules_to_save": ctx.modules_to_save,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.delta_t,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_reg_weight,
            "total_step": cfg.total_step,
            "rank_pattern": {f"{k}.lora_E": v for k, v in cfg.rank_pattern.items()} if cfg.rank_pattern else None,
            "alpha_pattern": {},
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": False,
            "use_qalora": False,
        }

    def from_peft(self, data: dict[str, Any]) -> AdaLoraConfig:
        """Our config for an HF PEFT ADALORA adapter_config.json."""
        for flag in ("use_rslora", "use_dora", "lora_bias", "use_qalora"):
            if data.get(flag):
                raise NotImplementedError(f"PEFT AdaLoRA adapter with {flag}=true is not supported")
        if data.get("bias", "none") != "none":
            raise NotImplementedError(f"PEFT AdaLoRA adapter with bias={data['bias']!r} is not supported")
        pattern = data.get("rank_pattern") or None
        if pattern:
            pattern = {re.sub(r"\.lora_E(\.[^.]+)?$", "", k): [bool(v) for v in mask] for k, mask in pattern.items()}
        return config_from_dict({
            "method": "adalora",
            "init_r": int(data.get("init_r", 12)),
            "target_r": int(data.get("target_r", 8)),
            "alpha": float(data.get("lora_alpha", 8)),
            "dropout": float(data.get("lora_dropout", 0.0)),
            "total_step": data.get("total_step"),  # PEFT requires it too
            "tinit": int(data.get("tinit", 0)),
            "tfinal": int(data.get("tfinal", 0)),
            "delta_t": int(data.get("deltaT", 1)),
            "beta1": float(data.get("beta1", 0.85)),
            "beta2": float(data.get("beta2", 0.85)),
            "orth_reg_weight": float(data.get("orth_reg_weight", 0.5)),
            "rank_pattern": pattern,
            **peft_target_fields(data),
        })


__all__ = ["AdaLora", "AdaLoraConfig", "AdaLoraMethod", "budget", "mask_to_budget", "update_importance"]
