"""OFT and BOFT: orthogonal fine-tuning, a learned rotation of the frozen layer's input features.

OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv:2306.07280).
The input features are cut into k blocks of b (k * b = d_in); block j is rotated by an orthogonal b x b
matrix R_j made by the Cayley transform of a skew-symmetric Q_j, stored as the b(b-1)/2 entries above
its diagonal (HF PEFT 0.21's `oft_R.weight`, shape (k, b(b-1)/2)):
    y = (x @ R) @ W0^T + b0       R = block_diag(R_1..R_k), x a row vector (PEFT's layout: R on the input)
    merged:  W' = W0 R^T          (d_out, d_in) layout; the bias is untouched
    exact Cayley (default here):  R_j = (I - Q_j)(I + Q_j)^-1
    Neumann (PEFT's default):     R_j ~ I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1), n = neumann_terms
The two are PEFT's and are not the same map of Q: the series approximates (I + Q)(I - Q)^-1, the
transpose of the exact form. COFT (constrained OFT): before use, each Q_j is projected to
||Q_j||_F <= eps / sqrt(rows of Q) (the stored vector is overwritten, as PEFT does). Init Q = 0: R = I.
Parameters per module: k * b(b-1)/2 = d_in (b-1)/2 (b(b-1)/2 with block_share).

BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
arXiv:2311.06243). m butterfly factors, each a block-diagonal orthogonal matrix (N blocks of b, exact
Cayley of the skew part of a full b x b matrix) conjugated by a fixed butterfly permutation P_i, and a
scale s per output feature:
    M = B_(m-1) ... B_1 B_0,   B_i = P_i block_diag(R_i1..R_iN) P_i^T,   R = (I - S)(I + S)^-1, S = (A - A^T)/2
    y = s * ((x @ M) @ W0^T) + b0              merged:  W' = diag(s) W0 M^T, bias untouched
Init A = 0 (M = I), s = 1. Parameters per module: m * N * b^2 + d_out (PEFT stores the full b x b matrices).

Both rotate the input side, so they run as input transforms (`transforms_input`) and merge after the
other adapters of a layer. Linear and GPT-2 Conv1D bases; HF PEFT 0.21 has OFT and BOFT for Linear (and
Conv2d, OFT also Embedding), so only Linear targets export to or load from PEFT.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import (
    LayerAdapter,
    Method,
    PeftContext,
    Selection,
    bias_selections,
    factory,
    peft_target_fields,
    register,
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bias(cfg: MethodConfig, only: str) -> None:
    check_field(cfg.bias in ("none", only, "all"), cfg, "bias", f"'none', '{only}' or 'all'")


@dataclass
class OftConfig(MethodConfig):
    """OFT: y = (x @ R) @ W0^T + b, R block-diagonal orthogonal (Cayley of skew Q); Q = 0 at init (arXiv:2306.07280).

    Args:
        block_size: size b of each rotation block; set exactly one of `block_size` and `r`, the other 0
            (PEFT's rule; r * b = d_in). A size that does not divide d_in is moved to the nearest divisor
            with a warning, as PEFT does.
        r: number of blocks k per module (0: derived from `block_size`).
        neumann: approximate the Cayley inverse by a truncated Neumann series (PEFT's default, faster,
            only approximately orthogonal); False: exact inverse (default here).
        neumann_terms: number of series terms when `neumann` (PEFT's `num_cayley_neumann_terms`).
        coft: constrained OFT: project each block's Q to ||Q||_F <= eps / sqrt(k) before use.
        eps: the COFT radius.
        block_share: one Q shared by all blocks of a module.
        dropout: multiplicative dropout: in training, a fraction of the blocks is set to the identity
            (PEFT 0.21 stores `module_dropout` but never applies it).
        bias: "none" | "oft_only" (biases of wrapped modules train) | "all" (every bias trains).
    """

    aliases = {**MethodConfig.aliases, "oft_block_size": "block_size", "use_cayley_neumann": "neumann",
               "num_cayley_neumann_terms": "neumann_terms", "module_dropout": "dropout"}

    block_size: int = 32
    r: int = 0
    neumann: bool = False
    neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    dropout: float = 0.0
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.block_size) and self.block_size >= 0, self, "block_size",
                    "an int >= 0 (0: derived from r), e.g. block_size=32")
        check_field(_is_int(self.r) and self.r >= 0, self, "r", "an int >= 0 (0: derived from block_size)")
        check_field((self.r == 0) != (self.block_size == 0), self, "r" if self.r else "block_size",
                    f"exactly one of r={self.r} and block_size={self.block_size} non-zero (r * block_size = d_in)")
        check_field(self.block_size != 1, self, "block_size", "an int >= 2 (a 1 x 1 rotation is the identity)")
        check_field(isinstance(self.neumann, bool), self, "neumann", "True or False")
        check_field(_is_int(self.neumann_terms) and self.neumann_terms >= 1, self, "neumann_terms", "an int >= 1")
        check_field(isinstance(self.coft, bool), self, "coft", "True or False")
        check_field(isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and self.eps > 0, self,
                    "eps", "a number > 0")
        check_field(isinstance(self.block_share, bool), self, "block_share", "True or False")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        _check_bias(self, "oft_only")


@dataclass
class BoftConfig(MethodConfig):
    """BOFT: y = s * ((x @ M) @ W0^T) + b, M a product of butterfly block-orthogonal factors; M = I, s = 1 at init.

    (arXiv:2311.06243.) Args:
        block_size: size b of each block; set exactly one of `block_size` and `block_num`, the other 0.
        block_num: number N of blocks per factor (N * b = d_in).
        n_butterfly_factor: number m of butterfly factors (1: plain block-diagonal OFT with a scale).
        dropout: multiplicative dropout: in training, a fraction of one random factor's blocks is set
            to the identity (PEFT's `boft_dropout`).
        bias: "none" | "boft_only" | "all".
    """

    aliases = {**MethodConfig.aliases, "boft_block_size": "block_size", "boft_block_num": "block_num",
               "boft_n_butterfly_factor": "n_butterfly_factor", "boft_dropout": "dropout"}

    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    dropout: float = 0.0
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.block_size) and self.block_size >= 0, self, "block_size",
                    "an int >= 0 (0: derived from block_num), e.g. block_size=4")
        check_field(_is_int(self.block_num) and self.block_num >= 0, self, "block_num",
                    "an int >= 0 (0: derived from block_size)")
        check_field((self.block_num == 0) != (self.block_size == 0), self,
                    "block_num" if self.block_num else "block_size",
                    f"exactly one of block_size={self.block_size} and block_num={self.block_num} non-zero "
                    "(block_size * block_num = d_in)")
        check_field(_is_int(self.n_butterfly_factor) and self.n_butterfly_factor >= 1, self, "n_butterfly_factor",
                    "an int >= 1")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        _check_bias(self, "boft_only")


# -- shared math ----------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: the Cayley solve and merges of half-precision adapters run in fp32."""
    return torch.promote_types(dtype, torch.float32)


def cayley(S: Tensor, neumann: bool = False, terms: int = 5) -> Tensor:
    """Orthogonal (k, b, b) blocks from skew-symmetric S, as HF PEFT 0.21 computes them.

    Exact: R = (I - S)(I + S)^-1. Neumann: I + 2S + 2S^2 + ... + 2S^(n-2) + S^(n-1) for n = `terms`
    (PEFT's loop: n = 3 and n = 4 both stop at S^3), approximating (I + S)(I - S)^-1.
    """
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    if not neumann:
        return torch.linalg.solve(eye + S, eye - S, left=False)
    R = eye.clone()
    if terms > 1:
        R = R + 2 * S
        if terms > 2:
            power = S @ S
            R = R + 2 * power
            for _ in range(3, terms - 1):
                power = power @ S
                R = R + 2 * power
            R = R + power @ S
    return R


def _identity_dropout(blocks: Tensor, p: float) -> Tensor:
    """Set int(p * k) random blocks of (k, b, b) to the identity (multiplicative dropout)."""
    k, b = blocks.shape[0], blocks.shape[-1]
    n = int(p * k)
    if n == 0:
        return blocks
    mask = torch.zeros(k, 1, 1, dtype=blocks.dtype, device=blocks.device)
    mask[torch.randperm(k, device=blocks.device)[:n]] = 1
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return (1 - mask) * blocks + mask * eye


def _rotate_blocks(x: Tensor, blocks: Tensor) -> Tensor:
    """x @ block_diag(blocks) for x (..., k * b) and blocks (k, b, b)."""
    k, b = blocks.shape[0], blocks.shape[-1]
    return torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], k, b), blocks).reshape(x.shape)


def _adjust_divisor(n: int, wanted: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of n nearest to `wanted` (the lower one on ties)."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def oft_blocks(d_in: int, r: int, block_size: int) -> tuple[int, int]:
    """(k, b) for a module with d_in input features, moving a non-divisor to the nearest one as PEFT does."""
    if r == 0:
        b = block_size
        if d_in % b:
            b = _adjust_divisor(d_in, b)
            warnings.warn(f"OFT block_size={block_size} does not divide d_in={d_in}; using block_size={b} "
                          "(as HF PEFT does)", stacklevel=3)
        return d_in // b, b
    k = r
    if d_in % k or k > d_in:
        k = _adjust_divisor(d_in, k)
        warnings.warn(f"OFT r={r} does not divide d_in={d_in}; using r={k} (as HF PEFT does)", stacklevel=3)
    return k, d_in // k


# -- OFT ---------------------------------------------------------------------------------------------------
class Oft(LayerAdapter):
    """Block-diagonal Cayley rotation of a Linear / Conv1D input. Q: (k, b(b-1)/2), PEFT's `oft_R.weight`."""

    peft_keys = {"Q": "oft_R.weight"}
    transforms_input = True

    def __init__(self, base: nn.Module, cfg: OftConfig) -> None:
        super().__init__()
        d_in, _ = sizes(base)
        self.k, self.b = oft_blocks(d_in, cfg.r, cfg.block_size)
        if self.b < 2:
            raise ValueError(f"OFT needs blocks of at least 2 features; d_in={d_in} gives block_size={self.b}")
        self.neumann, self.terms = cfg.neumann, cfg.neumann_terms
        self.coft, self.eps, self.share, self.p = cfg.coft, cfg.eps, cfg.block_share, cfg.dropout
        self.Q = nn.Parameter(torch.zeros(1 if self.share else self.k, self.b * (self.b - 1) // 2, **factory(base)))
        rows, cols = torch.triu_indices(self.b, self.b, 1, device=self.Q.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self._merged: Tensor | None = None

    def skew(self, q: Tensor) -> Tensor:
        """(n, b, b) skew-symmetric matrices from their upper-triangle vectors q (n, b(b-1)/2)."""
        S = q.new_zeros(q.shape[0], self.b, self.b)
        S[:, self.rows, self.cols] = q
        return S - S.transpose(-2, -1)

    @torch.no_grad()
    def project(self) -> None:
        """COFT: each ||skew(Q_j)||_F <= eps / sqrt(rows of Q), written into Q (PEFT overwrites it too).

        Blocks within 1e-6 (relative) of the radius count as inside, so a projected Q stays as it is.
        """
        S = self.skew(self.Q)
        radius = self.eps / math.sqrt(S.shape[0])
        norm = torch.linalg.matrix_norm(S, keepdim=True)
        if bool((norm > radius * (1 + 1e-6)).any()):
            S = torch.where(norm <= radius, S, radius * (S / norm))
            self.Q.copy_(S[:, self.rows, self.cols])

    def blocks(self) -> Tensor:
        """The k rotation blocks (k, b, b), in the compute dtype (fp32 at least)."""
        if self.coft:
            self.project()
        q = self.Q.to(_compute_dtype(self.Q.dtype))
        R = cayley(self.skew(q), self.neumann, self.terms)
        if self.share:
            R = R.expand(self.k, -1, -1)
        if self.training and self.p > 0 and not self.share:
            R = _identity_dropout(R, self.p)
        return R

    def rotation(self) -> Tensor:
        """The dense (d_in, d_in) R, block_diag(R_1..R_k), for inspection (x @ R is what the base sees)."""
        return torch.block_diag(*self.blocks().unbind(0))

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        R = self.blocks()
        return _rotate_blocks(x.to(R.dtype), R).to(x.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """W0 R^T - W0 (for inspection; merging multiplies)."""
        W = kind_of(base).weight(base)
        R = self.blocks().detach()
        return (self._rotate(W.to(R.dtype), R) - W).to(W.dtype)

    def _rotate(self, W: Tensor, R: Tensor) -> Tensor:
        """W R^T for W (d_out, d_in) and R = block_diag(R): row o, block j -> W[o, j] @ R_j^T."""
        return torch.einsum("ojk,jck->ojc", W.reshape(W.shape[0], self.k, self.b), R).reshape(W.shape)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind = kind_of(base)
        W = kind.weight(base)
        R = self.blocks().detach().clone()
        self._merged = R
        kind.write_weight(base, self._rotate(W.to(R.dtype), R))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """W = W' (R^T)^-1 with the blocks used at merge (an exact solve, also for the Neumann series)."""
        if self._merged is None:
            return
        R, self._merged = self._merged, None
        kind = kind_of(base)
        W = kind.weight(base)
        Wb = W.to(R.dtype).reshape(W.shape[0], self.k, self.b).transpose(0, 1)  # (k, d_out, b)
        X = torch.linalg.solve(R.transpose(-2, -1), Wb, left=False)  # X R_j^T = W'_j
        kind.write_weight(base, X.transpose(0, 1).reshape(W.shape))


# -- BOFT --------------------------------------------------------------------------------------------------
def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> Tensor:
    """PEFT's `block_butterfly_perm`: within each of `blocks` chunks of n, the sub-blocks of size `half`
    are reordered evens first, then odds (the identity when `factors` = 0)."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError(f"invalid butterfly: {blocks} blocks of 2 x {half} exceed {n} features")
    size = n // blocks
    pieces = size // half
    order = torch.cat([torch.arange(p * half, (p + 1) * half) for p in [*range(0, pieces, 2), *range(1, pieces, 2)]])
    return torch.cat([start + order for start in range(0, n, size)])


def boft_blocks(d_in: int, block_size: int, block_num: int, factors: int) -> tuple[int, int]:
    """(N, b) for a module, with PEFT's checks; `factors` = m - 1."""
    if block_size == 0:
        if d_in % block_num:
            raise ValueError(f"d_in={d_in} must be divisible by block_num={block_num}")
        if factors and (factors > int(math.log2(block_num)) or block_num % 2 ** factors):
            raise ValueError(f"block_num={block_num} must be a multiple of 2^(n_butterfly_factor - 1) = {2 ** factors}")
        block_size = d_in // block_num
    else:
        if d_in % block_size:
            raise ValueError(f"d_in={d_in} must be divisible by block_size={block_size}")
        if factors and d_in % (block_size * 2 ** factors):
            raise ValueError(f"d_in={d_in} must be a multiple of block_size * 2^(n_butterfly_factor - 1) = "
                             f"{block_size * 2 ** factors}")
        block_num = d_in // block_size
    if factors and (block_num % 2 or block_size % 2):
        raise ValueError(f"with n_butterfly_factor > 1, block_num={block_num} and block_size={block_size} must be even")
    return block_num, block_size


class Boft(LayerAdapter):
    """Butterfly orthogonal rotation of a Linear / Conv1D input and a scale per output feature.

    A: (m, N, b, b), PEFT's `boft_R` (only the skew part counts); s: (d_out, 1), PEFT's `boft_s`.
    """

    peft_keys = {"A": "boft_R", "s": "boft_s"}
    transforms_input = True

    def __init__(self, base: nn.Module, cfg: BoftConfig) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        m = cfg.n_butterfly_factor
        self.N, self.b = boft_blocks(d_in, cfg.block_size, cfg.block_num, m - 1)
        self.p = cfg.dropout
        kw = factory(base)
        self.A = nn.Parameter(torch.zeros(m, self.N, self.b, self.b, **kw))
        self.s = nn.Parameter(torch.ones(d_out, 1, **kw))
        perms = torch.stack([butterfly_perm(d_in, self.N // 2 ** i, self.b // 2, m - 1) for i in range(m)])
        self.register_buffer("perm", perms.to(kw["device"]), persistent=False)  # (m, d_in)
        self.register_buffer("inv_perm", perms.argsort(dim=1).to(kw["device"]), persistent=False)
        self._merged: Tensor | None = None  # M while merged
        self._scaled: tuple[Tensor, Tensor, Tensor] | None = None  # (s, rows where s = 0, their old values)

    def factors(self) -> Tensor:
        """The (m, N, b, b) orthogonal blocks (fp32 at least): exact Cayley of the skew part of A."""
        A = self.A.to(_compute_dtype(self.A.dtype))
        m = A.shape[0]
        S = 0.5 * (A - A.transpose(-2, -1))
        R = cayley(S.reshape(-1, self.b, self.b)).reshape(A.shape)
        if self.training and self.p > 0:
            i = int(torch.randint(0, m, (1,)))
            R = torch.cat([R[:i], _identity_dropout(R[i], self.p)[None], R[i + 1:]])
        return R

    def _rotate(self, x: Tensor, R: Tensor) -> Tensor:
        """x @ M = x @ B_(m-1) @ ... @ B_0, with x @ B_i = (x[..., inv_i] @ block_diag(R_i))[..., perm_i]."""
        for i in reversed(range(R.shape[0])):
            x = _rotate_blocks(x[..., self.inv_perm[i]], R[i])[..., self.perm[i]]
        return x

    def rotation(self) -> Tensor:
        """The dense (d_in, d_in) M (x @ M is what the base sees)."""
        R = self.factors()
        return self._rotate(torch.eye(R.shape[1] * self.b, dtype=R.dtype, device=R.device), R)

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        R = self.factors()
        return self._rotate(x.to(R.dtype), R).to(x.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        """s * (out - b) + b, computed as s * out + (1 - s) * b (exactly the base output at s = 1)."""
        s = self.s.view(-1)
        bias = getattr(base, "bias", None)
        if bias is None:
            return (base_out * s).to(base_out.dtype)
        return torch.addcmul((1 - s) * bias, s, base_out).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """diag(s) W0 M^T - W0 (for inspection; merging multiplies)."""
        W = kind_of(base).weight(base)
        M, s = self.rotation().detach(), self.s.detach()
        return (s.to(M.dtype) * (W.to(M.dtype) @ M.T) - W).to(W.dtype)

    @torch.no_grad()
    def merge_output(self, base: nn.Module) -> None:
        """W = diag(s) W, at BOFT's place among the layer's adapters (others after it add to s W)."""
        kind = kind_of(base)
        W = kind.weight(base)
        s = self.s.detach().clone().to(W.dtype)
        dead = (s.view(-1) == 0).nonzero().view(-1)  # rows scaled by 0 cannot be divided back: keep them
        self._scaled = (s, dead, W.index_select(0, dead).clone())
        kind.write_weight(base, s * W)

    @torch.no_grad()
    def unmerge_output(self, base: nn.Module) -> None:
        if self._scaled is None:
            return
        (s, dead, kept), self._scaled = self._scaled, None
        kind = kind_of(base)
        W = kind.weight(base)
        W = W / torch.where(s == 0, torch.ones_like(s), s)
        kind.write_weight(base, W.index_copy(0, dead, kept.to(W.dtype)))

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """W = W M^T, after every other adapter of the layer (the rotation acts on what they all see)."""
        kind = kind_of(base)
        M = self.rotation().clone()
        self._merged = M
        kind.write_weight(base, kind.weight(base).to(M.dtype) @ M.T)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """W = W' M (M is orthogonal: a product of exact Cayley blocks and permutations)."""
        if self._merged is None:
            return
        M, self._merged = self._merged, None
        kind = kind_of(base)
        W = kind.weight(base)
        kind.write_weight(base, (W.to(M.dtype) @ M).to(W.dtype))


# -- the methods --------------------------------------------------------------------------------------------
def _peft_targets(ctx: PeftContext, method: str) -> None:
    """PEFT 0.21's OFT and BOFT wrap nn.Linear (and Conv2d / Embedding), not GPT-2's Conv1D."""
    if ctx.target_kinds - {"linear"}:
        raise NotImplementedError(f"format='peft' for {method} on {', '.join(sorted(ctx.target_kinds - {'linear'}))} "
                                  f"modules: HF PEFT 0.21's {method} supports Linear only among slimtune's targets")


@register
class OftMethod(Method):
    name, config, shape = "oft", OftConfig, "layer"
    category, params, paper = "reparameterized", "k*b*(b-1)/2 = d_in*(b-1)/2 (b*(b-1)/2 with block_share)", \
        "arXiv:2306.07280"
    mergeable, peft_type = True, "OFT"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: OftConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Oft(base, cfg)

    def select(self, model: nn.Module, cfg: OftConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """The `bias` option: biases of the wrapped modules ("oft_only") or of the whole model ("all")."""
        return bias_selections(model, cfg.bias, targets)

    def to_peft(self, cfg: OftConfig, ctx: PeftContext) -> dict[str, Any]:
        _peft_targets(ctx, "OFT")
        return {
            **ctx.common("OFT"),
            "auto_mapping": None,
            "r": cfg.r,
            "oft_block_size": cfg.block_size,
            "module_dropout": cfg.dropout,
            "target_modules": ctx.target_modules,
            "fan_in_fan_out": False,
            "bias": cfg.bias,
            "exclude_modules": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": ctx.modules_to_save,
            "coft": cfg.coft,
            "eps": cfg.eps,
            "block_share": cfg.block_share,
            "use_cayley_neumann": cfg.neumann,
            "num_cayley_neumann_terms": cfg.neumann_terms,
        }

    def from_peft(self, data: dict[str, Any]) -> OftConfig:
        """Our config for an HF PEFT OFT adapter_config.json (PEFT >= 0.14's layout, `oft_block_size` present)."""
        if "oft_block_size" not in data:
            raise NotImplementedError("PEFT OFT adapters from before PEFT 0.14 (no oft_block_size) use another "
                                      "parameterization and cannot be loaded")
        return config_from_dict({
            "method": "oft",
            **peft_target_fields(data),
            "r": int(data.get("r", 0)),
            "block_size": int(data["oft_block_size"]),
            "dropout": float(data.get("module_dropout", 0.0)),
            "bias": data.get("bias", "none"),
            "coft": bool(data.get("coft", False)),
            "eps": float(data.get("eps", 6e-5)),
            "block_share": bool(data.get("block_share", False)),
            "neumann": bool(data.get("use_cayley_neumann", True)),
            "neumann_terms": int(data.get("num_cayley_neumann_terms", 5)),
        })


@register
class BoftMethod(Method):
    name, config, shape = "boft", BoftConfig, "layer"
    category, params, paper = "reparameterized", "m*N*b^2 + d_out (N*b = d_in)", "arXiv:2311.06243"
    mergeable, peft_type = True, "BOFT"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: BoftConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Boft(base, cfg)

    def select(self, model: nn.Module, cfg: BoftConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        return bias_selections(model, cfg.bias, targets)

    def to_peft(self, cfg: BoftConfig, ctx: PeftContext) -> dict[str, Any]:
        _peft_targets(ctx, "BOFT")
        return {
            **ctx.common("BOFT"),
            "auto_mapping": None,
            "boft_block_size": cfg.block_size,
            "boft_block_num": cfg.block_num,
            "boft_n_butterfly_factor": cfg.n_butterfly_factor,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "boft_dropout": cfg.dropout,
            "fan_in_fan_out": False,
            "bias": cfg.bias,
            "modules_to_save": ctx.modules_to_save,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any]) -> BoftConfig:
        """Our config for an HF PEFT BOFT adapter_config.json.

        PEFT builds n_butterfly_factor > 1 only where its CUDA extension compiles; elsewhere it silently uses 1,
        so such a file made on a CPU holds one factor although its config says more (loading then fails on the
        tensor shape, naming it).
        """
        return config_from_dict({
            "method": "boft",
            **peft_target_fields(data),
            "block_size": int(data.get("boft_block_size", 4)),
            "block_num": int(data.get("boft_block_num", 0)),
            "n_butterfly_factor": int(data.get("boft_n_butterfly_factor", 1)),
            "dropout": float(data.get("boft_dropout", 0.0)),
            "bias": data.get("bias", "none"),
        })


__all__ = ["Boft", "BoftConfig", "BoftMethod", "Oft", "OftConfig", "OftMethod", "butterfly_perm", "cayley"]
