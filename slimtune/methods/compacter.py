"""Compacter and Compacter++: bottleneck adapters whose projections are PHM (sum of Kronecker products) layers.

Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", NeurIPS, arXiv:2106.04647.
    y = h + up(f(down(h)))            h = base(x), a sublayer's output projection (as bottleneck adapters)
    down(h) = h @ W + b,   W = sum_{i=1..n} A_i ⊗ B_i,   B_i = s_i @ t_i   (rank phm_rank = ρ)
    A: (n, n, n) "slow" rule matrices, one set per adapter shared by every layer and both projections
       (shared_phm_rule=True; else one set per projection); s: (n, d_in/n, ρ), t: (n, ρ, d_out/n) "fast", per layer.
Compacter: after the attention and the FFN outputs (Houlsby positions); Compacter++: after the FFN output only.
reads="residual": the adapter reads the residual stream as bottleneck adapters do (AdapterHub's Compacter++, whose
SeqBn base reads the sublayer output after the residual add, and the block's LayerNorm in post-norm models).
Init (AdapterHub's): A ~ N(0, phm_init_range), every s_i and t_i Glorot-normal, biases 0: near the base at init.
Parameters per position: 2ρ(d + m) + d + m, m = d // reduction_factor (+ 2n³ without a shared rule), and n³ once
per adapter with it. Not mergeable: f is nonlinear (W itself is materialised per forward: d x m numbers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field
from slimtune.layer import AdapterLayer
from slimtune.methods.adapters import (
    ACTIVATIONS,
    READS,
    Bottleneck,
    _is_int,
    _is_number,
    _one_of,
    bottleneck_width,
    placement_targets,
    residual_taps,
    tap_for,
)
from slimtune.methods.base import LayerAdapter, Method, factory, register

VARIANTS = {"compacter": "houlsby", "compacter++": "pfeiffer"}  # variant -> bottleneck placement


@dataclass
class CompacterConfig(MethodConfig):
    """Compacter: bottleneck adapters with PHM projections W = sum_i A_i ⊗ (s_i @ t_i).

    Defaults are AdapterHub's CompacterConfig / CompacterPlusPlusConfig.

    Args:
        variant: "compacter" (after attention and FFN outputs) or "compacter++" (after the FFN output only).
            Sets `targets` when they are not given.
        reduction_factor: d / m: the bottleneck width is m = d // reduction_factor.
        non_linearity: f: "relu", "gelu", "swish" or "tanh".
        phm_dim: n, the number of Kronecker terms; it must divide both d and m.
        phm_rank: ρ, the rank of every fast matrix B_i = s_i @ t_i.
        shared_phm_rule: one set of slow matrices A for the whole adapter (else one per projection).
        phm_init_range: the standard deviation of A at init (small: the adapter starts near the base).
        reads: "sublayer" (the wrapped module's output) or "residual" (the residual stream, AdapterHub's
            placement; see BottleneckConfig.reads).
    """

    #: the module name this copy was resolved for (not a field: never saved)
    module: ClassVar[str | None] = None

    variant: str = "compacter"
    reduction_factor: float = 32
    non_linearity: str = "gelu"
    phm_dim: int = 4
    phm_rank: int = 1
    shared_phm_rule: bool = True
    phm_init_range: float = 1e-4
    reads: str = "sublayer"

    def __post_init__(self) -> None:
        _one_of(self, "variant", tuple(VARIANTS))
        if self.targets is None:
            self.targets = placement_targets(VARIANTS[self.variant])
        super().__post_init__()
        check_field(_is_number(self.reduction_factor) and 0 < self.reduction_factor < math.inf, self,
                    "reduction_factor", "a number > 0 (the bottleneck is d // reduction_factor wide), e.g. 32")
        _one_of(self, "non_linearity", tuple(ACTIVATIONS))
        check_field(_is_int(self.phm_dim) and self.phm_dim >= 1, self, "phm_dim", "an int >= 1, e.g. 4")
        check_field(_is_int(self.phm_rank) and self.phm_rank >= 1, self, "phm_rank", "an int >= 1, e.g. 1")
        check_field(isinstance(self.shared_phm_rule, bool), self, "shared_phm_rule", "True or False")
        check_field(_is_number(self.phm_init_range) and 0 < self.phm_init_range < math.inf, self, "phm_init_range",
                    "a standard deviation > 0, e.g. 1e-4")
        _one_of(self, "reads", READS)

    def resolve(self, module_name: str) -> CompacterConfig:
        """The config for one target, knowing its name (for reads="residual")."""
        if self.reads == "sublayer":
            return self
        resolved = dataclasses.replace(self)
        resolved.module = module_name
        return resolved


class PhmRule(nn.Module):
    """The slow matrices A (n, n, n) shared by every PHM layer of one adapter."""

    def __init__(self, n: int, init_range: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, n, n, dtype=dtype, device=device).normal_(0.0, init_range))
        self.taps = None  # reads="residual": where each target's residual stream comes from


class ResidualTaps(nn.Module):
    """reads="residual" without a shared rule: only where each target's residual stream comes from (no tensors)."""

    def __init__(self, taps: dict) -> None:
        super().__init__()
        self.taps = taps


class Phm(nn.Module):
    """A PHM linear layer: x @ W + b, W = sum_i A_i ⊗ (s_i @ t_i) of shape (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, cfg: CompacterConfig, rule: PhmRule | None, kw: dict) -> None:
        super().__init__()
        n, rank = cfg.phm_dim, cfg.phm_rank
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank, **kw))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        self._rule = [rule] if rule is not None else []  # a plain reference: the shared rule is saved once
        if rule is None:
            self.A = nn.Parameter(torch.empty(n, n, n, **kw).normal_(0.0, cfg.phm_init_range))
        with torch.no_grad():
            for i in range(n):  # Glorot per Kronecker term, as AdapterHub
                nn.init.xavier_normal_(self.s[i])
                nn.init.xavier_normal_(self.t[i])

    def rule(self) -> Tensor:
        return self._rule[0].A if self._rule else self.A

    def weight(self) -> Tensor:
        """W (d_in, d_out): W[(a, p), (b, q)] = sum_i A_i[a, b] * B_i[p, q]."""
        A, B = self.rule(), self.s @ self.t  # (n, n, n), (n, d_in/n, d_out/n)
        n, p, q = B.shape
        return torch.einsum("iab,ipq->apbq", A, B).reshape(n * p, n * q)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight() + self.bias


@register
class CompacterMethod(Method):
    name, config, shape = "compacter", CompacterConfig, "layer"
    category, paper = "additive", "arXiv:2106.04647"
    params = "2*phm_rank*(d+m)+d+m per position (+2*phm_dim^3 unshared), phm_dim^3 once if shared"
    mergeable, linear_only = False, True
    tensor_keys = {"A": "phm_rule"}

    def build_shared(self, model: nn.Module, cfg: CompacterConfig, targets: list[str], init: bool = True
                     ) -> nn.Module | None:
        """The slow matrices A, once per adapter (shared_phm_rule), and the residual taps (reads="residual")."""
        taps = residual_taps(model, targets) if cfg.reads == "residual" else None
        if not cfg.shared_phm_rule or not targets:
            return ResidualTaps(taps) if taps is not None else None
        first = model.get_submodule(targets[0])
        first = first.base_layer if isinstance(first, AdapterLayer) else first
        kind = kind_of(first)
        rule = PhmRule(cfg.phm_dim, cfg.phm_init_range, kind.adapter_dtype(first), kind.device(first))
        rule.taps = taps
        return rule

    def build_layer(self, base: nn.Module, cfg: CompacterConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        d = sizes(base)[1]
        m = bottleneck_width(d, cfg.reduction_factor)
        n = cfg.phm_dim
        if d % n or m % n:
            raise ValueError(f"phm_dim={n} must divide the hidden size d={d} and the bottleneck m = d // "
                             f"reduction_factor = {m}; expected a phm_dim dividing both (or another reduction_factor)")
        rule = shared if isinstance(shared, PhmRule) else None
        kw = factory(base)
        return Bottleneck(base, Phm(d, m, cfg, rule, kw), Phm(m, d, cfg, rule, kw), cfg.non_linearity,
                          tap=tap_for(shared, cfg))


__all__ = ["CompacterConfig", "CompacterMethod", "Phm", "PhmRule"]
