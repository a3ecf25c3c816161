"""Optimizer helpers. LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns `ratio` times faster than A.

    opt = torch.optim.AdamW(st.optim.loraplus_groups(model, lr=2e-4, ratio=16), weight_decay=0.0)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimtune.errors import ConfigError


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Param groups for any torch optimizer: lr for A (and every other trainable tensor), lr*ratio for B.

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
