"""LoRA-SP: a LoRA of which a fixed random part of A's and B's entries trains; the rest stays at its init.

LoRA-SP (Wu et al. 2024, "LoRA-SP: Streamlined Partial Parameter Adaptation for Resource-Efficient
Fine-Tuning of Large Language Models", arXiv:2403.08822):
    y = base(x) + s * drop(x) @ A.T @ B.T          A = A0 with A[M_A] trained,  B = 0 with B[M_B] trained
M_A, M_B: fixed random masks of round(f * numel) entries each (f = `trainable_fraction`, 1/2 in the paper).
The trained entries are packed parameters (A_train, B_train) put into fixed full-size buffers in forward
(masked_scatter), so gradients, optimizer state and weight decay cover only f of the numbers, and the
frozen entries stay bit-identical under any optimizer. Masks and A0 come from a CPU torch.Generator
seeded per module with (`mask_seed`, module name): the adapter is fully defined by its config and packed
values, in every process. Init: A0 kaiming-uniform (gaussian: N(0, 1/r)), B = 0: identity at start.
Merge: W += s * B @ A. The adapter saves as the plain LoRA (A, B) it computes (method "lora", loadable by
st.load and HF PEFT); `resume(model, path)` puts such a file back into a LoRA-SP adapter to keep training.
Parameters per module: round(f * r * d_in) + round(f * d_out * r).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.config import check_field
from slimtune.errors import AdapterLoadError
from slimtune.methods.base import AdapterView, LayerAdapter, register
from slimtune.methods.lora import Lora, LoraConfig, LoraMethod


@dataclass
class LoraSPConfig(LoraConfig):
    """LoRA-SP: LoRA with a fixed random `trainable_fraction` of A's and of B's entries trained.

    Paper: Wu et al. 2024, arXiv:2403.08822. Linear and GPT-2 Conv1D targets. LoraConfig's fields apply
    (r, alpha, dropout, rslora, bias, rank_pattern, alpha_pattern), except init (only "default" or
    "gaussian") and freeze_A (LoRA-SP already freezes part of A).

    Args:
        trainable_fraction: share of the entries of A, and of B, that train (exactly round(f * numel) each).
        mask_seed: seed of the masks and of A's init (combined with each module's name).
    """

    trainable_fraction: float = 0.5
    mask_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.init in ("default", "gaussian"), self, "init",
                    "'default' or 'gaussian' (PiSSA/OLoRA inits are not implemented for LoRA-SP)")
        check_field(self.freeze_A is False, self, "freeze_A", "False (LoRA-SP already freezes part of A)")
        f = self.trainable_fraction
        check_field(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1, self,
                    "trainable_fraction", "a number in (0, 1], e.g. 0.5")
        check_field(isinstance(self.mask_seed, int) and not isinstance(self.mask_seed, bool)
                    and 0 <= self.mask_seed < 2**63, self, "mask_seed", "an int in [0, 2**63), e.g. 0")

    def resolve(self, module_name: str) -> LoraSPConfig:
        """Per module: its rank and alpha (patterns), and its own seed derived from `mask_seed` and its name."""
        return dataclasses.replace(super().resolve(module_name), mask_seed=module_seed(self.mask_seed, module_name))


def module_seed(seed: int, module_name: str) -> int:
    """A per-module seed, the same in every process (crc32, not Python's salted hash)."""
    return (seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63


def random_mask(shape: torch.Size, fraction: float, generator: torch.Generator) -> Tensor:
    """A bool tensor of `shape` with exactly round(fraction * numel) True entries at random places."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:round(fraction * n)]] = True
    return mask.view(shape)


class LoraSP(Lora):
    """LoRA-SP on a Linear or GPT-2 Conv1D: A and B are fixed buffers with the packed trained entries put in."""

    def __init__(self, base: nn.Module, cfg: LoraSPConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        g = torch.Generator().manual_seed(cfg.mask_seed)  # cfg is resolved: the seed is this module's
        A0 = torch.empty(self.A.shape)  # float32 on the CPU: the same numbers on any device
        if cfg.init == "gaussian":
            nn.init.normal_(A0, std=1 / self.r, generator=g)
        else:
            nn.init.kaiming_uniform_(A0, a=math.sqrt(5), generator=g)
        A_mask, B_mask = random_mask(self.A.shape, cfg.trainable_fraction, g), random_mask(self.B.shape,
                                                                                           cfg.trainable_fraction, g)
        A0, B0 = A0.to(self.A), torch.zeros_like(self.B)
        del self.A, self.B  # the full A and B become fixed buffers (not saved: the seed remakes them)
        self.register_buffer("A", A0, persistent=False)
        self.register_buffer("B", B0, persistent=False)
        self.register_buffer("A_mask", A_mask.to(A0.device), persistent=False)
        self.register_buffer("B_mask", B_mask.to(A0.device), persistent=False)
        self.A_train = nn.Parameter(A0[self.A_mask])  # (round(f r d_in),)
        self.B_train = nn.Parameter(B0[self.B_mask])  # (round(f d_out r),)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.A.masked_scatter(self.A_mask, self.A_train), self.B.masked_scatter(self.B_mask, self.B_train), \
            self.scale

    def export_tensors(self) -> dict[str, Tensor]:
        """The plain LoRA this adapter computes."""
        A, B, _ = self.factors()
        return {"A": A, "B": B}

    @torch.no_grad()
    def load_factors(self, A: Tensor, B: Tensor, source: str) -> None:
        """Take the trained entries from a plain LoRA's A and B saved from this adapter (same config)."""
        for name, value, fixed, mask in (("A", A, self.A, self.A_mask), ("B", B, self.B, self.B_mask)):
            if tuple(value.shape) != tuple(fixed.shape):
                raise AdapterLoadError(f"{source}: {name} is {tuple(value.shape)}, this LoRA-SP adapter has "
                                       f"{tuple(fixed.shape)}")
            if not torch.equal(value.to(fixed)[~mask], fixed[~mask]):
                raise AdapterLoadError(f"{source}: the frozen entries of {name} differ from this adapter's; the file "
                                       "was saved from another LoRA-SP config (mask_seed, r, init or targets)")
        self.A_train.copy_(A.to(self.A)[self.A_mask])
        self.B_train.copy_(B.to(self.B)[self.B_mask])


def resume(model, path: str | Path, name: str = "default") -> None:
    """Load a saved LoRA-SP adapter (a plain LoRA file) back into LoRA-SP adapter `name`, built with the
    config it was trained with, so that training continues with the same masks and frozen entries."""
    from slimtune.adapter_files import canonical, read_adapter

    _, _, tensors = read_adapter(path)
    tensors = {canonical(k): v for k, v in tensors.items()}
    for module, layer in model.view(name).layers.items():
        keys = [canonical(f"{module}.{layer.peft_keys[t]}") for t in ("A", "B")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterLoadError(f"{path}: no tensor {missing[0]!r} for LoRA-SP module {module}")
        layer.load_factors(tensors[keys[0]], tensors[keys[1]], str(path))


# -- the method ---------------------------------------------------------------------------------------
@register
class LoraSPMethod(LoraMethod):
    name, config = "lora_sp", LoraSPConfig
    params, paper = "f*r*(d_in+d_out)", "arXiv:2403.08822"
    peft_type = None  # PEFT has no LoRA-SP; the saved file is a PEFT LORA
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: LoraSPConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return LoraSP(base, cfg, init)

    def saved_config(self, cfg: LoraSPConfig, adapter: AdapterView) -> LoraConfig:
        """The plain LoRA of the composed A and B (same r, alpha, patterns)."""
        return LoraConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)})


__all__ = ["LoraSP", "LoraSPConfig", "LoraSPMethod", "module_seed", "random_mask", "resume"]
