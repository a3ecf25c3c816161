"""PEQA: fine-tune only the quantization scales of a quantized model; codes and zero-points stay frozen.

PEQA (Kim et al. 2023, NeurIPS, "Memory-Efficient Fine-Tuning of Compressed Large Language Models via
sub-4-bit Integer Quantization", arXiv:2305.14152), on a group-wise INT-b base W_hat = s0 * (q - z)
(st.quantize(model, "int4", group_size=-1) is the paper's per-channel setting; any group size works):
    W' = (s0 + ds) * (q - z)        ds: (d_out, n_groups), init 0 (the base at start)
    y = base(x) + x @ (ds * (q - z)).T          (alone: one matmul with s0 + ds, the same numbers)
Trainable per module: d_out * n_groups (d_out per-channel). The adapter file holds only ds (the task's scales
are s0 + ds); each adapter is one scale set, so `use("task_a")` / `use("task_b")` switches tasks on one
base. Merge writes s0 + ds into the base's scales (exact: codes and zeros untouched, no re-quantization);
unmerge puts s0 back bit for bit. ds rather than s' is the parameter so that the start is exactly the base
in any dtype, and weight decay pulls the scales towards the base's rather than towards 0.

The base must be group-quantized (GroupQuantLinear); others are refused with the layer named. HF PEFT has
no PEQA type: no PEFT file interop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig
from slimtune.methods.base import LayerAdapter, Method, factory, register
from slimtune.quant.group_linear import group_kind


@dataclass
class PeqaConfig(MethodConfig):
    """PEQA: train the quantization scales of every targeted group-quantized layer (default: all linear
    layers but the output head; each must be a GroupQuantLinear). No other fields: the base decides the
    granularity (per channel with group_size=-1, per group otherwise)."""

    targets: str | list[str] | None = "all-linear"


class Peqa(LayerAdapter):
    """Scale offsets ds (d_out, n_groups) of one GroupQuantLinear: W' = (s0 + ds) * (q - z)."""

    peft_keys = {"ds": "peqa_scales_delta"}

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self._kind = kind = group_kind(base, "PEQA")  # the registry's hooks for group-quantized layers
        self.ds = nn.Parameter(torch.zeros_like(kind.scales(base), **factory(base)))  # (d_out, n_groups)
        self._merged_scales: Tensor | None = None  # s0, kept while merged

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        delta = self._kind.linear_with_scales(base, x, self.ds)  # x @ (ds * (q - z)).T
        return base_out + delta.to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Alone: y = x @ ((s0 + ds) * (q - z)).T + b, one matmul instead of two."""
        return self._kind.linear_with_scales(base, x, self._kind.scales(base) + self.ds, bias=True)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self._kind.dequantize(base, scales=self.ds)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind = self._kind
        self._merged_scales = kind.scales(base)
        kind.write_scales(base, self._merged_scales + self.ds.float())

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self._merged_scales is not None:
            self._kind.write_scales(base, self._merged_scales)
            self._merged_scales = None


@register
class PeqaMethod(Method):
    name, config, shape = "peqa", PeqaConfig, "layer"
    category, params, paper = "selective", "d_out*n_groups (d_out per-channel)", "arXiv:2305.14152"
    mergeable = True
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: PeqaConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Peqa(base)


__all__ = ["Peqa", "PeqaConfig", "PeqaMethod"]
