"""HydraLoRA: one shared A, several B heads, a token router over the heads.

Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning", arXiv:2404.19245:
    w(x) = softmax(W_g x)                                   W_g: (n, d_in), no bias, in float32 or wider
    y = base(x) + s * sum_i w_i(x) B_i A drop(x)            A: (r, d_in)  B_i: (d_out, r)  s = alpha / r
computed as one GEMM: [w_1 h, ..., w_n h] @ [B_1 | ... | B_n].T with h = A drop(x) (B @ A never formed).
Init: A kaiming-uniform, every B_i = 0 (the base at init), router N(0, router_init^2 / d_in): logits of std
0.5 for unit-RMS inputs, near-uniform weights on average that still differ per token, so the zero heads get
different gradients (a zero router would keep them identical forever; the reference code uses nn.Linear's init).
`top_k` and the Switch load-balancing loss are the MoE layer's (moe.py), off by default as in the paper.
The paper picks n by clustering the training data (k-means; the reference scripts say "k-means, or DBSCAN" for
the head count); the heads are not initialised from the clusters, so n is a field here.
Params per module: r*d_in + n*r*d_out + n*d_in. Not mergeable: w depends on x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.bases import sizes
from slimtune.config import MethodConfig, check_field
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, register
from slimtune.methods.moe import ROUTER_INIT, Router, balance_loss, check_routing


@dataclass
class HydraLoraConfig(MethodConfig):
    """HydraLoRA: a shared A and `num_heads` B matrices mixed per token.

    Args:
        r: rank of A and of every head.
        alpha: numerator of the scale s = alpha / r.
        dropout: dropout on the LoRA branch input (the router reads the input undropped).
        num_heads: n, the B heads (the paper: the number of k-means clusters of the data; its scripts use 4).
        top_k: None or 0: soft routing over all heads (the paper's); k: the k largest weights renormalised.
        load_balance: weight of the Switch load-balancing loss (0: none).
        router_init: std of the initial router logits for unit-RMS inputs (weights N(0, router_init^2 / d_in)).
    """

    aliases = {**MethodConfig.aliases, "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_nums": "num_heads"}

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_heads: int = 4
    top_k: int | None = None
    load_balance: float = 0.0
    router_init: float = ROUTER_INIT

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, self, "r",
                    "an int >= 1, e.g. r=8")
        check_field(isinstance(self.alpha, (int, float)) and self.alpha > 0, self, "alpha", "a number > 0")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        check_routing(self, "num_heads")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class HydraLora(LayerAdapter):
    """A (r, d_in), B (n, d_out, r) and the router on a Linear / GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, cfg: HydraLoraConfig) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.empty(cfg.r, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(cfg.num_heads, d_out, cfg.r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.router = Router(d_in, cfg.num_heads, cfg.top_k, cfg.router_init, cfg.load_balance > 0, **kw)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def heads(self) -> Tensor:
        """[B_1 | ... | B_n]: (d_out, n * r), column i*r + j = B_i[:, j]."""
        n, d_out, r = self.B.shape
        return self.B.permute(1, 0, 2).reshape(d_out, n * r)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        w = self.router(x)  # (..., n)
        h = (x if self.drop is None else self.drop(x)).to(self.A.dtype) @ self.A.T  # (..., r)
        mixed = (w.unsqueeze(-1).to(h.dtype) * h.unsqueeze(-2)).flatten(-2)  # (..., n * r): w_i h_j
        delta = (mixed @ self.heads().T) * self.scale  # (..., d_out)
        return base_out + delta.to(base_out.dtype)


@register
class HydraLoraMethod(Method):
    name, config, shape = "hydralora", HydraLoraConfig, "layer"
    category, params, paper = "multi-task", "r*d_in + num_heads*r*d_out + num_heads*d_in", "arXiv:2404.19245"
    mergeable, linear_only = False, True

    def build_layer(self, base: nn.Module, cfg: HydraLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> HydraLora:
        return HydraLora(base, cfg)

    def regularizer(self, adapter: AdapterView, cfg: HydraLoraConfig) -> Tensor | None:
        return balance_loss(adapter, cfg.load_balance)


__all__ = ["HydraLora", "HydraLoraConfig", "HydraLoraMethod"]
