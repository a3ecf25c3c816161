"""LoRA family: low-rank updates of frozen weights.

LoRA (Hu et al. 2021, arXiv:2106.09685):
    y = base(x) + s * drop(x) @ A.T @ B.T      A: (r, d_in)  B: (d_out, r)
    delta_W = s * B @ A        s = alpha / r
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): s = alpha / sqrt(r).
LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A frozen after init, only B trains.
Inits: "default" A kaiming-uniform, B = 0 (identity at start); "gaussian" A ~ N(0, 1/r);
"pissa" / "pissa_niter_K" (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r SVD of W0, the
base keeps the residual W0 - s*B@A; "olora" (Buyukakyuz 2024, arXiv:2406.01775): from QR of W0;
"loftq" (Li et al. 2023, arXiv:2310.08659): from the factors st.quantize(..., loftq_rank=r) left on a
quantized base (slimtune/quant/loftq.py); the base already holds LoftQ's Q, nothing is installed.
Merge: W += delta_W. PiSSA/OLoRA adapters are saved as the rank-2r LoRA of the same delta against
the original base, so any LoRA loader (HF PEFT, vLLM) can use them.

DoRA (Liu et al. 2024, arXiv:2402.09353), its own class below:
    W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row      m: (d_out,) init ||W0||_row
The row norm is treated as a constant in backward, as the paper does. Beside other adapters on the
same layer, the norm is of W0 + s*B@A (W0 without the other adapters), in forward and in merge alike.
"""


from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import add_to_weight, kind_of, sizes, weight_2d
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import (
    AdapterView,
    LayerAdapter,
    Method,
    PeftContext,
    Selection,
    bias_selections,
    factory,
    peft_target_fields,
    register,
)

_INITS = re.compile(r"default|gaussian|olora|loftq|pissa(_niter_\d+)?")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA and its one-field variants (rsLoRA, LoRA-FA, init schemes).

    Args:
        r: rank of the update.
        alpha: numerator of the scale s = alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter branch input only.
        rslora: rank-stabilised scale alpha / sqrt(r).
        init: "default" | "gaussian" | "pissa" | "pissa_niter_K" (randomized SVD, K iterations) | "olora" |
            "loftq" (base quantized by st.quantize(model, fmt, loftq_rank=r, loftq_iter=T)).
        bias: "none" | "lora_only" (biases of wrapped modules train) | "all" (every bias trains).
        freeze_A: LoRA-FA: A stays at its random init; only B trains.
        rank_pattern / alpha_pattern: {regex suffix of a module name: r or alpha} overrides.
    """

    aliases = {**MethodConfig.aliases, "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "use_rslora": "rslora", "init_lora_weights": "init"}

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    bias: str = "none"
    freeze_A: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, self, "r",
                    "an int >= 1, e.g. r=8")
        check_field(isinstance(self.alpha, (int, float)) and self.alpha > 0, self, "alpha", "a number > 0")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        check_field(isinstance(self.init, str) and _INITS.fullmatch(self.init) is not None, self, "init",
                    "'default', 'gaussian', 'pissa', 'pissa_niter_K', 'olora' or 'loftq'")
        check_field(self.bias in ("none", "lora_only", "all"), self, "bias", "'none', 'lora_only' or 'all'")
        for value in (self.rank_pattern or {}).values():
            check_field(isinstance(value, int) and value >= 1, self, "rank_pattern", "ints >= 1 as values")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def resolve(self, module_name: str) -> LoraConfig:
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        return replace(self, r=r, alpha=alpha, rank_pattern=None, alpha_pattern=None)

    def as_rank_doubled(self) -> LoraConfig:
        """The same scales at twice the rank: PiSSA/OLoRA adapters are saved as rank-2r LoRA."""
        factor = math.sqrt(2) if self.rslora else 2.0
        return replace(
            self,
            r=2 * self.r,
            alpha=self.alpha * factor,
            init="default",
            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()} if self.rank_pattern else None,
            alpha_pattern={k: v * factor for k, v in self.alpha_pattern.items()} if self.alpha_pattern else None,
        )


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: LoRA plus a trainable magnitude per output feature (fields as LoraConfig)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.init in ("default", "gaussian"), self, "init",
                    "'default' or 'gaussian' (PiSSA/OLoRA with DoRA is not implemented)")


def _pattern_value(pattern: dict | None, module_name: str, default):
    for key, value in (pattern or {}).items():  # PEFT semantics: the key is a regex on a name suffix
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class LowRank(LayerAdapter):
    """A and B of a LoRA on any wrappable module; subclasses give the shapes and the branch's forward.

    Shapes seen flat: A (r, d_in * kernel), B (d_out, r); delta_W = s * B @ A in (d_out, d_in) layout.
    """

    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}

    def __init__(self, base: nn.Module, cfg: LoraConfig, init: bool, a_shape: tuple, b_shape: tuple) -> None:
        super().__init__()
        kw = factory(base)
        self.r, self.scale, self.init_name = cfg.r, cfg.scale, cfg.init
        self.A = nn.Parameter(torch.empty(*a_shape, **kw))
        self.B = nn.Parameter(torch.zeros(*b_shape, **kw))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.frozen = frozenset({"A"}) if cfg.freeze_A else frozenset()
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.changes_base = cfg.init.startswith("pissa") or cfg.init == "olora"
        if init:
            self._init_from_base(base, cfg.init)

    @torch.no_grad()
    def _init_from_base(self, base: nn.Module, scheme: str) -> None:
        if scheme == "gaussian":
            nn.init.normal_(self.A, std=1 / self.r)
        elif scheme == "loftq":
            from slimtune.quant.loftq import lora_factors

            A, B = lora_factors(base, self.r, self.scale)
            self.A.copy_(A.reshape(self.A.shape))
            self.B.copy_(B.reshape(self.B.shape))
        elif self.changes_base:
            W = weight_2d(base).float()  # (d_out, d_in * kernel)
            if self.r > min(W.shape):
                raise ValueError(f"init={scheme!r} needs r <= min(d_out, d_in) = {min(W.shape)}, got r={self.r}")
            A, B = (_pissa if scheme.startswith("pissa") else _olora)(W, self.r, self.scale, scheme)
            self.A.copy_(A.reshape(self.A.shape))
            self.B.copy_(B.reshape(self.B.shape))
        if self.changes_base:  # what the base gives up at install(); kept for disable/detach/export
            self.register_buffer("A0", self.A.detach().clone(), persistent=False)
            self.register_buffer("B0", self.B.detach().clone(), persistent=False)

    def branch(self, x: Tensor, A: Tensor, B: Tensor, base: nn.Module) -> Tensor:
        """s * (x through A then B), shaped like the base output."""
        raise NotImplementedError

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = x if self.drop is None else self.drop(x)
        return base_out + self.branch(h, self.A, self.B, base).to(base_out.dtype)

    def inactive_forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        """The base holds W0 - s B0 A0 while attached: give back the original base output."""
        return base_out + self.branch(x, self.A0, self.B0, base).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.scale * (self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.r, -1))

    def install(self, base: nn.Module) -> None:
        if self.changes_base:
            with torch.no_grad():
                add_to_weight(base, self._original_delta(), sign=-1.0)  # the base keeps the residual

    def release(self, base: nn.Module) -> None:
        if self.changes_base:
            with torch.no_grad():
                add_to_weight(base, self._original_delta())

    def _original_delta(self) -> Tensor:
        return self.scale * (self.B0.reshape(self.B0.shape[0], -1) @ self.A0.reshape(self.r, -1))

    def export_tensors(self) -> dict[str, Tensor]:
        """Tensors of an equivalent LoRA against the untouched base: rank 2r for PiSSA/OLoRA."""
        if not self.changes_base:
            return dict(self.named_parameters())
        # delta = s(B A - B0 A0) = s [B | -B0] [A; A0]
        return {"A": torch.cat([self.A, self.A0]), "B": torch.cat([self.B, -self.B0], dim=1)}


class Lora(LowRank):
    """LoRA on a Linear or GPT-2 Conv1D: y = base(x) + s * drop(x) @ A.T @ B.T."""

    def __init__(self, base: nn.Module, cfg: LoraConfig, init: bool = True) -> None:
        d_in, d_out = sizes(base)
        super().__init__(base, cfg, init, (cfg.r, d_in), (d_out, cfg.r))

    def branch(self, x: Tensor, A: Tensor, B: Tensor, base: nn.Module) -> Tensor:
        return ((x.to(A.dtype) @ A.T) @ B.T) * self.scale

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, s) of delta_W = s * B @ A as forward uses them; DyLoRA cuts them, SoRA gates B."""
        return self.A, self.B, self.scale

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        A, B, s = self.factors()
        h = x if self.drop is None else self.drop(x)
        h = h.to(A.dtype) @ A.T  # (..., r); B @ A is never formed
        return _add_low_rank(base_out, h, B, s)

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B, s = self.factors()
        return s * (B @ A)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Base and adapter in one autograd node (see _LoraLinear); None where it does not apply."""
        W = kind_of(base).matmul_weight(base)  # (d_out, d_in), None for kinds without a plain matmul
        if W is None or (self.drop is not None and self.training) or x.dtype != self.A.dtype or W.dtype != x.dtype:
            return None
        return _LoraLinear.apply(x, W, base.bias, *self.factors())

    # -- mixed batches: rows routed to different adapters of one rank in one bmm --------------
    @property
    def route_key(self) -> tuple | None:
        return None if self.drop is not None and self.training else ("lora", self.r, self.A.dtype)

    @staticmethod
    def stack(adapters: list[Lora]) -> tuple[Tensor, Tensor]:
        """(k, d_in, r) and (k, r, d_out) stacks with each adapter's scale folded into B."""
        factors = [a.factors() for a in adapters]
        A = torch.stack([A.T for A, _, _ in factors])
        B = torch.stack([(B * s).T for _, B, s in factors])
        return A, B

    @staticmethod
    def forward_rows(stacks: tuple[Tensor, Tensor], x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        """Row i of the batch gets adapter slot[i] (None: slot i is row i)."""
        A, B = stacks
        if slot is not None:
            A, B = A.index_select(0, slot), B.index_select(0, slot)
        rows = x.shape[0]
        h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(A.dtype), A)  # (rows, tokens, r)
        delta = torch.bmm(h, B)  # (rows, tokens, d_out)
        return base_out + delta.view(base_out.shape).to(base_out.dtype)


class _LoraLinear(torch.autograd.Function):
    """y = x W.T + b + s (x A.T) B.T with a hand-written backward.

    Same math as autograd over the unfused ops, minus two full-size passes per layer: the low-rank
    term is accumulated into the big GEMM's output (beta=1) in forward, and the two input-gradient
    terms are accumulated the same way in backward. B @ A is never formed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        h = x2 @ A.T  # (N, r)
        y = torch.mm(h, B.T) if bias is None else torch.addmm(bias, h, B.T, alpha=scale)
        if bias is None:
            y.mul_(scale)
        y.addmm_(x2, W.T)  # (N, d_out) += x W.T, accumulated inside the GEMM
        ctx.save_for_backward(x2, W, A, B, h)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, W, A, B, h = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        gB = g @ B  # (N, r)
        grad_x = grad_W = grad_b = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(gB, A).mul_(s).addmm_(g, W).view(*grad.shape[:-1], W.shape[1])
        if ctx.needs_input_grad[1]:
            grad_W = g.T @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_A = (gB.T @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = (g.T @ h).mul_(s)
        return grad_x, grad_W, grad_b, grad_A, grad_B, None


def _add_low_rank(base_out: Tensor, h: Tensor, B: Tensor, scale: float) -> Tensor:
    """base_out + scale * h @ B.T as one fused addmm when dtypes agree."""
    if base_out.dtype != B.dtype:
        return base_out + ((h @ B.T) * scale).to(base_out.dtype)
    flat = base_out.reshape(-1, base_out.shape[-1])
    return torch.addmm(flat, h.reshape(-1, h.shape[-1]), B.T, alpha=scale).view(base_out.shape)


def _pissa(W: Tensor, r: int, scale: float, scheme: str) -> tuple[Tensor, Tensor]:
    """A = sqrt(S_r/s) Vh_r, B = U_r sqrt(S_r/s): s*B@A is W's top-r principal part."""
    if scheme == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(scheme.rsplit("_", 1)[1]))
        Vh = V.T
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def _olora(W: Tensor, r: int, scale: float, scheme: str) -> tuple[Tensor, Tensor]:
    """B = Q[:, :r], A = R[:r] from W = QR."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


class LoraEmbedding(LowRank):
    """LoRA on an Embedding: y = base(ids) + s * A.T[ids] @ B.T; A = 0, B ~ N(0, 1) at init (as HF PEFT).

    With LoRA-FA (A frozen) the roles swap: A ~ N(0, 1) stays fixed and B (zero) learns.
    """

    peft_keys = {"A": "lora_embedding_A", "B": "lora_embedding_B"}

    def __init__(self, base: nn.Embedding, cfg: LoraConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init, (cfg.r, base.num_embeddings), (base.embedding_dim, cfg.r))
        if init and not self.changes_base and cfg.init != "gaussian":
            with torch.no_grad():
                trainable, fixed = (self.B, self.A) if cfg.freeze_A else (self.A, self.B)
                trainable.zero_()
                fixed.normal_()

    def branch(self, x: Tensor, A: Tensor, B: Tensor, base: nn.Module) -> Tensor:
        h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (h @ B.T) * self.scale


class LoraConv(LowRank):
    """LoRA on Conv1d/Conv2d: A is a conv with the base's kernel to r channels, B a 1x1 conv."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, cfg: LoraConfig, init: bool = True) -> None:
        if base.groups != 1:
            raise NotImplementedError(f"LoRA on grouped convolutions (groups={base.groups}) is not implemented")
        ones = (1,) * (base.weight.dim() - 2)
        a_shape, b_shape = (cfg.r, base.in_channels, *base.kernel_size), (base.out_channels, cfg.r, *ones)
        super().__init__(base, cfg, init, a_shape, b_shape)
        self._conv = F.conv2d if base.weight.dim() == 4 else F.conv1d

    def branch(self, x: Tensor, A: Tensor, B: Tensor, base: nn.Module) -> Tensor:
        h = base._conv_forward(x.to(A.dtype), A, None)  # the base's stride, padding and padding_mode
        return self._conv(h, B) * self.scale


class Dora(Lora):
    """DoRA on a Linear / Conv1D: y = g * (W0 x + s B A x) + b,  g = m / sg(||W0 + s B A||_row)."""

    peft_keys = {**Lora.peft_keys, "m": "lora_magnitude_vector"}

    def __init__(self, base: nn.Module, cfg: DoraConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        self._w_sqnorm: tuple[tuple, Tensor] | None = None  # cached ||W||^2 per row, keyed by W's version
        self.m = nn.Parameter(self._row_norm(base))

    @torch.no_grad()
    def _row_norm(self, base: nn.Module) -> Tensor:
        """||W + s B A|| per output row without forming the (d_out, d_in) matrix."""
        W = kind_of(base).weight(base)
        stable = isinstance(W, nn.Parameter) or isinstance(W._base, nn.Parameter)  # not rebuilt per call (dequantized)
        key = (W.data_ptr(), W._version) if stable else None  # a rebuilt W may reuse a freed W's address
        if key is None or self._w_sqnorm is None or self._w_sqnorm[0] != key:
            self._w_sqnorm = (key, W.float().pow(2).sum(1).to(self.A.dtype))
        A, B, s = self.A, self.B, self.scale
        cross = (B * (W.to(A.dtype) @ A.T)).sum(1)  # rowsum(W * BA)
        square = ((B @ (A @ A.T)) * B).sum(1)  # rowsum((BA)^2)
        return (self._w_sqnorm[1] + 2 * s * cross + s * s * square).clamp_min(0).sqrt()

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        g = self.m / self._row_norm(base)  # (d_out,); gradient reaches m only
        h = x if self.drop is None else self.drop(x)
        y = _add_low_rank(base_out, h.to(self.A.dtype) @ self.A.T, self.B, self.scale)  # W0x + b + sBAx
        if base.bias is None:
            return y * g.to(y.dtype)
        return torch.addcmul((1 - g) * base.bias, g, y).to(y.dtype)  # g*(y - b) + b

    @property
    def route_key(self) -> None:
        return None  # mixed batches go row group by row group

    def fused_forward(self, x: Tensor, base: nn.Module) -> None:
        return None  # DoRA's gain needs the base output on its own

    @torch.no_grad()
    def prepare_merge(self, base: nn.Module) -> None:
        """The gain forward uses: from W0, before any adapter of this layer merges."""
        self._merge_gain = self.m / self._row_norm(base)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind = kind_of(base)
        W = kind.weight(base)
        g = self._merge_gain.to(W.dtype)[:, None]
        kind.write_weight(base, (W + self.delta_weight(base).to(W.dtype)) * g)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        kind = kind_of(base)
        W = kind.weight(base)
        kind.write_weight(base, W / self._merge_gain.to(W.dtype)[:, None] - self.delta_weight(base).to(W.dtype))
        del self._merge_gain



# -- the methods ------------------------------------------------------------------------------------
@register
class LoraMethod(Method):
    name, config, shape = "lora", LoraConfig, "layer"
    category, params, paper = "reparameterized", "r*(d_in+d_out)", "arXiv:2106.09685"
    mergeable, peft_type = True, "LORA"

    def build_layer(self, base: nn.Module, cfg: LoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        kind = kind_of(base).name
        if kind == "embedding":
            return LoraEmbedding(base, cfg, init)
        if kind == "conv":
            return LoraConv(base, cfg, init)
        return Lora(base, cfg, init)

    def select(self, model: nn.Module, cfg: LoraConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """The `bias` option: biases of the wrapped modules ("lora_only") or of the whole model ("all")."""
        return bias_selections(model, cfg.bias, targets)

    def saved_config(self, cfg: LoraConfig, adapter: AdapterView) -> LoraConfig:
        return cfg.as_rank_doubled() if cfg.init.startswith("pissa") or cfg.init == "olora" else cfg

    def to_peft(self, cfg: LoraConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **ctx.common("LORA"),
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "fan_in_fan_out": "conv1d_gpt2" in ctx.target_kinds,
            "bias": cfg.bias,
            "use_rslora": cfg.rslora,
            "use_dora": cfg.method == "dora",
            "modules_to_save": ctx.modules_to_save,
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": cfg.rank_pattern or {},
            "alpha_pattern": cfg.alpha_pattern or {},
            "lora_bias": False,
            "use_qalora": False,
        }

    def from_peft(self, data: dict[str, Any]) -> LoraConfig:
        """Our config for an HF PEFT LoRA adapter_config.json (LoRA, rsLoRA, DoRA)."""
        for flag in ("lora_bias", "use_qalora"):
            if data.get(flag):
                raise NotImplementedError(f"PEFT adapter with {flag}=true is not supported")
        if data.get("target_parameters"):
            raise NotImplementedError("PEFT adapters with target_parameters are not supported")
        return config_from_dict({
            "method": "dora" if data.get("use_dora") else "lora",
            "r": int(data.get("r", 8)),
            "alpha": float(data.get("lora_alpha", 8)),
            "dropout": float(data.get("lora_dropout", 0.0)),
            "rslora": bool(data.get("use_rslora", False)),
            "bias": data.get("bias", "none"),
            **peft_target_fields(data),
            "rank_pattern": data.get("rank_pattern") or None,
            "alpha_pattern": data.get("alpha_pattern") or None,
        })


@register
class DoraMethod(LoraMethod):
    name, config = "dora", DoraConfig
    params, paper = "r*(d_in+d_out)+d_out", "arXiv:2402.09353"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: DoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Dora(base, cfg, init)
