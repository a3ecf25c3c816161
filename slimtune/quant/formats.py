"""Quantized number formats in pure torch, byte for byte the layout of bitsandbytes 0.50.

    nf4 / fp4: the weight, flattened row-major, in blocks of `block_size` (64); each block keeps its
        absmax a and 4-bit codes c = nearest(x / a) in a 16-entry code book; two codes per byte,
        the even element in the high nibble. x_hat = book[c] * a.
    double quantisation (QLoRA): the fp32 absmax values, minus their mean, are themselves quantised to
        8 bits in blocks of 256 with bitsandbytes' signed dynamic map:
        4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (4.5 without it).
    int8: one absmax per output row, c = round(127 * x / a) (LLM.int8's vector-wise scheme, without its
        fp16 outlier columns): 8 + 32/d_in bits per parameter.

Dettmers et al. 2023 (QLoRA, arXiv:2305.14314); Dettmers et al. 2022 (LLM.int8(), arXiv:2208.07339).
bitsandbytes' own CPU quantizer is this same torch code (backends/default/ops.py); tests check the
codes and dequantized values are identical to `bitsandbytes.functional` where it is installed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FORMATS = ("nf4", "fp4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as bitsandbytes accepts
NESTED_BLOCK = 256  # block size of the double-quantised absmax

# NF4: quantiles of N(0, 1), normalised to [-1, 1], 0 exact (QLoRA appendix; bitsandbytes get_4bit_type).
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
# FP4 (e2m1, bias 2) in bit-pattern order, divided by its max (12), as bitsandbytes stores it.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
_BOOKS: dict[tuple[str, torch.device], Tensor] = {}


def code_book(fmt: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 (nf4, fp4) or 256 ("dynamic": the double-quantisation map) float32 values a code stands for."""
    key = (fmt, torch.device(device))
    if key not in _BOOKS:
        if fmt == "nf4":
            book = torch.tensor(NF4)
        elif fmt == "fp4":
            book = torch.tensor(_FP4_RAW) / 12.0
        elif fmt == "dynamic":
            book = _dynamic_map()
        else:
            raise ValueError(f"no code book named {fmt!r}; expected 'nf4', 'fp4' or 'dynamic'")
        _BOOKS[key] = book.to(device)
    return _BOOKS[key]


def _dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): a dynamic exponent and a
    linear fraction; 256 sorted values in [-1, 1] (Dettmers 2015, arXiv:1511.04561)."""
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        bounds = torch.linspace(0.1, 1, int(2 ** (i + non_sign - max_exponent_bits) + 1), dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        step = 10 ** (-(max_exponent_bits - 1) + i)
        data += (step * means).tolist() + (-step * means).tolist()  # float32 products, as bitsandbytes
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blocks(flat: Tensor, size: int) -> tuple[Tensor, Tensor | None]:
    """(full blocks (k, size), the remainder or None) of a 1-d float32 tensor."""
    full = flat.numel() - flat.numel() % size
    rest = flat[full:] if full < flat.numel() else None
    return flat[:full].reshape(-1, size), rest


def _scaled(flat: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per block: x / absmax clamped to [-1, 1] (flat), and the absmax values (n_blocks,)."""
    body, rest = _blocks(flat, size)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if rest is not None:  # the last, partial block divides (as bitsandbytes does, to the bit)
        top = rest.abs().max().clamp(min=1e-38)
        absmax, scaled = torch.cat([absmax, top[None]]), torch.cat([scaled, torch.clamp(rest / top, -1, 1)])
    return scaled, absmax


def _nearest(scaled: Tensor, book: Tensor) -> Tensor:
    """Index into `book` of the nearest value (ties go to the lower one), as int64."""
    order = torch.argsort(book)
    mids = (book[order[:-1]] + book[order[1:]]) / 2
    return order[torch.bucketize(scaled, mids, out_int32=True)]


def _unblock(values: Tensor, absmax: Tensor, size: int) -> Tensor:
    """values (n,) times the absmax of their block, float32."""
    body, rest = _blocks(values, size)
    out = (body * absmax[: body.shape[0], None]).reshape(-1)
    return out if rest is None else torch.cat([out, rest * absmax[-1]])


def quantize_4bit(W: Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True
                  ) -> dict[str, Tensor]:
    """Pack W into 4-bit codes. Returns {"weight": uint8 (ceil(n/2), 1), "absmax": float32 (n_blocks,)}, or with
    double quantisation "absmax" uint8 plus "absmax2" float32 (ceil(n_blocks/256),) and "offset" float32 ()."""
    scaled, absmax = _scaled(W.detach().reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, code_book(fmt, W.device)).to(torch.uint8)
    out = {"weight": ((q[::2] << 4) | q[1::2]).unsqueeze(1)}
    return {**out, **(_double_quantize(absmax) if double_quant else {"absmax": absmax})}


def _double_quantize(absmax: Tensor) -> dict[str, Tensor]:
    offset = absmax.mean()
    scaled, absmax2 = _scaled(absmax - offset, NESTED_BLOCK)
    codes = _nearest(scaled, code_book("dynamic", absmax.device)).to(torch.uint8)
    return {"absmax": codes, "absmax2": absmax2, "offset": offset}


def absmax_values(state: dict[str, Tensor]) -> Tensor:
    """The float32 per-block absmax of a 4-bit state (dequantising it when double-quantised)."""
    absmax = state["absmax"]
    if state.get("absmax2") is None:
        return absmax.float()
    values = code_book("dynamic", absmax.device)[absmax.long()]
    return _unblock(values, state["absmax2"], NESTED_BLOCK) + state["offset"]


def dequantize_4bit(state: dict[str, Tensor], shape: tuple[int, ...], fmt: str = "nf4", block_size: int = 64,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense tensor of `shape` a quantize_4bit() state stands for, in `dtype` (computed in float32).

    With bitsandbytes installed its kernel does the work (~9x faster on CPU than the torch code below) for
    every shape where, checked on first use, it gives the torch path's values bit for bit (its CPU kernel
    reads some shapes, e.g. (64, 96), differently); otherwise, or where it cannot, pure torch."""
    key = (tuple(shape), fmt, block_size, state["weight"].device.type)
    if _BNB_AGREES.get(key, True):
        fast = _bnb_dequantize_4bit(state["weight"], absmax_values(state), shape, fmt, block_size)
        if fast is not None and key not in _BNB_AGREES:
            _BNB_AGREES[key] = torch.equal(fast, dequantize_4bit_torch(state, shape, fmt, block_size))
        if fast is not None and _BNB_AGREES[key]:
            return fast.to(dtype)
    return dequantize_4bit_torch(state, shape, fmt, block_size).to(dtype)


def dequantize_4bit_torch(state: dict[str, Tensor], shape: tuple[int, ...], fmt: str = "nf4", block_size: int = 64,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """`dequantize_4bit` in pure torch."""
    packed = state["weight"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: math.prod(shape)]
    values = code_book(fmt, packed.device)[codes.long()]
    return _unblock(values, absmax_values(state), block_size).reshape(shape).to(dtype)


_BNB: list = []  # [bitsandbytes.functional or None], imported on first use
_BNB_AGREES: dict[tuple, bool] = {}  # (shape, fmt, block size, device) -> bitsandbytes' kernel == the torch path


def _bnb_functional():
    if not _BNB:
        try:
            import logging

            quiet = logging.getLogger("bitsandbytes")
            level, quiet.level = quiet.level, logging.ERROR  # its optional-kernel notice on import
            try:
                import bitsandbytes.functional as bnb_functional
            finally:
                quiet.setLevel(level)
            _BNB.append(bnb_functional)
        except Exception:  # not installed, or no backend for this machine
            _BNB.append(None)
    return _BNB[0]


def _bnb_dequantize_4bit(packed: Tensor, absmax: Tensor, shape: tuple[int, ...], fmt: str, block_size: int
                         ) -> Tensor | None:
    if packed.device.type not in ("cpu", "cuda") or math.prod(shape) % 2:
        return None
    F = _bnb_functional()
    if F is None:
        return None
    try:
        quant_state = F.QuantState(absmax=absmax.float().contiguous(), shape=torch.Size(shape), blocksize=block_size,
                                   quant_type=fmt, dtype=torch.float32, code=code_book(fmt, packed.device))
        return F.dequantize_4bit(packed, quant_state)
    except Exception:  # an op this bitsandbytes build lacks: the torch path
        return None


def quantize_int8(W: Tensor) -> dict[str, Tensor]:
    """Per-row absmax int8 of a (d_out, d_in) matrix: {"weight": int8 (d_out, d_in), "absmax": float32 (d_out,)}."""
    W = W.detach().float()
    absmax = W.abs().amax(dim=1)
    codes = torch.round(W * (127.0 / absmax.clamp(min=1e-38)[:, None])).to(torch.int8)
    return {"weight": codes, "absmax": absmax}


def dequantize_int8(state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """codes * absmax / 127 per row, in `dtype` (bitsandbytes' int8_vectorwise_dequant)."""
    return (state["weight"].float() * state["absmax"].float()[:, None] * 7.874015718698502e-3).to(dtype)


def quantize(W: Tensor, fmt: str, block_size: int = 64, double_quant: bool = True) -> dict[str, Tensor]:
    """The stored tensors of W in format `fmt` (see the module docstring)."""
    if fmt == "int8":
        return quantize_int8(W)
    return quantize_4bit(W, fmt, block_size, double_quant)


def dequantize(state: dict[str, Tensor], shape: tuple[int, ...], fmt: str, block_size: int = 64,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of quantize(): the dense tensor, in `dtype`."""
    if fmt == "int8":
        return dequantize_int8(state, dtype)
    return dequantize_4bit(state, shape, fmt, block_size, dtype)


def empty_state(shape: tuple[int, int], fmt: str, block_size: int = 64, double_quant: bool = True,
                device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zero-filled tensors shaped as quantize() would return them for a (d_out, d_in) weight (for loading)."""
    if fmt == "int8":
        return {"weight": torch.zeros(shape, dtype=torch.int8, device=device),
                "absmax": torch.zeros(shape[0], device=device)}
    n = math.prod(shape)
    blocks = -(-n // block_size)
    state = {"weight": torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device)}
    if not double_quant:
        return {**state, "absmax": torch.zeros(blocks, device=device)}
    return {**state, "absmax": torch.zeros(blocks, dtype=torch.uint8, device=device),
            "absmax2": torch.zeros(-(-blocks // NESTED_BLOCK), device=device), "offset": torch.zeros((), device=device)}


def stored_bits(state: dict[str, Tensor]) -> int:
    """Bits the tensors of a state occupy (code books are constants, not stored per tensor)."""
    return sum(8 * t.numel() * t.element_size() for t in state.values() if t is not None)
