"""QuantLinear: a Linear whose weight stays quantized at rest (nf4, fp4 or int8; formats.py).

    y = x @ dequant(Q).T + b        dequant(Q): (d_out, d_in) in the compute dtype, built per call

Forward and backward each rebuild the dense weight from the codes (a custom autograd Function), so
no float copy of the weight outlives a call and none is saved for backward: memory at rest is the
codes plus their scales (~4.13 bits per weight for nf4 with double quantisation). The weight never
trains; gradients flow to the input (and to the bias, if something trains it).

Registered in the base-layer registry, so every layer method works on it unchanged: `weight()`
dequantizes, `write_weight()` re-quantizes (a merge into a 4-bit base is lossy: the added error is
kept in `merge_error` and logged), `mergeable = False` says so.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import BaseKind, register_base
from slimtune.errors import ConfigError, did_you_mean
from slimtune.quant import formats

log = logging.getLogger(__name__)
_STATE = ("weight", "absmax", "absmax2", "offset")  # buffers holding the quantized weight
_STATS = ("absmax", "absmax2", "offset")  # float buffers that keep float32 through .to(dtype) / .half()


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight; build it with `QuantLinear.from_linear` or `st.quantize`.

    Buffers: "weight" (uint8 packed codes (ceil(n/2), 1) for nf4/fp4, int8 (d_out, d_in) for int8),
    "absmax" (float32 per block or row; uint8 when double-quantised, then "absmax2" and "offset").
    """

    def __init__(self, in_features: int, out_features: int, fmt: str = "nf4", bias: bool = True,
                 block_size: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_format(fmt, block_size)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.block_size, self.double_quant = block_size, double_quant and fmt != "int8"
        zeros = torch.zeros(out_features, dtype=compute_dtype, device=device)
        self.register_parameter("bias", nn.Parameter(zeros, requires_grad=False) if bias else None)  # as nn.Linear
        # an empty tensor that .to(dtype) / .half() cast like any parameter: the compute dtype follows the model
        self.register_buffer("_compute", torch.empty(0, dtype=compute_dtype, device=device), persistent=False)
        self.merge_error: MergeError | None = None  # what the last write_weight() lost to rounding
        self._set_state(formats.empty_state((out_features, in_features), fmt, block_size, self.double_quant, device))

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> QuantLinear:
        """The quantized copy of an nn.Linear (its bias kept in the compute dtype)."""
        q = cls.empty_like(linear, fmt, block_size, double_quant, compute_dtype)
        q.quantize_(linear.weight.detach())
        return q

    @classmethod
    def empty_like(cls, linear: nn.Module, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> QuantLinear:
        """A QuantLinear of the same sizes holding `linear`'s bias and an all-zero weight."""
        W = linear.weight
        dtype = compute_dtype or (W.dtype if W.dtype.is_floating_point else torch.float32)
        q = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, block_size, double_quant,
                dtype, W.device)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute.dtype

    def _set_state(self, state: dict[str, Tensor]) -> None:
        for name in _STATE:
            self.register_buffer(name, state.get(name))

    def state_tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in _STATE)

    def dequantize(self, state: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """The dense (d_out, d_in) weight in the compute dtype (a new tensor each call)."""
        tensors = dict(zip(_STATE, state or self.state_tensors(), strict=True))
        shape = (self.out_features, self.in_features)
        return formats.dequantize(tensors, shape, self.fmt, self.block_size, self.compute_dtype)

    @torch.no_grad()
    def quantize_(self, W: Tensor) -> None:
        """Replace the stored weight by the quantization of W (d_out, d_in)."""
        state = formats.quantize(W.to(self.weight.device), self.fmt, self.block_size, self.double_quant)
        self._set_state(state)

    def bits_per_parameter(self) -> float:
        """Stored bits of the weight (codes and scales) per weight entry."""
        state = {n: t for n, t in zip(_STATE, self.state_tensors(), strict=True)}
        return formats.stored_bits(state) / (self.in_features * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantLinear.apply(x, self.bias, self, *self.state_tensors())

    def _apply(self, fn, recurse: bool = True):
        """Moves reach the quantization statistics; dtype casts do not (a half-precision absmax would
        round every weight of its block)."""
        kept = {k: self._buffers.pop(k) for k in _STATS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}, block_size={self.block_size}{dq}, compute_dtype={self.compute_dtype}")


def check_format(fmt: str, block_size: int) -> None:
    """Raise ConfigError for an unknown format or a block size bitsandbytes would not accept."""
    if fmt not in formats.FORMATS:
        raise ConfigError(f"quantize: format {fmt!r} is not known; expected one of {list(formats.FORMATS)}."
                          + did_you_mean(str(fmt), formats.FORMATS))
    if fmt != "int8" and block_size not in formats.BLOCK_SIZES:
        raise ConfigError(f"quantize: block_size={block_size!r}; expected one of {list(formats.BLOCK_SIZES)}, e.g. 64")


class _DequantLinear(torch.autograd.Function):
    """y = x W.T + b with W = dequant(state) rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: QuantLinear, *state: Tensor | None) -> Tensor:
        W = layer.dequantize(state)  # (d_out, d_in)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.save_for_backward(*state)  # the codes themselves, not a float copy
        return F.linear(x.to(W.dtype), W, None if bias is None else bias.to(W.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        state = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            W = ctx.layer.dequantize(state)
            grad_x = (grad.to(W.dtype) @ W).to(ctx.x_dtype)  # (..., d_in)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, grad_b, None, *[None] * len(state))


class MergeError(NamedTuple):
    """What one write into a quantized layer lost to re-quantization (Frobenius norms).

    weight: ||dequant(q(W')) - W'|| / ||W'||;  update: ||dequant(q(W')) - W'|| / ||W' - W||, the rounding
    relative to the change written (near or above 1: the merged update is mostly rounded away)."""

    weight: float
    update: float


def requantize(module: nn.Module, value: Tensor, quantize_, dequantize) -> None:
    """Write `value` into a quantized module via `quantize_`, recording (`merge_error`) and logging the error."""
    with torch.no_grad():
        before = dequantize().float()
        quantize_(value)
        ref = value.float()
        lost = (dequantize().float() - ref).norm()
        err = MergeError((lost / ref.norm().clamp_min(1e-30)).item(),
                         (lost / (ref - before).norm().clamp_min(1e-30)).item())
    module.merge_error = err
    log.info("re-quantized %s (%d x %d): error %.3g of the weight, %.3g of the update", type(module).__name__,
             *ref.shape, *err)
    warnings.warn("writing into a quantized base re-quantizes it, so merged weights carry a rounding error "
                  "(per layer: slimtune.quant.merge_errors(model)); for an exact merge call "
                  "slimtune.quant.dequantize(model) first", stacklevel=3)


class QuantLinearKind(BaseKind):
    """slimtune's QuantLinear: dense weight by dequantization, writes re-quantize (lossy)."""

    name, types, linear, mergeable = "quant_linear", (QuantLinear,), True, False

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Module) -> Tensor:
        return module.dequantize()

    def write_weight(self, module: nn.Module, value: Tensor) -> None:
        requantize(module, value, module.quantize_, module.dequantize)

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device


register_base(QuantLinearKind(), first=True)
