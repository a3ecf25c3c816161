"""Diff pruning (Guo et al. 2021, arXiv:2012.07463): learn a sparse task diff of the weights.

    W = W0 + delta,   delta = z * w                         w, log_alpha: one per entry of W
    z = clamp(s * (r - l) + l, 0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  u ~ U(0, 1)
    E[L0] = sum_i sigmoid(log_alpha_i - beta * log(-l / r))      (hard concrete, Louizos et al. 2018)
    loss = task loss + penalty * E[L0] / N                       N: entries of all targeted weights

Two phases, one adapter name:

1. L0 phase (`DiffPruningConfig()`): w (zeros) and log_alpha (`init_log_alpha`, so z ~ 1) train for
   every weight of `targets` (default "all-linear"); `model.regularization_loss()` is the penalty
   (st.Trainer adds it; a plain loop adds it to the loss). The noise u is drawn per optimizer step
   (from a per-module seed and the step `model.step()` passes), so every micro-batch and recomputed
   forward of one step sees the same gate; a plain loop calls `model.step(step, opt)` after each
   optimizer step, as for every method. In eval, z is the deterministic
   clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1). Memory: two extra copies of the targeted weights
   (w, log_alpha) and their optimizer state. Merging adds delta (unmerge restores the copy it kept).
2. `prune(model)`: magnitude-prune delta to exactly k = round(density * N) entries (global top-k of
   |z * w|), and replace the adapter by a sparse selection of those entries holding W0 + delta
   (`DiffPruningConfig(pruned=True)`); re-fit it with a new optimizer: only the k entries train,
   the file holds `<weight>.sparse_index` + `.sparse_values`, unmerge / disable are exact.

    model = st.attach(base, DiffPruningConfig(density=0.005, penalty=1.0))
    train(model, steps=l0_steps)        # loss = out.loss + model.regularization_loss()
    prune(model)                        # exactly 0.5% of the targeted entries left
    train(model, steps=refit_steps)     # a new optimizer over model.trainable_parameters()
    model.save("adapter")               # loads as the sparse adapter

Biases and norm gains are not pruned here (the paper prunes them too): pair with BitFit / LN-tuning
adapters if they should train.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.methods._selective import budget, density_line, is_fraction, top_k_masks
from slimtune.methods.base import AdapterView, LayerAdapter, Method, PeftContext, Selection, factory, register
from slimtune.targets import find_targets as modules_of

if TYPE_CHECKING:
    from slimtune.tuned import TunedModel


@dataclass
class DiffPruningConfig(MethodConfig):
    """Diff pruning on the weights of `targets` (module docstring)."""

    targets: str | list[str] | None = "all-linear"
    density: float = 0.005  # fraction of the targeted weight entries prune() keeps (the paper: 0.005)
    penalty: float = 1.0  # weight of the expected L0 density E[L0] / N in the loss
    temperature: float = 2 / 3  # beta of the hard concrete
    lower: float = -1.5  # l: stretch limits of the hard concrete (l < 0, r > 1)
    upper: float = 1.5  # r
    init_log_alpha: float = 5.0  # log_alpha at init: every gate starts open (z ~ 1)
    pruned: bool = False  # set by prune(): the fixed-mask sparse adapter of the re-fit phase

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.density), self, "density", "a fraction in (0, 1], e.g. 0.005")
        check_field(_number(self.penalty) and self.penalty >= 0, self, "penalty", "a float >= 0")
        check_field(_number(self.temperature) and self.temperature > 0, self, "temperature", "a float > 0, e.g. 2/3")
        check_field(_number(self.lower) and self.lower < 0, self, "lower", "a float < 0, e.g. -1.5")
        check_field(_number(self.upper) and self.upper > 1, self, "upper", "a float > 1, e.g. 1.5")
        check_field(_number(self.init_log_alpha), self, "init_log_alpha", "a finite float, e.g. 5.0")
        check_field(isinstance(self.pruned, bool), self, "pruned", "True or False")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class DiffGate(LayerAdapter):
    """delta = z * w on one module's weight, in the weight's own layout (any module that reads self.weight)."""

    peft_keys = {"w": "diff_w", "log_alpha": "diff_log_alpha"}

    def __init__(self, base: nn.Module, cfg: DiffPruningConfig) -> None:
        super().__init__()
        shape, kw = base.weight.shape, factory(base)
        self.w = nn.Parameter(torch.zeros(shape, **kw))
        self.log_alpha = nn.Parameter(torch.full(shape, float(cfg.init_log_alpha), **kw))
        self.beta, self.lower, self.upper = cfg.temperature, cfg.lower, cfg.upper
        self._original: Tensor | None = None  # the base weight while merged
        self.noise_seed = int(torch.randint(2**40, ()))  # drawn from the global RNG: seeded runs repeat
        self.step = 0  # optimizer steps taken (DiffPruningMethod.step): a new gate sample each step

    def gate(self, sample: bool) -> Tensor:
        if sample:  # u from (this gate's seed, optimizer step): every forward of one step sees the same gate
            g = torch.Generator(device=self.log_alpha.device).manual_seed(self.noise_seed + 1_000_003 * self.step)
            u = torch.rand(self.log_alpha.shape, generator=g, device=self.log_alpha.device)  # float32
            s = torch.sigmoid((torch.logit(u, eps=1e-6) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.upper - self.lower) + self.lower).clamp(0, 1)

    def delta(self, sample: bool | None = None) -> Tensor:
        return self.gate(self.training if sample is None else sample) * self.w

    def expected_l0(self) -> Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.lower / self.upper)).sum()

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        W = base.weight
        return functional_call(base, {"weight": W + self.delta().to(W.dtype)}, (x,))

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        W = base.weight  # f(x; W0 + delta) - f(x; W0): generic over the module's own forward
        return base_out + functional_call(base, {"weight": W + self.delta().to(W.dtype)}, (x,)) - base(x)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self._original = base.weight.detach().clone()
        base.weight.add_(self.delta(sample=False).to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self._original is not None:
            base.weight.copy_(self._original)  # bit for bit
        self._original = None


@register
class DiffPruningMethod(Method):
    name, config, shape = "diff_pruning", DiffPruningConfig, "selective"
    category, params, paper = "selective", "L0 phase: 2 * weight entries; pruned: density * entries", \
        "arXiv:2012.07463"
    mergeable = True

    def find_targets(self, model: nn.Module, cfg: DiffPruningConfig, skip: set[str]) -> list[str]:
        return [] if cfg.pruned else modules_of(model, cfg, skip=skip)  # the L0 phase wraps its targets

    def build_layer(self, base: nn.Module, cfg: DiffPruningConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        weight = base._parameters.get("weight")
        if weight is None or not weight.is_floating_point():
            raise NotImplementedError("diff pruning needs a floating-point `weight` parameter on the module")
        return DiffGate(base, cfg)

    def select(self, model: nn.Module, cfg: DiffPruningConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        if not cfg.pruned:
            return []
        if init:
            raise ConfigError("DiffPruningConfig(pruned=True) is the re-fit phase, whose mask comes from "
                              "diff_pruning.prune(model) or a saved adapter; attach DiffPruningConfig() to train "
                              "the L0 phase first")
        return [Selection(f"{t}.weight", sparse=True) for t in modules_of(model, cfg)]

    def step(self, adapter: AdapterView, cfg: DiffPruningConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        for gate in adapter.layers.values():
            if isinstance(gate, DiffGate):
                gate.step = global_step  # the next step's noise

    def regularizer(self, adapter: AdapterView, cfg: DiffPruningConfig) -> Tensor | None:
        gates = [m for m in adapter.layers.values() if isinstance(m, DiffGate)]
        if not gates or not cfg.penalty:
            return None
        n = sum(g.log_alpha.numel() for g in gates)
        return cfg.penalty * torch.stack([g.expected_l0() for g in gates]).sum() / n

    def describe(self, adapter: AdapterView, cfg: DiffPruningConfig) -> str | None:
        if cfg.pruned:
            return "pruned (fixed mask): " + density_line(adapter.selections)
        gates = list(adapter.layers.values())
        with torch.no_grad():
            open_ = sum(int((g.gate(sample=False) > 0).sum()) for g in gates)
        n = sum(g.log_alpha.numel() for g in gates)
        return f"L0 phase: {100 * open_ / max(n, 1):.2f}% of gates open; prune() keeps {budget(cfg.density, n):,}"

    def to_peft(self, cfg: DiffPruningConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for diff_pruning: HF PEFT has no diff pruning; save in slimtune's "
                                  "format (or merge it: slimtune merge)")


def pruned_tensors(adapter: AdapterView, cfg: DiffPruningConfig) -> dict[str, Tensor]:
    """`<weight>.sparse_index` / `.sparse_values` of the exact budget: the k largest |delta| over all targets."""
    with torch.no_grad():
        deltas = {m: g.delta(sample=False) for m, g in adapter.layers.items()}
        masks = top_k_masks({m: d.abs().float() for m, d in deltas.items()}, cfg.density, "global")
        out = {}
        for module, mask in masks.items():
            W0 = adapter.bases[module].weight.detach().reshape(-1)
            index = mask.reshape(-1).nonzero().squeeze(1)
            out[f"{module}.weight.sparse_index"] = index
            out[f"{module}.weight.sparse_values"] = W0[index] + deltas[module].reshape(-1)[index].to(W0.dtype)
    return out


def prune(model: TunedModel, name: str = "default") -> TunedModel:
    """Magnitude-prune adapter `name`'s diff to exactly `density` of the entries and turn it, in place,
    into the sparse fixed-mask adapter of the re-fit phase (same name, same active set). Train it with a
    new optimizer: the L0 phase's parameters are gone.

    Raises:
        ConfigError: `name` is not a diff-pruning adapter in its L0 phase.
        RuntimeError: the adapter is merged (unmerge first).
    """
    cfg = model.configs.get(name)
    if not isinstance(cfg, DiffPruningConfig) or cfg.pruned:
        state = "already pruned" if isinstance(cfg, DiffPruningConfig) else f"a {type(cfg).__name__} adapter"
        raise ConfigError(f"prune(model, {name!r}): expected a diff-pruning adapter in its L0 phase, got {state}")
    tensors = pruned_tensors(model.view(name), cfg)
    keys = tuple(DiffGate.peft_keys.values())
    tensors.update({k: v for k, v in model.adapter_state_dict(name).items() if not k.endswith(keys)})  # heads
    active = model.active
    model.delete(name)
    model.add(cfg.replace(pruned=True), name, init=False)
    model.load_adapter_state_dict(tensors, name)
    if active:
        model.use(active)
    return model
