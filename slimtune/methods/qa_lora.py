"""QA-LoRA: LoRA whose input is average-pooled over each quantization group, so its merge stays on the grid.

QA-LoRA (Xu et al. 2023, ICLR 2024, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language
Models", arXiv:2309.14717), on a group-wise INT-b base (st.quantize(model, "int4", group_size=g)):
    p = pool_g(drop(x))              p_j = mean of x over group j (d_in / g groups)      p: (..., d_in / g)
    y = base(x) + s * p @ A.T @ B.T       A: (r, d_in / g)  B: (d_out, r)   s = alpha / r (rsLoRA: alpha / sqrt(r))
    delta_W[o, i] = s * (B @ A)[o, j(i)] / g                 constant within every (row, group)
Merge: the base absorbs the change into its zero-points, z' = z - delta_W / s_q per (row, group) (s_q the
group's quantization scale); the codes stay as they are, so the merged model is exactly INT-b: s_q * (q - z').
Init: A kaiming-uniform, B = 0 (the base at start). Parameters per module: r * (d_in / g + d_out).

The base must be group-quantized (GroupQuantLinear) with the group size the config names (None: the base's);
any other base is refused with the layer named. The pooling is the paper's (AvgPool1d); HF PEFT's
`LoraConfig(use_qalora=True)` (GPTQ layers only, no merge) multiplies the pooled input by d_in / g, so its
lora_A equals ours divided by d_in / g. No PEFT file interop here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.methods.base import LayerAdapter, Method, factory, register
from slimtune.quant.group_linear import group_kind


@dataclass
class QaLoraConfig(MethodConfig):
    """QA-LoRA: y = base(x) + s * pool_g(x) @ A.T @ B.T on a group-quantized base; merges stay INT-b.

    Args:
        r: rank of the update.
        alpha: numerator of the scale s = alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter branch input (before pooling).
        rslora: rank-stabilised scale alpha / sqrt(r).
        group_size: the quantization group size the adapter is built for; None: each base layer's own.
            A base layer with another group size is refused.
    """

    aliases = {**MethodConfig.aliases, "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "use_rslora": "rslora", "qalora_group_size": "group_size"}

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.r) and self.r >= 1, self, "r", "an int >= 1, e.g. r=8")
        check_field(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
                    self, "alpha", "a number > 0")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        check_field(isinstance(self.rslora, bool), self, "rslora", "True or False")
        check_field(self.group_size is None or (_is_int(self.group_size) and self.group_size >= 1), self,
                    "group_size", "an int >= 1 equal to the base's quantization group size, or None (the base's)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class QaLora(LayerAdapter):
    """QA-LoRA on a GroupQuantLinear: y = base(x) + s * pool(drop(x)) @ A.T @ B.T."""

    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}

    def __init__(self, base: nn.Module, cfg: QaLoraConfig) -> None:
        super().__init__()
        kind = group_kind(base, "QA-LoRA")
        d_in, d_out = kind.sizes(base)
        g = kind.group_size(base)
        if cfg.group_size is not None and cfg.group_size != g:
            raise ValueError(f"QaLoraConfig.group_size={cfg.group_size}, but this layer is quantized in groups of "
                             f"{g}; expected group_size={g} (or None: the base's)")
        kw = factory(base)
        self.r, self.scale, self.group_size, self.n_groups = cfg.r, cfg.scale, g, d_in // g
        self.A = nn.Parameter(torch.empty(cfg.r, self.n_groups, **kw))  # (r, d_in / g)
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r, **kw))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def pool(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_in / g): the mean of each quantization group of input features."""
        return x.reshape(*x.shape[:-1], self.n_groups, self.group_size).mean(-1)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = x if self.drop is None else self.drop(x)
        h = self.pool(h.to(self.A.dtype)) @ self.A.T  # (..., r)
        return base_out + ((h @ self.B.T) * self.scale).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """s * B @ A spread over the columns of each group, / g (the mean): (d_out, d_in), group-constant."""
        return (self.scale / self.group_size) * (self.B @ self.A).repeat_interleave(self.group_size, dim=1)

    # -- mixed batches: rows routed to different QA-LoRAs of one rank and group size in one bmm -----------
    @property
    def route_key(self) -> tuple | None:
        return None if self.drop is not None and self.training else ("qa_lora", self.r, self.group_size,
                                                                     self.A.dtype)

    @staticmethod
    def stack(adapters: list[QaLora]) -> tuple[Tensor, Tensor, int]:
        """(k, d_in / g, r) and (k, r, d_out) stacks with each adapter's scale folded into B, and g."""
        A = torch.stack([a.A.T for a in adapters])
        B = torch.stack([(a.B * a.scale).T for a in adapters])
        return A, B, adapters[0].group_size

    @staticmethod
    def forward_rows(stacks: tuple[Tensor, Tensor, int], x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        """Row i of the batch gets adapter slot[i] (None: slot i is row i)."""
        A, B, g = stacks
        if slot is not None:
            A, B = A.index_select(0, slot), B.index_select(0, slot)
        rows = x.shape[0]
        pooled = x.reshape(rows, -1, x.shape[-1] // g, g).mean(-1).to(A.dtype)  # (rows, tokens, d_in / g)
        delta = torch.bmm(torch.bmm(pooled, A), B)  # (rows, tokens, d_out)
        return base_out + delta.view(base_out.shape).to(base_out.dtype)


@register
class QaLoraMethod(Method):
    name, config, shape = "qa_lora", QaLoraConfig, "layer"
    category, params, paper = "reparameterized", "r*(d_in/group_size+d_out)", "arXiv:2309.14717"
    mergeable = True
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: QaLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return QaLora(base, cfg)


__all__ = ["QaLora", "QaLoraConfig", "QaLoraMethod"]
