"""FourierFT: a weight update given by a few trainable coefficients of its 2-D Fourier spectrum.

FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
arXiv:2405.03003). Per target a vector c of n trainable spectral coefficients sits at n fixed positions
(p_k, q_k) of a (d_out, d_in) spectrum F that is zero elsewhere:
    delta_W = scaling * Re(IDFT2(F)),  i.e.
    delta_W[j, l] = scaling / (d_out d_in) * sum_k c_k cos(2 pi (j p_k / d_out + l q_k / d_in))
    y = base(x) + x @ delta_W.T        merge: W += delta_W
The positions are the first n entries of `torch.randperm(d_out * d_in)` drawn with a CPU torch.Generator
seeded by `seed` (row = index // d_in, column = index % d_in), exactly as HF PEFT draws them, so they are
the same in every process and every layer of equal shape; like PEFT they are rebuilt from the seed,
never saved. Init: c ~ N(0, 1) (PEFT's default, `init="normal"`: delta_W != 0 at start, as in the
paper) or c = 0 (`init="zeros"`: an exact no-op start). Parameters per module: n. The spectrum is
stored under PEFT's `fourierft_spectrum`, so HF PEFT files load and save as they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import LayerAdapter, Method, PeftContext, factory, fused_dense, peft_target_fields, register

_INITS = ("normal", "zeros")


@dataclass
class FourierFTConfig(MethodConfig):
    """FourierFT: delta_W = scaling * Re(IDFT2(F)), F zero but for n trainable entries at seeded random positions.

    Args:
        n_frequency: n, the number of trainable spectral coefficients per target (at most d_in * d_out).
        scaling: the factor on Re(IDFT2(F)); the paper uses 100-150 for RoBERTa, 300 for LLaMA and ViT.
        seed: seed of the CPU torch.Generator that draws the positions (PEFT's `random_loc_seed`).
        init: "normal" (c ~ N(0, 1), PEFT's default and the paper's) or "zeros" (c = 0: exactly the base
            at start; PEFT's `init_weights=True`).
        n_frequency_pattern: {regex suffix of a module name: n} overrides (PEFT semantics).

    Paper: Gao et al. 2024, arXiv:2405.03003.
    """

    aliases = {**MethodConfig.aliases, "random_loc_seed": "seed", "init_weights": "init"}

    n_frequency: int = 1000
    scaling: float = 150.0
    seed: int = 777
    init: str = "normal"
    n_frequency_pattern: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.n_frequency) and self.n_frequency >= 1, self, "n_frequency",
                    "an int >= 1, e.g. n_frequency=1000")
        check_field(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
                    and math.isfinite(self.scaling) and self.scaling > 0, self, "scaling",
                    "a finite number > 0, e.g. scaling=150.0")
        check_field(_is_int(self.seed) and 0 <= self.seed < 2**63, self, "seed", "an int in [0, 2**63)")
        check_field(self.init in _INITS, self, "init", "'normal' (c ~ N(0, 1)) or 'zeros' (identity at start)")
        pattern = self.n_frequency_pattern
        check_field(pattern is None or (isinstance(pattern, dict) and all(
            isinstance(k, str) and _compiles(k) and _is_int(v) and v >= 1 for k, v in pattern.items())),
            self, "n_frequency_pattern", "a dict {module-name regex: int >= 1} or None")
        if pattern == {}:
            self.n_frequency_pattern = None

    def resolve(self, module_name: str) -> FourierFTConfig:
        for key, value in (self.n_frequency_pattern or {}).items():  # PEFT: a regex on a name suffix
            if re.match(rf"(.*\.)?({key})$", module_name):
                return replace(self, n_frequency=value, n_frequency_pattern=None)
        return replace(self, n_frequency_pattern=None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def spectral_positions(d_out: int, d_in: int, n: int, seed: int) -> Tensor:
    """(2, n) int64 rows and columns of the trainable entries: HF PEFT's draw, identical in every process."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


class FourierFT(LayerAdapter):
    """c on a Linear or GPT-2 Conv1D: y = base(x) + x @ delta_W.T, delta_W = scaling * Re(IDFT2(F))."""

    peft_keys = {"spectrum": "fourierft_spectrum"}

    def __init__(self, base: nn.Module, cfg: FourierFTConfig, init: bool = True) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        n = cfg.n_frequency
        if n > d_in * d_out:
            raise ValueError(f"FourierFTConfig.n_frequency={n}: expected at most d_in * d_out = {d_in * d_out}")
        kw = factory(base)
        self.shape, self.scaling = (d_out, d_in), float(cfg.scaling)
        self.register_buffer("positions", spectral_positions(d_out, d_in, n, cfg.seed).to(kw["device"]),
                             persistent=False)
        values = torch.randn(n) if init and cfg.init == "normal" else torch.zeros(n)
        self.spectrum = nn.Parameter(values.to(**kw))
        self._cache: tuple[tuple, Tensor] | None = None

    def delta_weight(self, base: nn.Module | None = None) -> Tensor:
        """scaling * Re(IDFT2(F)) in (d_out, d_in) layout, computed in float32 (or float64) as FFTs need."""
        s = self.spectrum
        key = (s.data_ptr(), s._version, s.dtype, s.device, torch.is_inference_mode_enabled())
        if torch.is_grad_enabled() and s.requires_grad:
            self._cache = None
        elif self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        work = torch.promote_types(s.dtype, torch.float32)
        dense = torch.zeros(self.shape, dtype=work, device=s.device)
        dense = dense.index_put((self.positions[0], self.positions[1]), s.to(work))
        delta = (torch.fft.ifft2(dense).real * self.scaling).to(s.dtype)
        if not (torch.is_grad_enabled() and s.requires_grad):
            self._cache = (key, delta)  # inference: rebuilt only when the spectrum changes
        return delta

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        delta = self.delta_weight(base)
        return base_out + F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Alone and active: one GEMM with W + delta_W (delta_W is formed anyway)."""
        return fused_dense(x, base, self.delta_weight(base))

    def _apply(self, fn, recurse: bool = True):
        self._cache = None  # .to() / .cuda(): drop the cached delta_W of the old device or dtype
        return super()._apply(fn, recurse)


# -- the method ---------------------------------------------------------------------------------------
@register
class FourierFTMethod(Method):
    name, config, shape = "fourierft", FourierFTConfig, "layer"
    category, params, paper = "reparameterized", "n_frequency", "arXiv:2405.03003"
    mergeable, peft_type = True, "FOURIERFT"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: FourierFTConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return FourierFT(base, cfg, init)

    def to_peft(self, cfg: FourierFTConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **ctx.common("FOURIERFT"),
            "auto_mapping": None,
            "n_frequency": cfg.n_frequency,
            "scaling": cfg.scaling,
            "random_loc_seed": cfg.seed,
            "fan_in_fan_out": "conv1d_gpt2" in ctx.target_kinds,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "bias": "none",
            "modules_to_save": ctx.modules_to_save,
            "layers_to_transform": None,
            "layers_pattern": None,
            "n_frequency_pattern": dict(cfg.n_frequency_pattern or {}),
            "init_weights": cfg.init == "zeros",
        }

    def from_peft(self, data: dict[str, Any]) -> FourierFTConfig:
        """Our config for an HF PEFT FOURIERFT adapter_config.json (`fan_in_fan_out` follows from the modules)."""
        if data.get("bias", "none") != "none":
            raise NotImplementedError(f"PEFT FourierFT adapter with bias={data['bias']!r}: only 'none' is supported")
        if data.get("random_loc_seed") is None:
            raise NotImplementedError("PEFT FourierFT adapter without random_loc_seed: the positions are unknown")
        return config_from_dict({
            "method": "fourierft",
            "n_frequency": int(data.get("n_frequency", 1000)),
            "scaling": float(data.get("scaling", 150.0)),
            "seed": int(data["random_loc_seed"]),
            "init": "zeros" if data.get("init_weights") else "normal",
            "n_frequency_pattern": data.get("n_frequency_pattern") or None,
            **peft_target_fields(data),
        })


__all__ = ["FourierFT", "FourierFTConfig", "FourierFTMethod", "spectral_positions"]
