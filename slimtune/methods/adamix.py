"""AdaMix (Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning",
arXiv:2205.12410): M experts per adaptation module, routed at random in training, averaged for inference.

    adapter experts:  y = h + up_j(f(down_i(h)))            down_i: d -> m, up_j: m -> d   (bottleneck, sequential)
    LoRA experts:     y = base(x) + s * x @ A_i.T @ B_j.T   A_i: (r, d_in), B_j: (d_out, r), s = alpha / r
    training: every forward picks i and j uniformly at random, independently, per module (no learned router)
    eval:     the averaged weights, down = mean_i down_i, up = mean_j up_j (biases likewise): one module's cost
`merge_experts(model)` replaces the M experts by their average for good (num_experts = 1 in the saved file),
so inference costs the same as one adapter. Consistency regularisation: `consistency_loss(logits_a, logits_b)`
is the symmetric KL between two stochastic passes of one batch, `two_pass_loss(model, batch)` the training
loss with it. `share="up"` / `"down"`: one projection shared by the experts (M downs, one up, or the reverse).
Params per module: M (or 1 when shared) per projection: adapters M*(d*m + m) + M*(m*d + d); LoRA M*r*(d_in + d_out).
Mergeable into the base for LoRA experts (delta_W = s * mean(B) @ mean(A), the eval forward); adapters are not.
Init: one expert as its method inits it (adapters: `init`, AdapterHub's schemes; LoRA: A kaiming-uniform, B = 0),
copied to all M, as the reference code deep-copies one module: the experts start equal, so their average is
a meaningful module throughout training (a "soup" of one start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.methods.adapters import (
    ACTIVATIONS,
    INITS,
    Bottleneck,
    _is_int,
    _is_number,
    _one_of,
    bottleneck_width,
    init_projections,
    placement_targets,
)
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, register


@dataclass
class AdaMixConfig(MethodConfig):
    """AdaMix: M adapter (or LoRA) experts per module, random routing in training, averaged weights in eval.

    Args:
        num_experts: M, experts per projection (the paper uses 4).
        expert: "adapter" (bottleneck adapters; `targets` default to the placement's positions) or "lora"
            (`targets` required, Linear / GPT-2 Conv1D only).
        placement: adapters: "pfeiffer" (after the FFN) or "houlsby" (after attention and after the FFN).
        reduction_factor: adapters: m = d // reduction_factor.
        non_linearity: adapters: f, "relu", "gelu", "swish" or "tanh".
        init: adapters: "bert", "houlsby", "mam" or "lora" (BottleneckConfig.init).
        r, alpha: LoRA: rank and scale numerator (s = alpha / r).
        share: "none", "up" or "down": one shared projection (adapters: up / down; LoRA: B / A).
    """

    num_experts: int = 4
    expert: str = "adapter"
    placement: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    init: str = "bert"
    r: int = 8
    alpha: float = 16.0
    share: str = "none"

    def __post_init__(self) -> None:
        _one_of(self, "expert", ("adapter", "lora"))
        _one_of(self, "placement", ("pfeiffer", "houlsby"))
        if self.targets is None and self.expert == "adapter":
            self.targets = placement_targets(self.placement)
        super().__post_init__()
        if self.targets is None:
            raise ConfigError("AdaMixConfig.targets=None with expert='lora': expected the modules to adapt, "
                              "e.g. targets=['q_proj', 'v_proj']")
        check_field(_is_int(self.num_experts) and self.num_experts >= 1, self, "num_experts", "an int >= 1, e.g. 4")
        check_field(_is_number(self.reduction_factor) and self.reduction_factor > 0, self, "reduction_factor",
                    "a number > 0, e.g. 16")
        _one_of(self, "non_linearity", tuple(ACTIVATIONS))
        _one_of(self, "init", INITS)
        check_field(_is_int(self.r) and self.r >= 1, self, "r", "an int >= 1, e.g. 8")
        check_field(_is_number(self.alpha) and self.alpha > 0, self, "alpha", "a number > 0")
        _one_of(self, "share", ("none", "up", "down"))

    def experts(self, side: str) -> int:
        """Experts of the "down" (A) or "up" (B) projection."""
        return 1 if self.share == side else self.num_experts


class Experts(nn.Module):
    """M linear maps d_in -> d_out: one picked at random per call in training, their average otherwise."""

    def __init__(self, n: int, d_in: int, d_out: int, bias: bool, **kw: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d_out, d_in, **kw))  # (M, d_out, d_in)
        self.bias = nn.Parameter(torch.zeros(n, d_out, **kw)) if bias else None  # (M, d_out)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def current(self) -> tuple[Tensor, Tensor | None]:
        """(W, b) for this call: a random expert in training (stochastic routing), else the averaged weights."""
        if self.n == 1:
            return self.weight[0], None if self.bias is None else self.bias[0]
        if self.training:
            i = int(torch.randint(self.n, ()))
            return self.weight[i], None if self.bias is None else self.bias[i]
        return self.weight.mean(0), None if self.bias is None else self.bias.mean(0)

    def forward(self, x: Tensor) -> Tensor:
        W, b = self.current()
        return F.linear(x, W, b)

    @torch.no_grad()
    def copy_first(self) -> None:
        """Every expert equal to expert 0 (the experts start from one init)."""
        self.weight[1:] = self.weight[:1]
        if self.bias is not None:
            self.bias[1:] = self.bias[:1]

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the experts by their average (new parameters: make the optimizer afterwards)."""
        self.weight = nn.Parameter(self.weight.mean(0, keepdim=True))
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.mean(0, keepdim=True))


class _Slice:
    """Expert i's weight and bias, seen as a Linear by `init_projections`."""

    def __init__(self, experts: Experts, i: int) -> None:
        self.weight, self.bias = experts.weight[i], experts.bias[i]


def adapter_experts(base: nn.Module, cfg: AdaMixConfig, init: bool) -> Bottleneck:
    """A sequential bottleneck adapter whose down and up projections are expert sets."""
    d = kind_of(base).sizes(base)[1]
    m = bottleneck_width(d, cfg.reduction_factor)
    kw = factory(base)
    down = Experts(cfg.experts("down"), d, m, True, **kw)
    up = Experts(cfg.experts("up"), m, d, True, **kw)
    if init:
        init_projections(_Slice(down, 0), _Slice(up, 0), cfg.init)
        down.copy_first()
        up.copy_first()
    return Bottleneck(base, down, up, cfg.non_linearity)


class LoraExperts(LayerAdapter):
    """LoRA with expert sets A (d_in -> r) and B (r -> d_out): y = base(x) + s * B_j(A_i(x))."""

    def __init__(self, base: nn.Module, cfg: AdaMixConfig, init: bool) -> None:
        super().__init__()
        d_in, d_out = kind_of(base).sizes(base)
        kw = factory(base)
        self.scale = cfg.alpha / cfg.r
        self.A = Experts(cfg.experts("down"), d_in, cfg.r, False, **kw)
        self.B = Experts(cfg.experts("up"), cfg.r, d_out, False, **kw)
        if init:
            nn.init.kaiming_uniform_(self.A.weight.data[0], a=5**0.5)  # B = 0: exactly the base at init
            self.A.copy_first()

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = self.B(self.A(x.to(self.A.weight.dtype)))  # (..., d_in) -> (..., r) -> (..., d_out)
        return base_out + (h * self.scale).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """s * mean(B) @ mean(A): what the eval forward adds, in (d_out, d_in) layout."""
        return self.scale * (self.B.weight.mean(0) @ self.A.weight.mean(0))


def merge_experts(model: nn.Module, name: str | None = None) -> nn.Module:
    """Average every expert set of AdaMix adapter `name` (default: the first active) into one module, in place.

    Afterwards the adapter costs what one adapter costs, eval outputs are unchanged, and it saves with
    num_experts=1. Build the optimizer afterwards if training goes on (the parameters are new).
    """
    for layer in model.view(name if name is not None else model.active[0]).layers.values():
        for module in layer.modules():
            if isinstance(module, Experts):
                module.merge()
    return model


def consistency_loss(logits_a: Tensor, logits_b: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """AdaMix's consistency term: (KL(p_a || p_b) + KL(p_b || p_a)) / 2 of two stochastic passes' predictions,
    averaged over positions (where `attention_mask` is 1, for per-token logits)."""
    la, lb = F.log_softmax(logits_a.float(), dim=-1), F.log_softmax(logits_b.float(), dim=-1)
    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))  # (batch[, seq])
    if attention_mask is None or kl.dim() != attention_mask.dim():
        return kl.mean()
    mask = attention_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def two_pass_loss(model: nn.Module, batch: dict[str, Any], weight: float = 1.0) -> Tensor:
    """The AdaMix training loss of one batch (with labels): two stochastic passes, mean task loss + weight *
    consistency_loss. Call it in place of `model(**batch).loss` in a training loop (model in train mode)."""
    a, b = model(**batch), model(**batch)
    return 0.5 * (a.loss + b.loss) + weight * consistency_loss(a.logits, b.logits, batch.get("attention_mask"))


@register
class AdaMixMethod(Method):
    name, config, shape = "adamix", AdaMixConfig, "layer"
    category, paper = "additive", "arXiv:2205.12410"
    params = "M*(2*d*m+d+m) per position (adapters), M*r*(d_in+d_out) per module (LoRA); M=1 after merge_experts"
    mergeable = False  # is_mergeable: LoRA experts only
    changes_trainable = True  # the experts not picked in a step get no gradient (DDP: find_unused_parameters)

    def is_mergeable(self, cfg: AdaMixConfig) -> bool:
        return cfg.expert == "lora"

    def build_layer(self, base: nn.Module, cfg: AdaMixConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        if not kind_of(base).linear:
            raise NotImplementedError("AdaMix experts act on the last dimension: Linear and GPT-2 Conv1D only")
        return LoraExperts(base, cfg, init) if cfg.expert == "lora" else adapter_experts(base, cfg, init)

    def saved_config(self, cfg: AdaMixConfig, adapter: AdapterView) -> AdaMixConfig:
        """After merge_experts every set holds one expert: the file is a one-expert AdaMix."""
        sizes = {m.n for layer in adapter.layers.values() for m in layer.modules() if isinstance(m, Experts)}
        return cfg.replace(num_experts=1, share="none") if sizes == {1} else cfg


__all__ = ["AdaMixConfig", "AdaMixMethod", "Experts", "LoraExperts", "consistency_loss", "merge_experts",
           "two_pass_loss"]
