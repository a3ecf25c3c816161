"""GroupQuantLinear: a Linear whose weight stays group-wise INT-b quantized at rest (groupwise.py).

    y = x @ W_hat.T + b        W_hat = s * (q - z), s and z per (output row, group of input columns)

Forward and backward rebuild W_hat per call (the autograd Function QuantLinear uses), so no float copy of
the weight is kept. Registered in the base-layer registry as "group_quant_linear": every layer method works
on it unchanged. Its `write_weight` is exact when the change is constant within every (row, group): the
change is absorbed into the zero-points, z' = z - delta / s, the codes q stay as they are and the result is
exactly s * (q - z') (QA-LoRA's merge). Any other change re-quantizes W' (lossy, recorded in `merge_error`
and warned about, as for QuantLinear), so the kind declares `mergeable = False`: a generic merge (LoRA)
is not exact on it.

Hooks for quantization-aware methods, on the kind (`group_kind(base, who)` returns it or refuses):
`group_size(m)`, `scales(m)`, `write_scales(m, s)`, `dequantize(m, scales=)` (s * (q - z) for given s),
`linear_with_scales(m, x, s, bias=)` (x @ (s * (q - z)).T, differentiable in x and s). PEQA trains the scales
through them; QA-LoRA checks the group size.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import BaseKind, base_kind, register_base
from slimtune.errors import ConfigError
from slimtune.quant import groupwise
from slimtune.quant.linear import MergeError, _DequantLinear, requantize

log = logging.getLogger(__name__)
_STATE = ("weight", "scales", "zeros")  # packed codes, float32 scales and zeros (d_out, n_groups)
_STATS = ("scales", "zeros")  # keep float32 through .to(dtype) / .half()
_BITS = {bits: name for name, bits in groupwise.GROUP_FORMATS.items()}


class GroupQuantLinear(nn.Module):
    """nn.Linear with a group-wise asymmetric INT-b weight; build it with `from_linear` or `st.quantize`.

    Buffers: "weight" (uint8 packed codes, (ceil(d_out*d_in*bits/8),)), "scales" and "zeros" (float32,
    (d_out, n_groups)). `group_size=-1` is one group per output row (per-channel, PEQA's setting).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 bias: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in _BITS:
            raise ValueError(f"bits={bits!r}: expected one of {sorted(_BITS)}")
        group_size = in_features if group_size == -1 else group_size
        n_groups = groupwise.groups_of(in_features, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        zeros = torch.zeros(out_features, dtype=compute_dtype, device=device)
        self.register_parameter("bias", nn.Parameter(zeros, requires_grad=False) if bias else None)
        self.register_buffer("_compute", torch.empty(0, dtype=compute_dtype, device=device), persistent=False)
        self.merge_error: MergeError | None = None  # what the last write_weight() lost to rounding
        n = in_features * out_features
        self.register_buffer("weight", torch.zeros(groupwise.packed_bytes(n, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 64,
                    compute_dtype: torch.dtype | None = None) -> GroupQuantLinear:
        """The quantized copy of an nn.Linear (its bias kept in the compute dtype)."""
        W = linear.weight
        dtype = compute_dtype or (W.dtype if W.dtype.is_floating_point else torch.float32)
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, dtype, W.device)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        q.quantize_(W.detach())
        return q

    @property
    def fmt(self) -> str:
        return _BITS[self.bits]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute.dtype

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def state_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.weight, self.scales, self.zeros

    def codes(self, packed: Tensor | None = None) -> Tensor:
        """The unpacked codes q, uint8 (d_out, d_in)."""
        packed = self.weight if packed is None else packed
        n = self.in_features * self.out_features
        return groupwise.unpack_codes(packed, self.bits, n).reshape(self.out_features, self.in_features)

    def dequantize(self, state: tuple[Tensor, ...] | None = None, scales: Tensor | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
        """s * (q - z) (d_out, d_in) in `dtype` (default: the compute dtype); `scales` replaces the stored s."""
        packed, stored, zeros = state or self.state_tensors()
        s = stored if scales is None else scales
        return groupwise.dequantize_groupwise(self.codes(packed), s, zeros, dtype or self.compute_dtype)

    @torch.no_grad()
    def quantize_(self, W: Tensor) -> None:
        """Replace the stored weight by the quantization of W (d_out, d_in)."""
        state = groupwise.quantize_groupwise(W.to(self.weight.device), self.bits, self.group_size)
        for name in _STATE:
            self._buffers[name] = state[name]

    def bits_per_parameter(self) -> float:
        """Stored bits of the weight (codes, scales, zeros) per weight entry."""
        stored = sum(8 * t.numel() * t.element_size() for t in self.state_tensors())
        return stored / (self.in_features * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantLinear.apply(x, self.bias, self, *self.state_tensors())

    def _apply(self, fn, recurse: bool = True):
        """Moves reach scales and zeros; dtype casts do not (rounding them would move every weight)."""
        kept = {k: self._buffers.pop(k) for k in _STATS}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}, group_size={self.group_size}, compute_dtype={self.compute_dtype}")


class _ScaledLinear(torch.autograd.Function):
    """y = x @ (s * (q - z)).T + b for given scales s (d_out, n_groups): gradients to x, s (and b); the dense
    matrix is rebuilt in backward from the codes, not saved.
    dL/ds[o, j] = sum over i in group j of (dL/dy.T @ x)[o, i] * (q - z)[o, i]."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: Tensor, bias: Tensor | None, layer: GroupQuantLinear, packed: Tensor,
                zeros: Tensor) -> Tensor:
        W = layer.dequantize((packed, scales, zeros))  # (d_out, d_in), compute dtype
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.save_for_backward(x, scales, packed, zeros)
        return F.linear(x.to(W.dtype), W, None if bias is None else bias.to(W.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scales, packed, zeros = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
        layer = ctx.layer
        shape = (layer.out_features, layer.n_groups, layer.group_size)
        q_minus_z = layer.dequantize((packed, torch.ones_like(scales), zeros), dtype=torch.float32).reshape(shape)
        grad_x = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            W = (q_minus_z * scales.float()[..., None]).reshape(shape[0], -1).to(layer.compute_dtype)
            grad_x = (grad.to(W.dtype) @ W).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # one more full matmul than LoRA's backward: g.T @ x
            dtype = layer.compute_dtype
            g, x2 = grad.reshape(-1, grad.shape[-1]).to(dtype), x.reshape(-1, x.shape[-1]).to(dtype)
            grad_W = (g.T @ x2).float().reshape(shape)  # (d_out, n_groups, group_size)
            grad_s = grad_W.mul_(q_minus_z).sum(-1).to(scales.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_s, grad_b, None, None, None


class GroupQuantLinearKind(BaseKind):
    """GroupQuantLinear: dense weight by dequantization; writes exact for group-constant changes (absorbed
    into the zeros), re-quantizing otherwise, so `mergeable = False`."""

    name, types, linear, mergeable = "group_quant_linear", (GroupQuantLinear,), True, False

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Module) -> Tensor:
        return module.dequantize()

    @torch.no_grad()
    def write_weight(self, module: nn.Module, value: Tensor) -> None:
        current = module.dequantize()
        offsets = _group_offsets(module, value, current)
        if offsets is None:
            requantize(module, value, module.quantize_, module.dequantize)
            return
        s = module.scales
        module.zeros.sub_(torch.where(s == 0, torch.zeros_like(s), offsets / s))  # z' = z - delta / s
        ref = value.float()
        lost = (module.dequantize(dtype=torch.float32) - ref).norm()
        module.merge_error = MergeError((lost / ref.norm().clamp_min(1e-30)).item(),
                                        (lost / (ref - current.float()).norm().clamp_min(1e-30)).item())
        log.debug("absorbed a group-constant change into the zeros of %s: error %.3g of the weight", module,
                  module.merge_error.weight)

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    # -- hooks for quantization-aware methods --------------------------------------------------------
    def group_size(self, module: nn.Module) -> int:
        """Input columns per group (in_features for per-channel quantization)."""
        return module.group_size

    def scales(self, module: nn.Module) -> Tensor:
        """A float32 copy of the scales s, (d_out, n_groups)."""
        return module.scales.detach().clone()

    @torch.no_grad()
    def write_scales(self, module: nn.Module, scales: Tensor) -> None:
        """Store new scales exactly (codes and zeros unchanged): W_hat = scales * (q - z)."""
        if tuple(scales.shape) != tuple(module.scales.shape):
            raise ValueError(f"scales of shape {tuple(scales.shape)}; this layer has {tuple(module.scales.shape)}")
        module.scales.copy_(scales.float())

    def dequantize(self, module: nn.Module, scales: Tensor | None = None) -> Tensor:
        """scales * (q - z) in the compute dtype (the stored scales by default)."""
        return module.dequantize(scales=scales)

    def linear_with_scales(self, module: nn.Module, x: Tensor, scales: Tensor, bias: bool = False) -> Tensor:
        """x @ (scales * (q - z)).T (+ the layer's bias), differentiable in x and `scales` (d_out, n_groups).
        With the stored scales and bias=True it is the layer's own forward, bit for bit."""
        b = module.bias if bias else None
        return _ScaledLinear.apply(x, scales, b, module, module.weight, module.zeros)


def _group_offsets(module: GroupQuantLinear, value: Tensor, current: Tensor) -> Tensor | None:
    """The per-(row, group) constant c with value = current + c, up to the rounding of `value` in its dtype;
    None where the change varies inside a group (or a group with scale 0 would have to move)."""
    shape = (module.out_features, module.n_groups, module.group_size)
    delta = (value.float() - current.float()).reshape(shape)
    eps = max(torch.finfo(value.dtype).eps, torch.finfo(current.dtype).eps)
    size = torch.maximum(value.float().abs(), current.float().abs()).reshape(shape).amax(-1)
    if bool(((delta.amax(-1) - delta.amin(-1)) > 4 * eps * size).any()):
        return None
    offsets = delta.mean(-1)
    if bool(((module.scales == 0) & (offsets != 0)).any()):
        return None
    return offsets


def group_kind(module: nn.Module, who: str) -> GroupQuantLinearKind:
    """The kind of a group-quantized base, or a ConfigError saying what `who` (a method) expected."""
    kind = base_kind(module)
    if isinstance(kind, GroupQuantLinearKind):
        return kind
    what = f"{type(module).__name__}" + (f" (base kind {kind.name!r})" if kind is not None else "")
    fmt = getattr(module, "fmt", None)
    hint = f", format {fmt!r}" if fmt else ""
    raise ConfigError(f"{who} needs a group-wise quantized base layer (GroupQuantLinear); got {what}{hint}. "
                      "Quantize the model first: st.quantize(model, 'int4', group_size=64) "
                      "(or 'int2', 'int3', 'int8g')")


register_base(GroupQuantLinearKind(), first=True)

__all__ = ["GroupQuantLinear", "GroupQuantLinearKind", "group_kind"]
