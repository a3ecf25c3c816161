"""LoHa and LoKr: dense weight updates built from Hadamard and Kronecker products of small factors.

LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS, Yeh et al. 2024, arXiv:2309.14859):
    delta_W = s * (W1a @ W1b) * (W2a @ W2b)       (elementwise product; rank up to r^2)   s = alpha / r
    W1a, W2a: (d_out, r)   W1b, W2b: (r, d_in * kernel)
    effective conv (FedPara's Proposition 3, kernel > 1): each factor is a CP/Tucker product
    einsum("ijkl,jr,ip->prkl", T, Wb, Wa) with a core T: (r, r, k1, k2) and Wa: (r, d_out), Wb: (r, d_in).
    Init (as HF PEFT): W1a, W1b, W2a, T1, T2 kaiming-uniform, W2b = 0, so delta_W = 0.
LoKr / KronA (Edalati et al. 2022, arXiv:2212.10650; LyCORIS):
    delta_W = s * W1 (x) W2      (Kronecker product)   W1: (a, c)  W2: (b, e)   d_out = a*b, d_in = c*e
    (a, b) and (c, e) come from `factorization(d, decompose_factor)` exactly as HF PEFT computes them.
    W2 is stored as W2a @ W2b (rank r) when r < max(b, e) / 2; W1 likewise when `decompose_both` and
    r < max(a, c) / 2. Convolutions: W2 carries the kernel (b, e, *kernel), or with effective conv a CP
    core (W2a, W2b, T2). Init (as HF PEFT): W1 = 0 (W1a = 0 when factored), the rest kaiming-uniform;
    init="lycoris" puts the zero on W2 (W2b) instead.
On Linear / GPT-2 Conv1D, LoKr's forward never forms delta_W: (W1 (x) W2) x = vec(W1 X W2^T).
Both merge additively (W += delta_W). Tensors are saved under HF PEFT's names (hada_w1_a, lokr_w1, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import LayerAdapter, Method, PeftContext, factory, fused_dense, peft_target_fields, register
from slimtune.methods.lora import _pattern_value


# -- configs --------------------------------------------------------------------------------------------
@dataclass
class _LycorisConfig(MethodConfig):
    """Fields LoHa and LoKr share (HF PEFT's LycorisConfig)."""

    aliases = {**MethodConfig.aliases, "rank": "r", "init_weights": "init",
               "use_effective_conv2d": "effective_conv2d"}
    inits = ("default", "random")

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    effective_conv2d: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, self, "r",
                    "an int >= 1, e.g. r=8")
        check_field(_number(self.alpha) and self.alpha > 0, self, "alpha", "a number > 0")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            check_field(_number(value) and 0 <= value < 1, self, name, "a float in [0, 1)")
        check_field(isinstance(self.effective_conv2d, bool), self, "effective_conv2d", "True or False")
        check_field(self.init in self.inits, self, "init", " or ".join(repr(i) for i in self.inits))
        check_field(self.rank_pattern is None or (isinstance(self.rank_pattern, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.rank_pattern.values())),
            self, "rank_pattern", "a dict {module-name regex: int >= 1}")
        check_field(self.alpha_pattern is None or (isinstance(self.alpha_pattern, dict) and all(
            _number(v) and v > 0 for v in self.alpha_pattern.values())),
            self, "alpha_pattern", "a dict {module-name regex: number > 0}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def resolve(self, module_name: str) -> _LycorisConfig:
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        return replace(self, r=r, alpha=alpha, rank_pattern=None, alpha_pattern=None)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LohaConfig(_LycorisConfig):
    """LoHa: delta_W = (alpha / r) * (W1a @ W1b) * (W2a @ W2b) elementwise; W2b = 0 at init (arXiv:2108.06098).

    Args:
        r: rank of each of the two factors (delta_W has rank up to r^2).
        alpha: numerator of the scale alpha / r.
        rank_dropout: training only: each output row of delta_W is dropped with this probability and
            the kept rows are rescaled by 1 / (fraction kept), as HF PEFT.
        module_dropout: training only: the whole adapter is skipped for a forward with this probability.
        effective_conv2d: convolutions with kernel > 1: CP-decomposed factors (FedPara's Proposition 3).
        init: "default" (W2b = 0: the base model at start) or "random" (every factor random; not a no-op).
        rank_pattern / alpha_pattern: {regex suffix of a module name: r or alpha} overrides.
    """


@dataclass
class LokrConfig(_LycorisConfig):
    """LoKr / KronA: delta_W = (alpha / r) * W1 (x) W2 (Kronecker); W1 = 0 at init (arXiv:2212.10650).

    Args:
        r: rank of the factored Kronecker factor(s) (W2, and W1 with `decompose_both`); a factor whose
            sides are both <= 2r is stored in full instead.
        alpha: numerator of the scale alpha / r.
        rank_dropout: training only: each output row of delta_W is dropped with this probability.
        rank_dropout_scale: rescale the kept rows by 1 / (fraction kept).
        module_dropout: training only: the whole adapter is skipped for a forward with this probability.
        effective_conv2d: convolutions with kernel > 1 and a factored W2: a CP core carries the kernel.
        decompose_both: store W1 as a rank-r product too (when r < max(W1's sides) / 2).
        decompose_factor: -1: split d_in and d_out into factors near their square roots; f > 0: one
            factor f where it divides the dimension, else the largest divisor pair with a side <= f.
        init: "default" (W1 = 0), "lycoris" (W2 = 0, as the LyCORIS repository) or "random" (not a no-op).
        rank_pattern / alpha_pattern: {regex suffix of a module name: r or alpha} overrides.
    """

    inits = ("default", "lycoris", "random")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.decompose_both, bool), self, "decompose_both", "True or False")
        f = self.decompose_factor
        check_field(isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f >= 1), self,
                    "decompose_factor", "-1 (split near the square root) or an int >= 1")
        check_field(isinstance(self.rank_dropout_scale, bool), self, "rank_dropout_scale", "True or False")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, as HF PEFT / LyCORIS split a dimension for LoKr.

    factor > 0 dividing the dimension: (factor, dimension // factor), in that order. Otherwise the
    divisor pair (m <= n) closest to the square root whose smaller side is at most `factor` (-1: no bound).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        other = dimension // cand
        if cand + other > m + n or cand > bound:
            break
        m, n = cand, other
    return (m, n) if m <= n else (n, m)


# -- the adapters ---------------------------------------------------------------------------------------
class _Lycoris(LayerAdapter):
    """Shared by LoHa and LoKr: the weight shape, scale, dropouts and the forward through a dense delta_W."""

    def __init__(self, base: nn.Module, cfg: _LycorisConfig) -> None:
        super().__init__()
        kind = kind_of(base)
        if kind.name == "embedding":
            raise NotImplementedError(f"{type(self).__name__} on {type(base).__name__} is not implemented "
                                      "(Linear, GPT-2 Conv1D, Conv1d and Conv2d)")
        self.conv = kind.name == "conv"
        if self.conv:
            self.shape = tuple(kind.weight(base).shape)  # (d_out, d_in / groups, *kernel)
        else:
            d_in, d_out = kind.sizes(base)
            self.shape = (d_out, d_in)
        self.r, self.scale = cfg.r, cfg.scale
        self.rank_dropout, self.module_dropout = float(cfg.rank_dropout), float(cfg.module_dropout)
        self.rescale_rank_dropout = True

    def _param(self, base: nn.Module, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **factory(base)))

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.delta()

    def delta(self) -> Tensor:
        """s * delta_W in (d_out, d_in[, *kernel]) layout."""
        raise NotImplementedError

    def _row_drop(self, like: Tensor) -> Tensor | None:
        """Training with rank_dropout: a keep-mask over the d_out rows (rescaled as configured), else None."""
        if not (self.training and self.rank_dropout > 0):
            return None
        keep = (torch.rand(self.shape[0], device=like.device) > self.rank_dropout).to(like.dtype)
        if self.rescale_rank_dropout:
            keep = keep / keep.mean().clamp_min(1 / self.shape[0])  # all dropped: zeros, not NaN
        return keep

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if self.training and self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
            return base_out
        return base_out + self.branch(x, base).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Alone and active on a Linear / Conv1D without dropouts: one GEMM with W + delta_W."""
        if self.conv or (self.training and (self.rank_dropout > 0 or self.module_dropout > 0)):
            return None
        return fused_dense(x, base, self.delta())

    def branch(self, x: Tensor, base: nn.Module) -> Tensor:
        """x through delta_W, shaped like the base output (formed densely, as HF PEFT)."""
        delta = self.delta()
        keep = self._row_drop(delta)
        if keep is not None:
            delta = delta * keep.view(-1, *(1,) * (delta.dim() - 1))
        x = x.to(delta.dtype)
        if self.conv:
            return base._conv_forward(x, delta, None)  # the base's stride, padding (mode), dilation, groups
        return x @ delta.T


def _kaiming(t: Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class Loha(_Lycoris):
    """LoHa on a Linear, GPT-2 Conv1D, Conv1d or Conv2d: y = base(x) + x through s * (W1a W1b) * (W2a W2b)."""

    peft_keys = {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a", "w2_b": "hada_w2_b",
                 "t1": "hada_t1", "t2": "hada_t2"}

    def __init__(self, base: nn.Module, cfg: LohaConfig, init: bool = True) -> None:
        super().__init__(base, cfg)
        r, shape = cfg.r, self.shape
        kernel = shape[2:]
        self.cp = self.conv and cfg.effective_conv2d and math.prod(kernel) > 1
        if self.cp:  # PEFT's shapes; a Conv1d kernel k is stored as (k, 1)
            core = (*kernel, 1) if len(kernel) == 1 else kernel
            self.t1, self.t2 = self._param(base, r, r, *core), self._param(base, r, r, *core)
            self.w1_a, self.w1_b = self._param(base, r, shape[0]), self._param(base, r, shape[1])
            self.w2_a, self.w2_b = self._param(base, r, shape[0]), self._param(base, r, shape[1])
        else:
            flat = math.prod(shape[1:])
            self.w1_a, self.w1_b = self._param(base, shape[0], r), self._param(base, r, flat)
            self.w2_a, self.w2_b = self._param(base, shape[0], r), self._param(base, r, flat)
        for p in self.parameters():
            _kaiming(p)
        if cfg.init == "default":
            with torch.no_grad():
                self.w2_b.zero_()

    def delta(self) -> Tensor:
        if self.cp:
            one = torch.einsum("ijkl,jr,ip->prkl", self.t1, self.w1_b, self.w1_a)
            two = torch.einsum("ijkl,jr,ip->prkl", self.t2, self.w2_b, self.w2_a)
            product = one * two
        else:
            product = _Hadamard.apply(self.w1_a, self.w1_b, self.w2_a, self.w2_b)
        return (product * self.scale).reshape(self.shape)


class _Hadamard(torch.autograd.Function):
    """(W1a W1b) * (W2a W2b), saving only the factors: backward recomputes the two products."""

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = None
        if needs[0] or needs[1]:
            g1 = grad * (w2a @ w2b)  # d loss / d (W1a W1b)
            g1a = g1 @ w1b.T if needs[0] else None
            g1b = w1a.T @ g1 if needs[1] else None
        if needs[2] or needs[3]:
            g2 = grad * (w1a @ w1b)
            g2a = g2 @ w2b.T if needs[2] else None
            g2b = w2a.T @ g2 if needs[3] else None
        return g1a, g1b, g2a, g2b


class Lokr(_Lycoris):
    """LoKr on a Linear, GPT-2 Conv1D, Conv1d or Conv2d: y = base(x) + x through s * W1 (x) W2."""

    peft_keys = {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "w2": "lokr_w2",
                 "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "t2": "lokr_t2"}

    def __init__(self, base: nn.Module, cfg: LokrConfig, init: bool = True) -> None:
        super().__init__(base, cfg)
        self.rescale_rank_dropout = cfg.rank_dropout_scale
        r, kernel = cfg.r, self.shape[2:]
        self.sizes = lokr_sizes(self.shape[1], self.shape[0], cfg.decompose_factor)
        (a, b), (c, e) = self.sizes
        self.full_w1 = not (cfg.decompose_both and r < max(a, c) / 2)
        self.full_w2 = not r < max(b, e) / 2
        self.cp = self.conv and not self.full_w2 and cfg.effective_conv2d and math.prod(kernel) > 1
        if self.full_w1:
            self.w1 = self._param(base, a, c)
        else:
            self.w1_a, self.w1_b = self._param(base, a, r), self._param(base, r, c)
        if self.full_w2:
            self.w2 = self._param(base, b, e, *kernel)
        elif self.cp:
            self.t2 = self._param(base, r, r, *((*kernel, 1) if len(kernel) == 1 else kernel))
            self.w2_a, self.w2_b = self._param(base, r, b), self._param(base, r, e)
        else:
            self.w2_a, self.w2_b = self._param(base, b, r), self._param(base, r, e * math.prod(kernel))
        for p in self.parameters():
            _kaiming(p)
        with torch.no_grad():
            if cfg.init == "default":  # W1 = 0
                (self.w1 if self.full_w1 else self.w1_a).zero_()
            elif cfg.init == "lycoris":  # W2 = 0
                (self.w2 if self.full_w2 else self.w2_b).zero_()

    def factors(self) -> tuple[Tensor, Tensor]:
        w1 = self.w1 if self.full_w1 else self.w1_a @ self.w1_b
        if self.full_w2:
            w2 = self.w2
        elif self.cp:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a @ self.w2_b
        return w1, w2

    def delta(self) -> Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        w2 = w2.reshape(-1).view(w2.shape)  # plain strides: kron fails on the CP core's odd size-1 stride
        # HF PEFT's layout, including for a full 3-d W2 of a Conv1d: kron((1, a, c), (b, e, k)) then reshape
        return (torch.kron(w1, w2) * self.scale).reshape(self.shape)

    def branch(self, x: Tensor, base: nn.Module) -> Tensor:
        if self.conv:
            return super().branch(x, base)
        w1, w2 = self.factors()  # (a, c), (b, e)
        (a, b), (c, e) = self.sizes
        X = x.to(w1.dtype).reshape(-1, c, e)
        y = (w1 @ (X @ w2.T)).reshape(*x.shape[:-1], a * b) * self.scale  # vec(W1 X W2^T)
        keep = self._row_drop(y)
        return y if keep is None else y * keep


def lokr_sizes(d_in: int, d_out: int, factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, b), (c, e)): W1 is (a, c), W2 is (b, e), d_out = a*b, d_in = c*e (HF PEFT's `shape`)."""
    return factorization(d_out, factor), factorization(d_in, factor)


# -- the methods ---------------------------------------------------------------------------------------
class _LycorisMethod(Method):
    shape, category, mergeable = "layer", "reparameterized", True
    adapter: type[_Lycoris] = _Lycoris

    def build_layer(self, base: nn.Module, cfg: _LycorisConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return self.adapter(base, cfg, init)

    def _check_peft_kinds(self, ctx: PeftContext) -> None:
        other = sorted(ctx.target_kinds - {"linear", "conv"})
        if other:
            raise NotImplementedError(f"format='peft' for {self.name!r} on {', '.join(other)} modules: HF PEFT's "
                                      f"{self.peft_type} supports Linear, Conv1d and Conv2d only")

    def to_peft(self, cfg: _LycorisConfig, ctx: PeftContext) -> dict[str, Any]:
        self._check_peft_kinds(ctx)
        return {
            **ctx.common(self.peft_type),
            "auto_mapping": None,
            "rank_pattern": cfg.rank_pattern or {},
            "alpha_pattern": cfg.alpha_pattern or {},
            "r": cfg.r,
            "alpha": cfg.alpha,
            "rank_dropout": cfg.rank_dropout,
            "module_dropout": cfg.module_dropout,
            "use_effective_conv2d": cfg.effective_conv2d,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "init_weights": {"default": True, "random": False}.get(cfg.init, cfg.init),
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": ctx.modules_to_save,
        }

    def from_peft(self, data: dict[str, Any]) -> _LycorisConfig:
        return config_from_dict(self._fields_from_peft(data))

    def _fields_from_peft(self, data: dict[str, Any]) -> dict[str, Any]:
        init = data.get("init_weights", True)
        return {
            "method": self.name,
            "r": int(data.get("r", 8)),
            "alpha": float(data.get("alpha", 8)),
            "rank_dropout": float(data.get("rank_dropout", 0.0)),
            "module_dropout": float(data.get("module_dropout", 0.0)),
            "effective_conv2d": bool(data.get("use_effective_conv2d", False)),
            "init": init if isinstance(init, str) else ("default" if init else "random"),
            **peft_target_fields(data),
            "rank_pattern": data.get("rank_pattern") or None,
            "alpha_pattern": data.get("alpha_pattern") or None,
        }


@register
class LohaMethod(_LycorisMethod):
    name, config, adapter = "loha", LohaConfig, Loha
    params = "2*r*(d_in*k+d_out), k: kernel size (docs/methods/loha_lokr.md)"
    paper, peft_type = "arXiv:2108.06098", "LOHA"


@register
class LokrMethod(_LycorisMethod):
    name, config, adapter = "lokr", LokrConfig, Lokr
    params = "a*c+b*e*k, d_out=a*b, d_in=c*e (docs/methods/loha_lokr.md)"
    paper, peft_type = "arXiv:2212.10650", "LOKR"

    def to_peft(self, cfg: LokrConfig, ctx: PeftContext) -> dict[str, Any]:
        return {**super().to_peft(cfg, ctx), "decompose_both": cfg.decompose_both,
                "decompose_factor": cfg.decompose_factor, "rank_dropout_scale": cfg.rank_dropout_scale}

    def _fields_from_peft(self, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._fields_from_peft(data), "decompose_both": bool(data.get("decompose_both", False)),
                "decompose_factor": int(data.get("decompose_factor", -1)),
                "rank_dropout_scale": bool(data.get("rank_dropout_scale", False))}


__all__ = ["Loha", "LohaConfig", "LohaMethod", "Lokr", "LokrConfig", "LokrMethod", "factorization", "lokr_sizes"]
