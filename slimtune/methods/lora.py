"""LoRA family: low-rank updates of frozen weights.

LoRA (Hu et al. 2021, arXiv:2106.09685):
    y = base(x) + s * drop(x) @ A.T @ B.T      A: (r, d_in)  B: (d_out, r)
    delta_W = s * B @ A        s = alpha / r
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): s = alpha / sqrt(r).
LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A frozen after init, only B trains.
Inits: "default" A kaiming-uniform, B = 0 (identity at start); "gaussian" A ~ N(0, 1/r);
"pissa" / "pissa_niter_K" (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r SVD of W0, the
base keeps the residual W0 - s*B@A; "olora" (Buyukakyuz 2024, arXiv:2406.01775): from QR of W0.
Merge: W += delta_W (transposed for GPT-2 Conv1D).

DoRA (Liu et al. 2024, arXiv:2402.09353), its own class below:
    W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row      m: (d_out,) init ||W0||_row
The row norm is treated as a constant in backward, as the paper does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.methods.base import register
from slimtune.targets import features, is_conv1d_gpt2, is_linear

_INITS = re.compile(r"default|gaussian|olora|pissa(_niter_\d+)?")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA and its one-field variants (rsLoRA, LoRA-FA, init schemes).

    Args:
        r: rank of the update.
        alpha: numerator of the scale s = alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter branch input only.
        rslora: rank-stabilised scale alpha / sqrt(r).
        init: "default" | "gaussian" | "pissa" | "pissa_niter_K" (randomized SVD, K iterations) | "olora".
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
                    "'default', 'gaussian', 'pissa', 'pissa_niter_K' or 'olora'")
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


def _weight_rows(base: nn.Module) -> Tensor:
    """The base weight in (d_out, d_in) layout (a view; Conv1D stores it transposed)."""
    return base.weight.T if is_conv1d_gpt2(base) else base.weight


def _in_base_layout(base: nn.Module, delta: Tensor) -> Tensor:
    return delta.T if is_conv1d_gpt2(base) else delta


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    dtype = base.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


class Lora(nn.Module):
    """LoRA on a Linear or GPT-2 Conv1D: y = base(x) + s * drop(x) @ A.T @ B.T."""

    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}

    def __init__(self, base: nn.Module, cfg: LoraConfig, init: bool = True) -> None:
        super().__init__()
        d_in, d_out = features(base)
        kw = {"dtype": _adapter_dtype(base), "device": base.weight.device}
        self.r, self.scale = cfg.r, cfg.scale
        self.A = nn.Parameter(torch.empty(cfg.r, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r, **kw))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.frozen = {"A"} if cfg.freeze_A else set()
        self.init_name = cfg.init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init:
            self._init_from_base(base, cfg.init)

    @torch.no_grad()
    def _init_from_base(self, base: nn.Module, scheme: str) -> None:
        if scheme == "gaussian":
            nn.init.normal_(self.A, std=1 / self.r)
        elif scheme.startswith("pissa") or scheme == "olora":
            W = _weight_rows(base)
            A, B = (_pissa if scheme.startswith("pissa") else _olora)(W.float(), self.r, self.scale, scheme)
            self.A.copy_(A)
            self.B.copy_(B)
            W.sub_((self.scale * B @ A).to(W.dtype))  # the base keeps the residual
            self.register_buffer("A0", self.A.detach().clone(), persistent=False)
            self.register_buffer("B0", self.B.detach().clone(), persistent=False)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = x if self.drop is None else self.drop(x)
        h = h.to(self.A.dtype) @ self.A.T  # (..., r); B @ A is never formed
        return _add_low_rank(base_out, h, self.B, self.scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return _in_base_layout(base, self.scale * (self.B @ self.A))

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Base and adapter in one autograd node (see _LoraLinear); None where it does not apply."""
        if type(base) is not nn.Linear and not is_conv1d_gpt2(base):
            return None
        if (self.drop is not None and self.training) or x.dtype != self.A.dtype or base.weight.dtype != x.dtype:
            return None
        W = base.weight if type(base) is nn.Linear else base.weight.T  # (d_out, d_in) view
        return _LoraLinear.apply(x, W, base.bias, self.A, self.B, self.scale)

    def release(self, base: nn.Module) -> None:
        """Give the base back what a PiSSA/OLoRA init took from it (detach without merge)."""
        if hasattr(self, "A0"):
            with torch.no_grad():
                W = _weight_rows(base)
                W.add_((self.scale * self.B0 @ self.A0).to(W.dtype))

    def export_tensors(self) -> dict[str, Tensor]:
        """Tensors of an equivalent LoRA against the untouched base (rank 2r for PiSSA/OLoRA)."""
        if not hasattr(self, "A0"):
            return dict(self.named_parameters())
        # delta = s(B A - B0 A0) = s [B | -B0] [A; A0]
        return {"A": torch.cat([self.A, self.A0]), "B": torch.cat([self.B, -self.B0], dim=1)}

    # -- mixed batches: rows routed to different adapters of one rank in one bmm --------------
    @property
    def route_key(self) -> tuple | None:
        return None if self.drop is not None and self.training else ("lora", self.r, self.A.dtype)

    @staticmethod
    def stack(adapters: list[Lora]) -> tuple[Tensor, Tensor]:
        """(k, d_in, r) and (k, r, d_out) stacks with each adapter's scale folded into B."""
        A = torch.stack([a.A.T for a in adapters])
        B = torch.stack([(a.B * a.scale).T for a in adapters])
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


class LoraEmbedding(nn.Module):
    """LoRA on an Embedding: y = base(ids) + s * A.T[ids] @ B.T; A = 0, B ~ N(0, 1) at init."""

    peft_keys = {"A": "lora_embedding_A", "B": "lora_embedding_B"}

    def __init__(self, base: nn.Embedding, cfg: LoraConfig, init: bool = True) -> None:
        super().__init__()
        kw = {"dtype": _adapter_dtype(base), "device": base.weight.device}
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.zeros(cfg.r, base.num_embeddings, **kw))
        self.B = nn.Parameter(torch.randn(base.embedding_dim, cfg.r, **kw))
        self.frozen = {"A"} if cfg.freeze_A else set()

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = F.embedding(x, self.A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return _add_low_rank(base_out, h, self.B, self.scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.scale * (self.B @ self.A).T  # (num_embeddings, dim)


class LoraConv(nn.Module):
    """LoRA on Conv1d/Conv2d: A is a conv with the base's kernel to r channels, B a 1x1 conv."""

    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}

    def __init__(self, base: nn.Conv1d | nn.Conv2d, cfg: LoraConfig, init: bool = True) -> None:
        super().__init__()
        if base.groups != 1:
            raise NotImplementedError(f"LoRA on grouped convolutions (groups={base.groups}) is not implemented")
        kw = {"dtype": _adapter_dtype(base), "device": base.weight.device}
        ones = (1,) * (base.weight.dim() - 2)
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.empty(cfg.r, base.in_channels, *base.kernel_size, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_channels, cfg.r, *ones, **kw))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.frozen = {"A"} if cfg.freeze_A else set()
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self._conv = F.conv2d if base.weight.dim() == 4 else F.conv1d

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = x if self.drop is None else self.drop(x)
        h = self._conv(h.to(self.A.dtype), self.A, None, base.stride, base.padding, base.dilation)
        return base_out + (self._conv(h, self.B) * self.scale).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        # composing conv(A) then 1x1 conv(B) is one conv with weight B[:, :, 0..] @ A over channels
        B = self.B.flatten(1)  # (out, r)
        return self.scale * torch.einsum("or,r...->o...", B, self.A)


class Dora(Lora):
    """DoRA on a Linear / Conv1D: y = g * (W0 x + s B A x) + b,  g = m / sg(||W0 + s B A||_row)."""

    peft_keys = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"}

    def __init__(self, base: nn.Module, cfg: DoraConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        self._w_sqnorm: tuple[tuple, Tensor] | None = None  # cached ||W||^2 per row, keyed by W's version
        self.m = nn.Parameter(self._row_norm(base))

    @torch.no_grad()
    def _row_norm(self, base: nn.Module) -> Tensor:
        """||W + s B A|| per output row without forming the (d_out, d_in) matrix."""
        W = _weight_rows(base)
        key = (W.data_ptr(), W._version)
        if self._w_sqnorm is None or self._w_sqnorm[0] != key:
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

    route_key = None  # mixed batches go row group by row group
    fused_forward = None  # DoRA's gain needs the base output on its own

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        W = _weight_rows(base)
        self._merge_gain = (self.m / self._row_norm(base)).to(W.dtype)  # kept for unmerge
        W.add_(_weight_rows_delta(self)).mul_(self._merge_gain[:, None])

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        W = _weight_rows(base)
        W.div_(self._merge_gain[:, None]).sub_(_weight_rows_delta(self))
        del self._merge_gain

    @torch.no_grad()
    def delta_weight(self, base: nn.Module) -> Tensor:
        """W' - W for the current W (the engine merges DoRA with merge(), not by adding this)."""
        W = _weight_rows(base)
        g = (self.m / self._row_norm(base))[:, None]
        return _in_base_layout(base, g * (W + _weight_rows_delta(self)) - W)


def _weight_rows_delta(adapter: Lora) -> Tensor:
    return adapter.scale * (adapter.B @ adapter.A)


_PARAMS = "r*(d_in+d_out)"


@register("lora", LoraConfig, category="reparameterized", params=_PARAMS, paper="arXiv:2106.09685",
          mergeable=True, peft_type="LORA")
def build_lora(base: nn.Module, cfg: LoraConfig, init: bool = True) -> nn.Module:
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base, cfg, init)
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(base, cfg, init)
    return Lora(base, cfg, init)


@register("dora", DoraConfig, category="reparameterized", params=_PARAMS + "+d_out", paper="arXiv:2402.09353",
          mergeable=True, peft_type="LORA")
def build_dora(base: nn.Module, cfg: DoraConfig, init: bool = True) -> nn.Module:
    if not is_linear(base):
        raise NotImplementedError(f"DoRA on {type(base).__name__} is not implemented (Linear and Conv1D only)")
    return Dora(base, cfg, init)
