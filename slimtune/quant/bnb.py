"""bitsandbytes' Linear4bit (what transformers' `BitsAndBytesConfig(load_in_4bit=True)` loads) as a base kind.

Matched by class name, so bitsandbytes is imported only when such a module is actually read or written.
`weight()` is bitsandbytes' dequantize_4bit; `write_weight()` re-quantizes with the module's own quant type,
block size and double quantisation (lossy, like QuantLinear); adapters use the module's compute dtype.
On CPUs with AVX512-bf16, bitsandbytes repacks a Linear4bit for its own kernel on the first eval no-grad
forward (absmax rounded to bf16); reading or writing the weight here restores its standard layout first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.bases import BaseKind, register_base
from slimtune.quant.linear import requantize


def is_bnb_linear4bit(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _standard_layout(module: nn.Module) -> None:
    """Undo the layout bitsandbytes' AVX512-bf16 CPU kernel repacks weights into on an eval, no-grad forward
    (it does the same before saving a state dict); the next such forward packs them again."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data,
                                                                                              state)


def _dequantize(module: nn.Module) -> Tensor:
    import bitsandbytes.functional as bf

    _standard_layout(module)
    return bf.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _quantize_into(module: nn.Module, value: Tensor) -> None:
    import bitsandbytes.functional as bf

    _standard_layout(module)
    old = module.weight.quant_state
    data, state = bf.quantize_4bit(value.to(old.dtype).contiguous(), blocksize=old.blocksize,
                                   compress_statistics=old.nested, quant_type=old.quant_type,
                                   quant_storage=module.weight.data.dtype)
    module.weight.data = data
    module.weight.quant_state = state


class BnbLinear4bitKind(BaseKind):
    """bitsandbytes.nn.Linear4bit (nf4 / fp4, optionally double-quantised)."""

    name, linear, mergeable = "bnb_linear4bit", True, False

    def matches(self, module: nn.Module) -> bool:
        return is_bnb_linear4bit(module)

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Module) -> Tensor:
        return _dequantize(module)

    def write_weight(self, module: nn.Module, value: Tensor) -> None:
        requantize(module, value, lambda v: _quantize_into(module, v), lambda: _dequantize(module))

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        dtype = getattr(module, "compute_dtype", None)
        return dtype if dtype is not None and dtype.is_floating_point else torch.float32

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device


register_base(BnbLinear4bitKind(), first=True)
