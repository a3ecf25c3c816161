"""SSF: scale and shift the features after frozen linear ops.

SSF (Lian et al. 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS,
arXiv:2210.08823). Per target, two vectors:
    y = gamma * base(x) + beta          gamma, beta: (d_out,)
Init gamma = 1, beta = 0: exactly the base (init_std > 0: the reference code's gamma ~ N(1, std), beta ~ N(0, std)).
Merge: W' = diag(gamma) W, b' = gamma * b + beta. A base without a bias gets one for the merge (b' = beta) and
loses it on unmerge, which leaves the module exactly as it was (`bias` None again); W comes back by dividing by
the gamma used at merge time (rows where gamma = 0 are kept from before), b from a copy, bit for bit.
Linear and GPT-2 Conv1D targets: the base-layer registry cannot wrap LayerNorm / RMSNorm.
Parameters per module: 2 * d_out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field
from slimtune.methods.base import LayerAdapter, Method, factory, register


@dataclass
class SsfConfig(MethodConfig):
    """SSF: y = gamma * base(x) + beta on every target; gamma = 1, beta = 0 at init.

    Args:
        init_std: 0 starts exactly at the base; > 0 draws gamma ~ N(1, init_std), beta ~ N(0, init_std) (the
            paper's code uses 0.02).
    `targets` defaults to "all-linear" (the paper scales and shifts after every operation).
    """

    init_std: float = 0.0

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = "all-linear"
        super().__post_init__()
        check_field(isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool)
                    and 0 <= self.init_std < math.inf, self, "init_std", "a standard deviation >= 0, e.g. 0.02")


class Ssf(LayerAdapter):
    """gamma and beta on a Linear or GPT-2 Conv1D: y = gamma * base(x) + beta."""

    def __init__(self, base: nn.Module, init_std: float) -> None:
        super().__init__()
        d_out = sizes(base)[1]
        kw = factory(base)
        self.gamma = nn.Parameter(torch.ones(d_out, **kw))
        self.beta = nn.Parameter(torch.zeros(d_out, **kw))
        if init_std > 0:
            with torch.no_grad():
                self.gamma.normal_(1.0, init_std)
                self.beta.normal_(0.0, init_std)
        self._merged: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return (base_out * self.gamma + self.beta).to(base_out.dtype)

    # -- merging: W' = diag(gamma) W, b' = gamma * b + beta ---------------------------------------------
    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind, bias = kind_of(base), base._parameters.get("bias")  # the base's own bias, not a selection's view
        if bias is None and "bias" not in base._parameters:
            raise NotImplementedError(f"SSF merge on {type(base).__name__}: it has no bias slot to fold beta into")
        W = kind.weight(base)  # (d_out, d_in)
        gamma, beta = self.gamma.detach().clone(), self.beta.detach().clone()
        dead = (gamma == 0).nonzero().view(-1)  # rows W * 0 cannot be divided back: keep them
        self._merged = (gamma, dead, W.index_select(0, dead).clone(), None if bias is None else bias.clone())
        kind.write_weight(base, W * gamma[:, None].to(W.dtype))
        if bias is None:
            base.bias = nn.Parameter(beta.to(W.dtype), requires_grad=False)  # removed again by unmerge
        else:
            bias.mul_(gamma.to(bias.dtype)).add_(beta.to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self._merged is None:
            return
        (gamma, dead, kept_W, kept_b), self._merged = self._merged, None
        kind = kind_of(base)
        W = kind.weight(base)
        safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
        kind.write_weight(base, (W / safe[:, None].to(W.dtype)).index_copy(0, dead, kept_W.to(W.dtype)))
        if kept_b is None:
            base.bias = None  # back to a module without a bias, as before the merge
        else:
            base._parameters["bias"].copy_(kept_b)

    # -- mixed batches: scales and shifts of one dtype in one broadcast op ------------------------------
    @property
    def route_key(self) -> tuple:
        return ("ssf", self.gamma.dtype)

    @staticmethod
    def stack(adapters: list[Ssf]) -> Tensor:
        """(k, 2, d_out): gamma and beta of each adapter."""
        return torch.stack([torch.stack([a.gamma, a.beta]) for a in adapters])

    @staticmethod
    def forward_rows(stacks: Tensor, x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        """Row i of the batch gets the gamma and beta of adapter slot[i] (None: slot i is row i)."""
        rows = stacks if slot is None else stacks.index_select(0, slot)
        shape = (rows.shape[0], *(1,) * (base_out.dim() - 2), rows.shape[-1])
        return (base_out * rows[:, 0].view(shape) + rows[:, 1].view(shape)).to(base_out.dtype)


@register
class SsfMethod(Method):
    name, config, shape = "ssf", SsfConfig, "layer"
    category, params, paper = "additive", "2*d_out", "arXiv:2210.08823"
    mergeable, linear_only = True, True

    def build_layer(self, base: nn.Module, cfg: SsfConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Ssf(base, cfg.init_std if init else 0.0)


__all__ = ["Ssf", "SsfConfig", "SsfMethod"]
