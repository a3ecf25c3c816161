"""AFLoRA: a LoRA path with a vector after each projection; the projections are frozen module by module.

AFLoRA (Liu et al. 2024, ACL short, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter
Efficient Fine-Tuning of Large Models", arXiv:2403.13269):
    y = base(x) + diag(b) B diag(d) A drop(x)       A: (r, d_in)  B: (d_out, r)  d: (r,)  b: (d_out,)
    delta_W = (b[:, None] * B * d) @ A              (a plain LoRA with B' = diag(b) B diag(d), scale 1)
Init: A and B kaiming-uniform (fan_in = their second dim), d = `d_initial`, b = 0: identity at start, and
b has a gradient from the first step (B d A x != 0); A, B and d get theirs once b moves.
A and B train at first and are frozen module by module, lowest freezing score first. The score follows
AdaLoRA's importance (Zhang et al. 2023, arXiv:2303.10512), per entry w of A and B after each step:
    I = |w * dL/dw|,   I_bar <- beta1 I_bar + (1 - beta1) I,   U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|
    score(module) = mean of I_bar * U_bar over its A and B
How many modules are frozen after step t follows a cubic schedule: none while t <= tinit, all from
t = total_step - tfinal on, in between n * (1 - (1 - (t - tinit) / (total_step - tinit - tfinal))^3)
(rounded down). Freezing stops A's and B's gradients and drops their optimizer state; d and b keep
training. Merge: W += delta_W. The adapter saves as that plain LoRA (rank r, alpha = r): method "lora",
loadable by st.load and HF PEFT (format="peft"), bit-identical outputs.
Parameters per module: r * (d_in + d_out) + r + d_out; r + d_out train once the module is frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.methods.adalora import update_importance
from slimtune.methods.base import AdapterView, LayerAdapter, factory, register
from slimtune.methods.lora import Lora, LoraConfig, LoraMethod


@dataclass
class AfloraConfig(MethodConfig):
    """AFLoRA: LoRA path with vectors d, b; A and B frozen progressively by a freezing score.

    Paper: Liu et al. 2024, arXiv:2403.13269. Linear and GPT-2 Conv1D targets.

    Args:
        r: rank of A and B.
        d_initial: initial value of every entry of d (b starts at 0).
        dropout: dropout on the adapter branch input only.
        bias: "none" | "lora_only" (biases of the wrapped modules train) | "all" (every bias trains).
        beta1 / beta2: EMA factors of the sensitivity I and of its uncertainty |I - I_bar|.
        tinit: optimizer steps before any module freezes.
        tfinal: steps at the end with every module frozen.
        total_step: optimizer steps of the run (the schedule needs it); > tinit + tfinal.
    """

    aliases = {**MethodConfig.aliases, "rank": "r"}

    r: int = 4
    d_initial: float = 1.0
    dropout: float = 0.0
    bias: str = "none"
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.r) and self.r >= 1, self, "r", "an int >= 1, e.g. r=4")
        check_field(_is_number(self.d_initial) and math.isfinite(self.d_initial) and self.d_initial != 0, self,
                    "d_initial", "a finite non-zero number, e.g. 1.0 (0 leaves b without gradient)")
        check_field(_is_number(self.dropout) and 0 <= self.dropout < 1, self, "dropout", "a float in [0, 1)")
        check_field(self.bias in ("none", "lora_only", "all"), self, "bias", "'none', 'lora_only' or 'all'")
        for name in ("beta1", "beta2"):
            check_field(_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1, self, name,
                        "a float in [0, 1), e.g. 0.85")
        for name in ("tinit", "tfinal"):
            check_field(_is_int(getattr(self, name)) and getattr(self, name) >= 0, self, name, "an int >= 0 (steps)")
        check_field(_is_int(self.total_step) and self.total_step > self.tinit + self.tfinal, self, "total_step",
                    f"the run's number of optimizer steps, an int > tinit + tfinal = {self.tinit + self.tfinal}")

    def frozen_fraction(self, step: int) -> float:
        """Share of the modules frozen after optimizer step `step` (the cubic schedule)."""
        if step <= self.tinit:
            return 0.0
        span = self.total_step - self.tinit - self.tfinal
        if step >= self.tinit + span:
            return 1.0
        return 1.0 - (1.0 - (step - self.tinit) / span) ** 3

    def as_lora(self) -> LoraConfig:
        """The plain LoRA an AFLoRA adapter equals (scale alpha / r = 1)."""
        return LoraConfig(r=self.r, alpha=float(self.r), dropout=self.dropout, bias=self.bias, targets=self.targets,
                          exclude=self.exclude, layers=self.layers, modules_to_save=self.modules_to_save)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Aflora(Lora):
    """AFLoRA on a Linear or GPT-2 Conv1D: a LoRA whose B is diag(b) B diag(d)."""

    peft_keys = {**Lora.peft_keys, "d": "aflora_d", "b": "aflora_b"}  # in memory only: files hold the plain LoRA

    def __init__(self, base: nn.Module, cfg: AfloraConfig, init: bool = True) -> None:
        super().__init__(base, cfg.as_lora(), init)
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))  # trainable from the start; b = 0 keeps the identity
        kw = factory(base)
        self.d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kw))
        self.b = nn.Parameter(torch.zeros(self.B.shape[0], **kw))
        for p in ("A", "B"):  # EMAs of the sensitivity and its uncertainty (training state, not saved)
            self.register_buffer(f"{p}_ipt", torch.zeros_like(getattr(self, p)), persistent=False)
            self.register_buffer(f"{p}_unc", torch.zeros_like(getattr(self, p)), persistent=False)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.A, self.b[:, None] * self.B * self.d, self.scale  # (r, d_in), (d_out, r), 1.0

    def export_tensors(self) -> dict[str, Tensor]:
        """The plain LoRA this adapter computes (A, diag(b) B diag(d))."""
        A, B, _ = self.factors()
        return {"A": A, "B": B}

    def update_score(self, beta1: float, beta2: float) -> None:
        """One EMA step of I_bar and U_bar from the gradients of this step (AdaLoRA's importance)."""
        for p, ipt, unc in ((self.A, self.A_ipt, self.A_unc), (self.B, self.B_ipt, self.B_unc)):
            update_importance(p, ipt, unc, beta1, beta2)

    def score(self) -> float:
        """mean(I_bar * U_bar) over A's and B's entries."""
        total = (self.A_ipt * self.A_unc).sum() + (self.B_ipt * self.B_unc).sum()
        return float(total) / (self.A.numel() + self.B.numel())

    def freeze(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Stop training A and B for good (the engine keeps them frozen on use()); d and b train on."""
        self.frozen = frozenset({"A", "B"})
        for p in ("A", "B"):
            param = getattr(self, p)
            param.requires_grad_(False)
            param.grad = None  # an optimizer skips it from now on (no weight decay on stale zero gradients)
            if optimizer is not None:
                optimizer.state.pop(param, None)
            for suffix in ("_ipt", "_unc"):
                setattr(self, p + suffix, param.new_zeros(0))  # free the EMA memory


# -- the method ---------------------------------------------------------------------------------------
@register
class AfloraMethod(LoraMethod):
    name, config = "aflora", AfloraConfig
    params, paper = "r*(d_in+d_out)+r+d_out", "arXiv:2403.13269"
    peft_type = None  # PEFT has no AFLoRA; the saved file is a PEFT LORA
    linear_only = True
    changes_trainable = True  # step() freezes A and B module by module

    def build_layer(self, base: nn.Module, cfg: AfloraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Aflora(base, cfg, init)

    def step(self, adapter: AdapterView, cfg: AfloraConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """Update the scores of the modules still training, then freeze the lowest ones the schedule asks for."""
        live = {n: m for n, m in adapter.layers.items() if not m.frozen}
        for layer in live.values():
            layer.update_score(cfg.beta1, cfg.beta2)
        due = math.floor(cfg.frozen_fraction(global_step) * len(adapter.layers)) - (len(adapter.layers) - len(live))
        if due <= 0:
            return
        for name in sorted(live, key=lambda n: (live[n].score(), n))[:due]:
            live[name].freeze(optimizer)

    def saved_config(self, cfg: AfloraConfig, adapter: AdapterView) -> LoraConfig:
        return cfg.as_lora()

    def describe(self, adapter: AdapterView, cfg: AfloraConfig) -> str:
        frozen = sum(bool(m.frozen) for m in adapter.layers.values())
        return f"A/B frozen in {frozen}/{len(adapter.layers)} modules"


__all__ = ["Aflora", "AfloraConfig", "AfloraMethod"]
