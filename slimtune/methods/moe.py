"""Mixtures of experts on one wrapped module: a general MoE over any layer method, MoLoRA, and MoV.

MoE layer: E experts (layer adapters of any layer method, each built by that method's own `build_layer`)
and a token router W_g (E, d_in), no bias, computed in float32 or wider (Switch Transformer's selective
precision, Fedus et al. 2021, arXiv:2101.03961):
    p(x) = softmax(W_g x)                                  soft routing (top_k=None): g = p
    g(x) = top-k of p, renormalised to sum 1, 0 elsewhere  top-k routing: expert i sees only its tokens
    y = base(x) + sum_i g_i(x) * (expert_i(x, base(x)) - base(x))
Input-side experts (`transforms_input`: IA3 on a feed-forward input, OFT, HRA) mix their inputs with the same
gates, x' = x + sum_i g_i (t_i(x) - x), then the base runs once on x'; for input-only experts on an affine base
(every linear kind) that is exactly sum_i g_i base(t_i(x)), the mixture of the experts' outputs.
Load balancing (Switch, eq. 4): per wrapped module L = E * sum_i f_i P_i, f_i the fraction of the call's tokens
whose top-1 expert is i, P_i the mean of p_i over them; the regulariser is load_balance * mean over modules,
so it is load_balance at perfect balance whatever the model depth.
Init: every expert as its method inits it (LoRA: B = 0, IA3: ones), so the adapter starts as the identity;
router weights N(0, router_init^2 / d_in): logits of std router_init = 0.5 for unit-RMS inputs. The mean routing
over a batch starts near uniform, and per-token gates differ enough to tell identical experts (IA3's ones,
HydraLoRA's zero heads) apart within a few steps; a zero router (router_init=0: exactly uniform) never does.
The reference codes' inits give logits of similar size: N(0, 0.02^2) weights at d_in ~ 600-2500 (MoV), nn.Linear's
0.58 (HydraLoRA).
Params per module: E * (the expert's) + E * d_in. Not mergeable: the gates depend on the token.

MoLoRA (Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit", arXiv:2309.05444) is the MoE layer
with LoRA experts and soft routing: `MoEConfig.molora(...)`, y = base(x) + sum_i p_i(x) s B_i A_i x.

MoV (same paper), its own class: E IA3 vectors l_i softly merged per token before they are applied,
    l(x) = 1 + sum_i g_i(h) (l_i - 1)  (= sum_i g_i l_i)     y = l(x) * base(x), or y = base(l(x) * x) (feed-forward)
h: what the router reads, by default the activation the vectors scale (the reference implementation's
choice: base(x) on output targets, x on feed-forward ones). One (N, E) @ (E, d) mix and one multiply instead
of E scaled copies of the output, and one base call on feed-forward targets. MoEConfig(expert=IA3Config())
computes the same function with router_input="input" (tests/test_moe.py checks it).
Params per module: E * d (d = d_out, or d_in on feed-forward targets) + E * d_router.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.base import METHODS, AdapterView, LayerAdapter, Method, Selection, factory, register
from slimtune.methods.hybrid_parts import freeze_into_buffers
from slimtune.methods.ia3 import IA3Config, IA3Method
from slimtune.methods.lora import LoraConfig

ROUTER_INIT = 0.5  # std of the initial router logits for unit-RMS inputs


# -- routing (shared with hydralora.py) --------------------------------------------------------------------
class Router(nn.Module):
    """Token router: gates over E experts from logits W h (W: (E, d), no bias), in float32 or wider.

    Init W ~ N(0, init_std^2 / d): logits of std init_std * rms(h), near-uniform gates (0: exactly uniform).

    `top_k` None: g = softmax(W h); else the k largest probabilities renormalised, zeros elsewhere.
    With `balance`, every forward with gradients keeps its Switch load-balancing term for `pop_balance()`;
    a forward without gradients clears it, so the regulariser never reads a stale call.
    """

    def __init__(self, d: int, num_experts: int, top_k: int | None, init_std: float, balance: bool,
                 **kw: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d, **kw))  # (E, d)
        if init_std > 0:  # logits of std init_std for inputs of unit RMS, whatever d
            with torch.no_grad():
                self.weight.normal_(0.0, init_std / math.sqrt(d))
        self.top_k = top_k if top_k and top_k < num_experts else None
        self.balance = balance
        self._balance: Tensor | None = None

    def probs(self, h: Tensor) -> Tensor:
        """p = softmax(W h): (..., E) for h (..., d), in float32 (float64 for float64 inputs)."""
        dt = torch.promote_types(h.dtype, torch.float32)
        return F.linear(h.to(dt), self.weight.to(dt)).softmax(-1)

    def forward(self, h: Tensor) -> Tensor:
        """Gates g (..., E)."""
        p = self.probs(h)
        self._balance = switch_balance(p.reshape(-1, p.shape[-1])) if self.balance and torch.is_grad_enabled() \
            else None
        return top_k_gates(p, self.top_k)

    def pop_balance(self) -> Tensor | None:
        """The load-balancing term of the last forward with gradients (then cleared), or None."""
        value, self._balance = self._balance, None
        return value


def top_k_gates(p: Tensor, k: int | None) -> Tensor:
    """p itself (k None), or its k largest entries per row renormalised to sum 1 and zeros elsewhere."""
    if k is None:
        return p
    top, idx = p.topk(k, dim=-1)
    return torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def switch_balance(p: Tensor) -> Tensor:
    """E * sum_i f_i P_i for router probabilities p (N, E): f_i = share of rows whose argmax is i (no gradient),
    P_i = mean of p_i. 1 at perfect balance, E when one expert takes everything."""
    E = p.shape[-1]
    f = F.one_hot(p.argmax(-1), E).to(p.dtype).mean(0)  # (E,)
    return E * (f * p.mean(0)).sum()


def balance_loss(adapter: AdapterView, weight: float) -> Tensor | None:
    """weight * mean over the adapter's modules of their routers' last balancing terms (None when none ran)."""
    if weight == 0:
        return None
    terms = [t for layer in adapter.layers.values() if (t := layer.router.pop_balance()) is not None]
    if not terms:
        return None
    return weight * torch.stack([t.to(terms[0].device) for t in terms]).mean()


def check_routing(cfg: Any, experts_field: str) -> None:
    """Validate the routing fields every mixture config shares (top_k, load_balance, router_init)."""
    E = getattr(cfg, experts_field)
    check_field(_is_int(E) and E >= 1, cfg, experts_field, "an int >= 1, e.g. 4")
    if cfg.top_k == 0:
        cfg.top_k = None
    check_field(cfg.top_k is None or (_is_int(cfg.top_k) and 1 <= cfg.top_k <= E), cfg, "top_k",
                f"None or 0 (soft routing over all experts), or an int in 1..{experts_field}={E}")
    check_field(_is_number(cfg.load_balance) and cfg.load_balance >= 0, cfg, "load_balance", "a number >= 0")
    check_field(_is_number(cfg.router_init) and cfg.router_init >= 0, cfg, "router_init",
                "a number >= 0 (the std of the router's initial logits; 0: a zero router)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the general MoE layer -----------------------------------------------------------------------------------
@dataclass
class MoEConfig(MethodConfig):
    """A token-routed mixture of `num_experts` adapters of one layer method on every target.

    Args:
        expert: the experts' method config (any layer method: LoraConfig, IA3Config, VeraConfig, OftConfig, ...),
            or a dict with a 'method' key. Its targets are used when this config gives none.
        num_experts: E.
        top_k: experts per token (renormalised softmax over them); None or 0: soft routing over all E.
        router: "token" (a router per wrapped module reading each token's input).
        load_balance: weight of the Switch load-balancing loss added to the training loss (0: none).
        router_init: std of the initial router logits for inputs of unit RMS (weights N(0, router_init^2 / d_in));
            0: zeros, exactly uniform routing (but identical experts, IA3's ones, then never tell apart).
    """

    expert: Any = field(default_factory=lambda: LoraConfig(r=4))
    num_experts: int = 4
    top_k: int | None = 2
    router: str = "token"
    load_balance: float = 0.01
    router_init: float = ROUTER_INIT

    def __post_init__(self) -> None:
        super().__post_init__()
        self.expert = _as_expert(self.expert)
        check_routing(self, "num_experts")
        check_field(self.router == "token", self, "router",
                    "'token' (per-token routing; for a gate from task ids use MOELoRA)")
        if self.targets is None and self.expert.targets is None:
            raise ConfigError(f"MoEConfig.targets=None and {type(self.expert).__name__}.targets=None: expected the "
                              "modules to adapt on either, e.g. targets=['q_proj', 'v_proj']")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "expert": self.expert.to_dict()}

    def resolve(self, module_name: str) -> MoEConfig:
        """This config with the expert's per-module choices made (LoRA's rank_pattern, IA3's feedforward)."""
        return replace(self, expert=self.expert.resolve(module_name))

    def placed(self) -> MethodConfig:
        """The expert config with this config's targets, exclude and layers (when it gives targets)."""
        if self.targets is None:
            return self.expert
        return self.expert.replace(targets=self.targets, exclude=self.exclude, layers=self.layers)

    @classmethod
    def molora(cls, num_experts: int = 4, r: int = 4, alpha: float = 16.0, **fields: Any) -> MoEConfig:
        """MoLoRA (Zadouri et al. 2023): soft-merged LoRA experts, y = base(x) + sum_i p_i(x) s B_i A_i x."""
        return cls(**{"expert": LoraConfig(r=r, alpha=alpha), "num_experts": num_experts, "top_k": None,
                      "load_balance": 0.0, **fields})


def _as_expert(expert: Any) -> MethodConfig:
    if isinstance(expert, dict):
        try:
            expert = config_from_dict(expert)
        except ConfigError as e:
            raise ConfigError(f"MoEConfig.expert: {e}") from None
    if not isinstance(expert, MethodConfig) or expert.method not in METHODS:
        raise ConfigError(f"MoEConfig.expert={expert!r}: expected a registered layer method's config, e.g. "
                          "LoraConfig(r=4), or a dict with a 'method' key")
    info = METHODS[expert.method]
    why = _unfit(info, expert)
    if why:
        raise ConfigError(f"MoEConfig.expert ({expert.method}) {why}; expected a layer method such as lora, ia3, "
                          "vera, oft")
    return expert


_MIXTURES = ("moe", "mov", "hydralora")


def _unfit(info: Any, expert: MethodConfig) -> str | None:
    """Why a method cannot be an expert, or None."""
    if info.shape != "layer":
        return f"is a {info.shape} method: an expert runs on one wrapped module"
    if info.method.needs_data or info.method.call_arguments:
        return "needs calibration data or call arguments, which the experts of one module cannot share"
    if expert.method in _MIXTURES:
        return "is a mixture itself; use one mixture with more experts"
    if info.has_step or info.has_attached or info.method.changes_trainable:
        return ("has per-adapter hooks (per-step work or attach hooks: rank budgets, freezing, hybrids), which "
                "the engine runs once per adapter, not per expert")
    if expert.modules_to_save:
        return f"has modules_to_save={expert.modules_to_save!r}: give it on the MoEConfig"
    return None


class Mixture(LayerAdapter):
    """E expert adapters and their router on one module (tensors: experts.<i>.<name>, router.weight)."""

    def __init__(self, experts: list[LayerAdapter], router: Router) -> None:
        super().__init__()
        for expert in experts:
            freeze_into_buffers(expert)  # LoRA-FA's A stays frozen: the engine only sees "experts"
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.transforms_input = experts[0].transforms_input  # one config on one module: all alike
        self._gates: Tensor | None = None  # input-side experts: the gates transform_input computed

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        self._gates = self.router(x)
        return self._mix(self._gates, x, x, lambda e, xs, _: e.transform_input(xs, base))

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        gates, self._gates = self._gates, None
        if gates is None:
            gates = self.router(x)
        return self._mix(gates, x, base_out, lambda e, xs, outs: e(xs, outs, base))

    def _mix(self, gates: Tensor, x: Tensor, a: Tensor, run: Callable[[LayerAdapter, Tensor, Tensor], Tensor]
             ) -> Tensor:
        """a + sum_i g_i (run(expert_i, x, a) - a), per token, accumulated in float32 or wider."""
        work = torch.promote_types(a.dtype, torch.float32)
        g = gates.reshape(-1, gates.shape[-1])  # (N, E)
        xf, af = x.reshape(-1, x.shape[-1]), a.reshape(-1, a.shape[-1])  # (N, d_in), (N, d_a)
        base_a = af.to(work)
        delta = torch.zeros_like(base_a)
        if self.router.top_k is None:
            for i, expert in enumerate(self.experts):
                delta = delta + g[:, i:i + 1].to(work) * (run(expert, xf, af).to(work) - base_a)
        else:
            for i, (expert, rows) in enumerate(zip(self.experts, _tokens_per_expert(g), strict=True)):
                # an expert with no tokens still runs (on none): its tensors get zero, not missing, gradients
                xs, outs = xf.index_select(0, rows), af.index_select(0, rows)
                d = g.index_select(0, rows)[:, i:i + 1].to(work) * (run(expert, xs, outs).to(work) - outs.to(work))
                # rows are distinct: index_copy into zeros = index_add (which is slow on busy multi-threaded CPUs)
                delta = delta + torch.zeros_like(delta).index_copy(0, rows, d)
        return (base_a + delta).to(a.dtype).view(a.shape)


def _tokens_per_expert(g: Tensor) -> tuple[Tensor, ...]:
    """Row indices with a non-zero gate, per expert (two host syncs for all the experts of a module)."""
    tok, which = (g > 0).nonzero(as_tuple=True)
    order = which.argsort(stable=True)
    counts = torch.bincount(which, minlength=g.shape[1]).tolist()
    return tok[order].split(counts)


def expert_view(adapter: AdapterView, i: int) -> AdapterView:
    """Adapter `adapter` narrowed to expert i on every module (with the shared state the experts share)."""
    return AdapterView(adapter.name, {n: m.experts[i] for n, m in adapter.layers.items()}, adapter.bases,
                       adapter.shared)


def _expert_method(cfg: MoEConfig) -> Method:
    return METHODS[cfg.expert.method].method


@register
class MoEMethod(Method):
    name, config, shape = "moe", MoEConfig, "layer"
    category, paper = "multi-task", "arXiv:2101.03961 (Switch routing), arXiv:2309.05444 (MoLoRA)"
    params = "num_experts*(the expert's) + num_experts*d_in (router)"
    mergeable, linear_only = False, True  # the router reads the last dimension of the module input

    def find_targets(self, model: nn.Module, cfg: MoEConfig, skip: set[str]) -> list[str]:
        return _expert_method(cfg).find_targets(model, cfg.placed(), skip)

    def build_shared(self, model: nn.Module, cfg: MoEConfig, targets: list[str], init: bool = True
                     ) -> nn.Module | None:
        """The expert method's shared state (VeRA's projections), shared by every expert too."""
        return _expert_method(cfg).build_shared(model, cfg.placed(), targets, init)

    def build_layer(self, base: nn.Module, cfg: MoEConfig, init: bool = True,
                    shared: nn.Module | None = None) -> Mixture:
        method = _expert_method(cfg)
        experts = [method.build_layer(base, cfg.expert, init, shared) for _ in range(cfg.num_experts)]
        if experts[0].fuses:
            raise NotImplementedError(f"MoEConfig.expert ({cfg.expert.method}) is a fusion layer, which combines "
                                      "other adapters inside a Fuse block; it cannot be an expert")
        if any(e.changes_base for e in experts):
            raise NotImplementedError(f"MoEConfig.expert ({cfg.expert.method}) changes the base weight at init "
                                      "(PiSSA / OLoRA residuals): experts cannot each take a residual from one base")
        router = Router(sizes(base)[0], cfg.num_experts, cfg.top_k, cfg.router_init, cfg.load_balance > 0,
                        **factory(base))
        return Mixture(experts, router)

    def select(self, model: nn.Module, cfg: MoEConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """Nothing; the expert method's own checks run (IA3's feedforward hits), and base tensors it would
        train (LoRA's bias='all') are refused: they cannot differ per expert."""
        if _expert_method(cfg).select(model, cfg.placed(), targets, init, data):
            raise ConfigError(f"MoEConfig.expert ({cfg.expert.method}) trains base tensors (a bias option?), which "
                              "cannot differ per expert; expected bias='none'")
        return []

    def regularizer(self, adapter: AdapterView, cfg: MoEConfig) -> Tensor | None:
        """load_balance * the Switch term, plus the expert method's own regulariser (HRA's orthogonality) of
        every expert, each seen as an adapter of its own."""
        terms = [balance_loss(adapter, cfg.load_balance)]
        if METHODS[cfg.expert.method].has_regularizer:
            method = _expert_method(cfg)
            terms += [method.regularizer(expert_view(adapter, i), cfg.expert) for i in range(cfg.num_experts)]
        terms = [t.reshape(()) for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def describe(self, adapter: AdapterView, cfg: MoEConfig) -> str:
        routing = "soft routing" if cfg.top_k is None or cfg.top_k >= cfg.num_experts else f"top-{cfg.top_k}"
        return f"{cfg.num_experts} {cfg.expert.method} experts, {routing}, load balance {cfg.load_balance}"


# -- MoV: soft-merged IA3 vectors ---------------------------------------------------------------------------
@dataclass
class MoVConfig(IA3Config):
    """MoV: E IA3 vectors per target, merged per token by a router (fields of IA3Config, plus routing).

    Args:
        num_experts: E (the paper uses 10 to 60).
        top_k: None or 0: soft merging (the paper's); k: the k largest gates renormalised.
        router_input: "scaled": the router reads the activation the vectors scale (base(x) on output targets,
            x on feed-forward ones), as the reference code; "input": the module input x everywhere.
        load_balance: weight of the Switch load-balancing loss (0: none, as the paper).
        router_init: std of the initial router logits for unit-RMS inputs (0: zeros; the vectors all start at
            1, so a zero router would keep them equal forever).
    """

    num_experts: int = 10
    top_k: int | None = None
    router_input: str = "scaled"
    load_balance: float = 0.0
    router_init: float = ROUTER_INIT

    def __post_init__(self) -> None:
        super().__post_init__()
        check_routing(self, "num_experts")
        check_field(self.router_input in ("scaled", "input"), self, "router_input", "'scaled' or 'input'")


class MoV(LayerAdapter):
    """L (E, d) IA3 vectors and a router on a Linear / Conv1D: output side (d = d_out) or feed-forward (d = d_in)."""

    def __init__(self, base: nn.Module, cfg: MoVConfig) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        self.transforms_input = cfg.feedforward is True
        self._reads_output = not self.transforms_input and cfg.router_input == "scaled"
        self.L = nn.Parameter(torch.ones(cfg.num_experts, d_in if self.transforms_input else d_out, **kw))
        d_router = d_out if self._reads_output else d_in
        self.router = Router(d_router, cfg.num_experts, cfg.top_k, cfg.router_init, cfg.load_balance > 0, **kw)

    def vectors(self, h: Tensor) -> Tensor:
        """l(h) = 1 + g(h) @ (L - 1): (..., d), exactly 1 while every l_i is (sum_i g_i = 1 up to rounding)."""
        g = self.router(h)  # (..., E)
        return 1 + g @ (self.L.to(g.dtype) - 1)

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        return (x * self.vectors(x)).to(x.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if self.transforms_input:
            return base_out
        return (base_out * self.vectors(base_out if self._reads_output else x)).to(base_out.dtype)


@register
class MoVMethod(IA3Method):
    name, config = "mov", MoVConfig
    category, paper = "additive", "arXiv:2309.05444"
    params = "num_experts*d_out (d_in on feed-forward targets) + num_experts*d_router"
    mergeable, peft_type = False, None

    def build_layer(self, base: nn.Module, cfg: MoVConfig, init: bool = True,
                    shared: nn.Module | None = None) -> MoV:
        return MoV(base, cfg)

    def regularizer(self, adapter: AdapterView, cfg: MoVConfig) -> Tensor | None:
        return balance_loss(adapter, cfg.load_balance)

    def to_peft(self, cfg: MoVConfig, ctx: Any) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for 'mov': HF PEFT has no such method; save it with "
                                  "model.save(path) (slimtune's format)")

    def from_peft(self, data: dict[str, Any]) -> MoVConfig:
        raise NotImplementedError("HF PEFT has no MoV adapters")


__all__ = ["MoEConfig", "MoEMethod", "MoV", "MoVConfig", "MoVMethod", "Mixture", "Router", "balance_loss",
           "check_routing", "expert_view", "switch_balance", "top_k_gates"]
