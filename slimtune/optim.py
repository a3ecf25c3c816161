"""Optimizers for adapters: one factory by name (AdamW, bitsandbytes' 8-bit / paged AdamW, SGD), and LoRA+.

    opt = st.optim.make_optimizer("adamw8bit", model.parameters(), lr=2e-4)           # QLoRA's optimizer
    opt = st.optim.make_optimizer("adamw", st.optim.loraplus_groups(model, lr=2e-4, ratio=16), lr=2e-4)

In `slimtune train`: `train.optimizer: adamw8bit` (and `train.loraplus_ratio: 16` for LoRA+).

8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861) keeps
both moments as uint8 codes of a dynamic (signed / unsigned) 8-bit map, one float32 absmax per block of 256:
2 + 8/256 bytes per parameter instead of AdamW's 8. Tensors under `min_8bit_size` entries (bitsandbytes'
default 4096) keep float32 moments. Paged optimizers (QLoRA, arXiv:2305.14314) put the state in CUDA unified
memory, which spills to CPU RAM under GPU memory pressure; on CPU there is nothing to page, so they run as
their non-paged twins (same math) and say so once.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError, did_you_mean

OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim.AdamW: float moments, 8 bytes of state per trainable parameter (fp32)",
    "adamw8bit": "bitsandbytes AdamW8bit: block-wise 8-bit moments, ~2 bytes of state per parameter",
    "paged_adamw8bit": "bitsandbytes PagedAdamW8bit: adamw8bit with its state in paged CUDA memory",
    "paged_adamw": "bitsandbytes PagedAdamW: float moments in paged CUDA memory",
    "sgd": "torch.optim.SGD with momentum (4 bytes of state per parameter)",
}
_BNB: dict[str, tuple[str, bool]] = {  # name -> (bitsandbytes.optim class, paged)
    "adamw8bit": ("AdamW8bit", False),
    "paged_adamw8bit": ("PagedAdamW8bit", True),
    "paged_adamw": ("PagedAdamW", True),
}


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_optimizer(name: str, where: str = "optimizer") -> None:
    """Raise ConfigError for an unknown optimizer name, or a bitsandbytes one when bitsandbytes is missing."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}={name!r}: expected one of {list(OPTIMIZERS)}."
                          + did_you_mean(str(name), OPTIMIZERS))
    if name in _BNB and not bitsandbytes_available():
        raise ConfigError(f"{where}={name!r} needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                          "(or `pip install slimtune[quant]`), or use optimizer 'adamw'")


def make_optimizer(name: str, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float,
                   weight_decay: float = 0.0, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   momentum: float = 0.9, min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `params`: tensors, or param groups such as
    `loraplus_groups(...)` returns (a group's own lr / weight_decay win over the arguments).

    Args:
        betas, eps: AdamW's (every adamw* optimizer).
        momentum: SGD's.
        min_8bit_size: 8-bit optimizers keep float moments for tensors with fewer entries than this.
    Raises:
        ConfigError: an unknown name, a bad lr, or a bitsandbytes optimizer without bitsandbytes installed.
    """
    check_optimizer(name)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"make_optimizer: lr={lr!r}: expected a number > 0")
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    cls_name, paged = _BNB[name]
    opt = _flat_state_class(cls_name)(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                      min_8bit_size=min_8bit_size)
    if paged and any(p.device.type != "cuda" for g in opt.param_groups for p in g["params"]):
        warnings.warn(f"optimizer {name!r}: bitsandbytes pages optimizer state in CUDA memory only; these parameters "
                      f"are not on a CUDA device, so it runs as "
                      f"{name.removeprefix('paged_')!r} (same update, state not paged)", UserWarning, stacklevel=2)
        opt._cpu_paged_warned = True  # bitsandbytes' own flag: its step() would warn the same thing again
    return opt


class _FlatState:
    """bitsandbytes (0.50) nests its quantization tensors (state1, absmax1, qmap1, ...) one level down in
    `state_dict()`, for FSDP. This returns torch's flat per-parameter layout instead, which slimtune's
    checkpoints store (one safetensors entry per state tensor); bitsandbytes' `load_state_dict` reads both.
    Every parameter's state references the same 256-entry code maps (qmap1, qmap2): each gets its own copy
    here, as safetensors refuses tensors that share memory."""

    def state_dict(self) -> dict[str, Any]:
        sd = torch.optim.Optimizer.state_dict(self)
        sd["state"] = {idx: dict(per_param) for idx, per_param in sd["state"].items()}  # not the live dicts
        seen: set[int] = set()
        for per_param in sd["state"].values():
            for key, value in per_param.items():
                if torch.is_tensor(value):
                    if value.data_ptr() in seen:
                        per_param[key] = value.clone()
                    seen.add(value.data_ptr())
        return sd


@functools.cache
def _flat_state_class(cls_name: str) -> type:
    import bitsandbytes.optim

    base = getattr(bitsandbytes.optim, cls_name)
    return type(cls_name, (_FlatState, base), {"__module__": __name__, "__doc__": base.__doc__})


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (moments, 8-bit codes, their scales)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns `ratio` times faster than A.

    Param groups for any torch optimizer: lr for A (and every other trainable tensor), lr*ratio for B.
    LoRA's B tensors are the trainable parameters whose name ends in '.B'; embedding LoRA's B too.
    """
    if not (isinstance(ratio, (int, float)) and ratio > 0):
        raise ConfigError(f"loraplus ratio={ratio!r}: expected a number > 0 (the paper recommends 16)")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr={lr!r}: expected a number > 0")
    fast, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name.endswith(".B") else rest).append(p)
    if not fast:
        raise ConfigError("loraplus_groups: no trainable LoRA B tensor found; is a LoRA adapter active?")
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay},
    ]
