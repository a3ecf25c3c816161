"""Group-wise asymmetric INT-b quantization (GPTQ's round-to-nearest layout), in pure torch.

    W (d_out, d_in) in groups of `group_size` consecutive input columns; per (row o, group g):
        lo = min(0, min W[o, g]),  hi = max(0, max W[o, g])       (0 inside the range: 0 is exact)
        s = (hi - lo) / (2^b - 1)   (1 where hi = lo = 0)          z = round(-lo / s)
        q = clamp(round(W / s) + z, 0, 2^b - 1)                     W_hat = s * (q - z)
    b in {2, 3, 4, 8}; s and z are float32 (d_out, n_groups). z starts as an integer, and may become any
    float: a change constant within a group is absorbed exactly as z' = z - delta / s (QA-LoRA's merge).

Codes are packed at rest, flattened row-major, LSB first: code i takes bits [b*i, b*i + b) of the byte
stream (2 codes per byte at 4 bits, 4 at 2 bits, 8 codes in 3 bytes at 3 bits). Stored bits per weight:
b + 64 / group_size (two float32 statistics per group), e.g. 4.5 for int4 with groups of 128, 5 with 64.

The scheme is GPTQ's quantizer (Frantar et al. 2022, arXiv:2210.17323; `Quantizer.find_params`, sym=False)
without its error-compensating column updates: plain round-to-nearest. QA-LoRA (arXiv:2309.14717) and
PEQA (arXiv:2305.14152) use this kind of base.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_FORMATS = {"int2": 2, "int3": 3, "int4": 4, "int8g": 8}  # format name -> bits
DEFAULT_GROUP_SIZE = 64  # divides every Linear input of SmolLM2 (576, 1536); QA-LoRA's paper uses 32


def groups_of(d_in: int, group_size: int) -> int:
    """Number of groups along the input; raises ValueError unless `group_size` divides `d_in`."""
    if not (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1):
        raise ValueError(f"group_size={group_size!r}: expected an int >= 1 (or -1 for one group per row)")
    if d_in % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if d_in % g == 0]
        raise ValueError(f"group_size={group_size} does not divide in_features={d_in}; expected a divisor of "
                         f"{d_in} (e.g. {divisors or [d_in]}) or -1 (one group per row)")
    return d_in // group_size


def quantize_groupwise(W: Tensor, bits: int, group_size: int) -> dict[str, Tensor]:
    """{"weight": packed uint8 codes (ceil(n*b/8),), "scales": float32 (d_out, G), "zeros": float32 (d_out, G)}."""
    d_out, d_in = W.shape
    G = groups_of(d_in, group_size)
    Wg = W.detach().float().reshape(d_out, G, group_size)
    maxq = 2**bits - 1
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)  # (d_out, G)
    scales = (hi - lo) / maxq
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    zeros = torch.round(-lo / scales)
    q = torch.clamp(torch.round(Wg / scales[..., None]) + zeros[..., None], 0, maxq).to(torch.uint8)
    return {"weight": pack_codes(q.reshape(-1), bits), "scales": scales, "zeros": zeros}


def dequantize_groupwise(codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32
                         ) -> Tensor:
    """s * (q - z) as a dense (d_out, d_in) tensor in `dtype` (computed in float32) from unpacked codes
    (d_out, d_in), scales and zeros (d_out, G)."""
    d_out, d_in = codes.shape
    G = scales.shape[1]
    q = codes.reshape(d_out, G, d_in // G).float()  # the one float32 temporary, updated in place
    return q.sub_(zeros.float()[..., None]).mul_(scales.float()[..., None]).reshape(d_out, d_in).to(dtype)


def packed_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Flat uint8 codes in [0, 2^bits) -> a uint8 byte stream, LSB first."""
    n = codes.numel()
    codes = codes.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: code j of a byte at bits [bits*j, bits*j + bits)
        per = 8 // bits
        codes = torch.nn.functional.pad(codes, (0, -n % per)).reshape(-1, per)
        out = torch.zeros(codes.shape[0], dtype=torch.uint8, device=codes.device)
        for j in range(per):
            out |= codes[:, j] << (bits * j)
        return out
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)  # (n * bits,) one bit each
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream << weights).sum(-1, dtype=torch.uint8)  # distinct bits: the sum is a bitwise or


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_codes: the first `n` codes, uint8."""
    packed = packed.reshape(-1)
    mask = 2**bits - 1
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (bits * j)) & mask for j in range(per)]
        return torch.stack(parts, dim=1).reshape(-1)[:n]
    weights = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> weights) & 1).reshape(-1)[: n * bits].reshape(n, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream << shifts).sum(-1, dtype=torch.uint8)


def bits_per_weight(bits: int, group_size: int) -> float:
    """Stored bits per weight entry: the code plus a float32 scale and zero per group (ignoring byte padding)."""
    return bits + 64 / group_size
