"""AdapterFusion: per-layer attention over the outputs of frozen task adapters (stage 2 of two).

Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247. At every layer where the fused adapters sit, with h the wrapped module's output and
Δ_i = a_i(x, h) - h the delta of adapter i (its up-projection output, for a bottleneck adapter):

    q = Q h,   k_i = K Δ_i,   v_i = V Δ_i,   α = softmax_i(q · k_i / T),   out = h + Σ_i α_i v_i

Q, K, V are d x d (with biases) per layer, Q and K ~ N(0, 0.02²), V = I (off-diagonal 1e-6, as AdapterHub
initialises it), so at init the output is h + (about) the mean of the deltas. Parameters per layer:
3 (d² + d). A regulariser λ ||V - I||² (λ = 0.01, AdapterHub's) keeps V near the identity. The fusion
adapter does nothing on its own: activate it inside a block, `model.use(st.Fuse("a", "b", fusion="f"))`,
which (by default) trains only the fusion; the fused adapters stay frozen. Its targets are the modules
holding the fused adapters, so those must be attached (loaded) before the fusion is added or loaded.
AdapterHub's `Fuse` block and "dynamic" fusion config are the reference (scores dropout included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.layer import AdapterLayer
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, register


@dataclass
class FusionConfig(MethodConfig):
    """AdapterFusion over the attached adapters `adapters` (their modules are the targets).

    Args:
        adapters: names of the adapters to fuse (at least two), as attached to the model.
        temperature: T of the softmax over adapters.
        dropout: dropout on the attention scores in training (AdapterHub: the model's attention dropout, 0.1).
        value: learn V (else the values are the deltas themselves).
        regularization: λ of λ ||V - I||² added to the training loss (0: none).
    """

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0
    dropout: float = 0.1
    value: bool = True
    regularization: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapters = list(self.adapters)
        check_field(len(self.adapters) >= 2 and all(isinstance(a, str) and a for a in self.adapters)
                    and len(set(self.adapters)) == len(self.adapters), self, "adapters",
                    "the names of at least two different attached adapters")
        check_field(isinstance(self.temperature, (int, float)) and self.temperature > 0, self, "temperature",
                    "a number > 0")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a probability in [0, 1)")
        check_field(isinstance(self.regularization, (int, float)) and self.regularization >= 0, self,
                    "regularization", "a number >= 0")


class FusionLayer(LayerAdapter):
    """Q, K (and V) of one layer; `fuse()` attends over the fused adapters' deltas."""

    fuses = True

    def __init__(self, dim: int, cfg: FusionConfig, **kw) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, **kw)
        self.key = nn.Linear(dim, dim, **kw)
        self.value = nn.Linear(dim, dim, **kw) if cfg.value else None
        self.temperature = float(cfg.temperature)
        self.scores_dropout = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()
            if self.value is not None:
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
                self.value.bias.zero_()

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return base_out  # alone, a fusion layer changes nothing

    def fuse(self, x: Tensor, base_out: Tensor, deltas: list[Tensor], base: nn.Module) -> Tensor:
        dtype = self.query.weight.dtype
        h, stacked = base_out.to(dtype), torch.stack(deltas, dim=-2).to(dtype)  # (..., d), (..., n, d)
        scores = (self.key(stacked) @ self.query(h).unsqueeze(-1)).squeeze(-1)  # (..., n)
        probs = torch.softmax(self.scores_dropout(scores) / self.temperature, dim=-1)
        values = self.value(stacked) if self.value is not None else stacked
        return base_out + (probs.unsqueeze(-2) @ values).squeeze(-2).to(base_out.dtype)

    def attention(self, base_out: Tensor, deltas: list[Tensor]) -> Tensor:
        """α over the adapters (eval: no dropout), for inspection."""
        scores = (self.key(torch.stack(deltas, dim=-2)) @ self.query(base_out).unsqueeze(-1)).squeeze(-1)
        return torch.softmax(scores / self.temperature, dim=-1)


@register
class AdapterFusion(Method):
    name = "adapter_fusion"
    config = FusionConfig
    category = "multi-task"
    params = "3(d^2 + d) per fused module (2(d^2 + d) with value=False)"
    paper = "Pfeiffer et al. 2021, arXiv:2005.00247"

    def find_targets(self, model: nn.Module, cfg: FusionConfig, skip: set[str]) -> list[str]:
        held = {a: [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and a in m.adapters]
                for a in cfg.adapters}
        missing = [a for a, names in held.items() if not names]
        if missing:
            raise ConfigError(f"FusionConfig.adapters: {missing} not attached to this model; add or load the "
                              "adapters to fuse first")
        return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and n not in skip
                and any(a in m.adapters for a in cfg.adapters)]

    def build_layer(self, base: nn.Module, cfg: FusionConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return FusionLayer(kind_of(base).sizes(base)[1], cfg, **factory(base))

    def regularizer(self, adapter: AdapterView, cfg: FusionConfig) -> Tensor | None:
        if not cfg.regularization or not cfg.value:
            return None
        terms = [(layer.value.weight - torch.eye(layer.value.weight.shape[0], device=layer.value.weight.device,
                                                 dtype=layer.value.weight.dtype)).pow(2).sum()
                 for layer in adapter.layers.values()]
        return cfg.regularization * torch.stack(terms).sum() if terms else None
