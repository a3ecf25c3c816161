"""LoftQ: quantization-aware LoRA initialisation. Li et al. 2023 (ICLR 2024), arXiv:2310.08659.

    min over Q, L (rank r) of ||W - Q - L||_F, by alternation from L_0 = 0:
        Q_t = q(W - L_{t-1})          quantize the part the low-rank term does not carry
        L_t = SVD_r(W - Q_t)          best rank-r fit of what quantization lost
    the base keeps Q_T (quantized), LoRA starts at s * B @ A = L_T:  B = U sqrt(S / s), A = sqrt(S / s) V^T

Plain QLoRA starts from Q = q(W), B = 0: its initial error is ||W - q(W)||. LoftQ's ||W - Q_T - L_T|| is
lower (T = 1 already: L_1 is the best rank-r fit of that very error).

LoftQ needs the float weight, which only exists before quantization, so it runs inside
`st.quantize(model, "nf4", loftq_rank=r, loftq_iter=T)`: each QuantLinear keeps Q_T and the factors
(P = U sqrt(S), R = sqrt(S) V^T, buffers that are not saved); `LoraConfig(r=r, init="loftq")` then
starts A and B from them. An adapter trained this way belongs to the LoftQ base: load it onto a model
quantized the same way (the alternation is deterministic).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from slimtune.quant import formats


class LoftqError(NamedTuple):
    """Relative Frobenius errors ||W - Q - L|| / ||W|| (LoftQ) and ||W - q(W)|| / ||W|| (QLoRA's init)."""

    loftq: float
    qlora: float


@torch.no_grad()
def loftq(W: Tensor, rank: int, fmt: str = "nf4", iters: int = 1, block_size: int = 64,
          double_quant: bool = True) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """(quantized state of Q_T, P (d_out, r), R (r, d_in)) with W ~ dequant(Q_T) + P @ R."""
    if not (isinstance(rank, int) and 1 <= rank <= min(W.shape)):
        raise ValueError(f"loftq_rank={rank!r}: expected an int in [1, min(d_out, d_in) = {min(W.shape)}]")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"loftq_iter={iters!r}: expected an int >= 1 (5 in the paper)")
    W = W.detach().float()  # (d_out, d_in)
    low = torch.zeros_like(W)
    for _ in range(iters):
        state = formats.quantize(W - low, fmt, block_size, double_quant)
        Q = formats.dequantize(state, tuple(W.shape), fmt, block_size)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:rank].sqrt()
        P, R = U[:, :rank] * root, root[:, None] * Vh[:rank]  # (d_out, r), (r, d_in)
        low = P @ R
    return state, P, R


@torch.no_grad()
def loftq_errors(W: Tensor, rank: int, fmt: str = "nf4", iters: int = 1, block_size: int = 64,
                 double_quant: bool = True) -> LoftqError:
    """LoftQ's reconstruction error against plain QLoRA's, both relative to ||W||."""
    state, P, R = loftq(W, rank, fmt, iters, block_size, double_quant)
    return _errors(W.detach().float(), state, P, R, fmt, block_size, double_quant)


def _errors(W: Tensor, state: dict[str, Tensor], P: Tensor, R: Tensor, fmt: str, block_size: int,
            double_quant: bool) -> LoftqError:
    shape = tuple(W.shape)
    Q = formats.dequantize(state, shape, fmt, block_size)
    plain = formats.dequantize(formats.quantize(W, fmt, block_size, double_quant), shape, fmt, block_size)
    norm = W.norm()
    return LoftqError(((W - Q - P @ R).norm() / norm).item(), ((W - plain).norm() / norm).item())


@torch.no_grad()
def loftq_linear(linear: nn.Module, rank: int, fmt: str = "nf4", iters: int = 1, block_size: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A QuantLinear holding LoftQ's Q_T and (as non-persistent buffers) the factors a LoRA starts from;
    its `loftq_error` attribute holds the LoftqError of this layer."""
    from slimtune.quant.linear import QuantLinear

    W = linear.weight.detach().float()
    q = QuantLinear.empty_like(linear, fmt, block_size, double_quant, compute_dtype)
    state, P, R = loftq(W, rank, fmt, iters, block_size, q.double_quant)
    q._set_state(state)
    q.register_buffer("loftq_P", P, persistent=False)
    q.register_buffer("loftq_R", R, persistent=False)
    q.loftq_error = _errors(W, state, P, R, fmt, block_size, q.double_quant)
    return q


def lora_factors(base: nn.Module, r: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A (r, d_in), B (d_out, r)) with scale * B @ A = P @ R, for `LoraConfig(init="loftq")`."""
    P, R = getattr(base, "loftq_P", None), getattr(base, "loftq_R", None)
    if P is None or R is None:
        raise ValueError("init='loftq' needs a base quantized with LoftQ: st.quantize(model, 'nf4', loftq_rank=r) "
                         f"before attaching; {type(base).__name__} holds no LoftQ factors")
    if P.shape[1] != r:
        raise ValueError(f"init='loftq': this layer was quantized for LoftQ rank {P.shape[1]}, the config asks r={r}; "
                         f"use r={P.shape[1]} or quantize again with loftq_rank={r}")
    root = scale ** -0.5
    return R * root, P * root
