"""VeRA: per-layer scaling vectors around one pair of frozen random projections shared by every layer.

VeRA (Kopiczko et al. 2023, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454):
    y = base(x) + b * ((d * (drop(x) @ A_s.T)) @ B_s.T)        delta_W = diag(b) B_s diag(d) A_s
A (r, d_in_max) and B (d_out_max, r) are frozen, random and shared by all layers of one adapter, sized to
the largest target dims and sliced per layer: A_s = A[:, :d_in], B_s = B[:d_out, :] (as HF PEFT slices).
They come from `projection_prng_key` exactly as HF PEFT makes them: a CPU torch.Generator seeded with the
key draws A then B, each kaiming-uniform (bound sqrt(6 / fan_in), fan_in = size(1)), in float32, then cast
to the base's dtype and device. So an adapter saved without its projections (save_projection=False) gets
the same A and B back, in this library or in PEFT.
Trainable per layer: d (r,), init `d_initial`, and b (d_out,), init 0, so delta_W = 0 at init.
Parameters per module: r + d_out; the projections are buffers, written once per adapter file when
`save_projection` is True (PEFT's keys `base_model.vera_A` / `base_model.vera_B`), else regenerated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.layer import AdapterLayer
from slimtune.methods.base import (
    LayerAdapter,
    Method,
    PeftContext,
    Selection,
    bias_selections,
    factory,
    peft_target_fields,
    register,
)

_KEY_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclass
class VeraConfig(MethodConfig):
    """VeRA: y = base(x) + b * (B_s (d * (A_s x))); A, B frozen random and shared, d = d_initial, b = 0 at init.

    Paper: Kopiczko et al. 2023, arXiv:2310.11454. Only Linear and GPT-2 Conv1D targets.

    Args:
        r: rows of the shared projection A (columns of B). VeRA trains only r + d_out numbers per layer,
            so r is usually far larger than a LoRA rank (PEFT's default 256).
        d_initial: initial value of every entry of d (the paper recommends <= 0.1; 0 would leave both
            vectors without gradient).
        projection_prng_key: seed of the generator that draws A and B.
        save_projection: write A and B into the adapter file (once per adapter); False: regenerate them
            from `projection_prng_key` on load.
        dropout: dropout on the adapter branch input only.
        bias: "none" | "vera_only" (biases of the wrapped modules train) | "all" (every bias trains).
    """

    aliases = {**MethodConfig.aliases, "rank": "r", "vera_dropout": "dropout"}

    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(_is_int(self.r) and self.r >= 1, self, "r", "an int >= 1, e.g. r=256")
        check_field(_is_number(self.d_initial) and math.isfinite(self.d_initial) and self.d_initial != 0, self,
                    "d_initial", "a finite non-zero number, e.g. 0.1 (0 leaves d and b without gradient)")
        check_field(_is_int(self.projection_prng_key) and _KEY_RANGE[0] <= self.projection_prng_key < _KEY_RANGE[1],
                    self, "projection_prng_key", "an int seed in [-2**63, 2**64), e.g. 0")
        check_field(isinstance(self.save_projection, bool), self, "save_projection", "True or False")
        check_field(_is_number(self.dropout) and 0 <= self.dropout < 1, self, "dropout", "a float in [0, 1)")
        check_field(self.bias in ("none", "vera_only", "all"), self, "bias", "'none', 'vera_only' or 'all'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def projections(r: int, d_in: int, d_out: int, key: int) -> tuple[Tensor, Tensor]:
    """HF PEFT's shared VeRA projections in float32 on the CPU: A (r, d_in), then B (d_out, r), from one generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return _kaiming_uniform((r, d_in), generator), _kaiming_uniform((d_out, r), generator)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (PEFT's `_kaiming_init`)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen A (r, d_in_max) and B (d_out_max, r) of one adapter: buffers, saved only with save_projection."""

    def __init__(self, r: int, d_in: int, d_out: int, key: int, persistent: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        A, B = projections(r, d_in, d_out, key)
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=persistent)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=persistent)


class Vera(LayerAdapter):
    """VeRA on a Linear or GPT-2 Conv1D: y = base(x) + b * ((d * (drop(x) @ A_s.T)) @ B_s.T)."""

    peft_keys = {"d": "vera_lambda_d", "b": "vera_lambda_b"}

    def __init__(self, base: nn.Module, cfg: VeraConfig, shared: VeraProjections) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        r_max, d_in_max = shared.A.shape
        if cfg.r > r_max or d_in > d_in_max or d_out > shared.B.shape[0]:
            raise ValueError(f"the shared projections A {tuple(shared.A.shape)}, B {tuple(shared.B.shape)} are "
                             f"too small for r={cfg.r}, d_in={d_in}, d_out={d_out}")
        kw = factory(base)
        self.r, self.d_in, self.d_out = cfg.r, d_in, d_out
        self._shared = [shared]  # a plain reference: the projections belong to the adapter, not to each layer
        self.d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kw))
        self.b = nn.Parameter(torch.zeros(d_out, **kw))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def projections(self) -> tuple[Tensor, Tensor]:
        """This layer's slices of the shared projections: A_s (r, d_in) and B_s (d_out, r)."""
        shared = self._shared[0]
        return shared.A[:self.r, :self.d_in], shared.B[:self.d_out, :self.r]

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        A, B = self.projections()
        h = x if self.drop is None else self.drop(x)
        h = F.linear(h.to(self.d.dtype), A) * self.d  # (..., r); delta_W is never formed
        return base_out + (F.linear(h, B) * self.b).to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B = self.projections()
        return (self.b[:, None] * B) @ (self.d[:, None] * A)

    # -- mixed batches: rows routed to different VeRA adapters of one r in one bmm ---------------
    @property
    def route_key(self) -> tuple | None:
        return None if self.drop is not None and self.training else ("vera", self.r, self.d.dtype)

    @staticmethod
    def stack(adapters: list[Vera]) -> tuple[Tensor, Tensor]:
        """(k, d_in, r) stack of A_s.T diag(d) and (k, r, d_out) stack of B_s.T diag(b)."""
        parts = [a.projections() for a in adapters]
        A = torch.stack([(A * a.d[:, None]).T for a, (A, _) in zip(adapters, parts, strict=True)])
        B = torch.stack([(B * a.b[:, None]).T for a, (_, B) in zip(adapters, parts, strict=True)])
        return A, B

    @staticmethod
    def forward_rows(stacks: tuple[Tensor, Tensor], x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        """Row i of the batch gets adapter slot[i] (None: slot i is row i)."""
        A, B = stacks
        if slot is not None:
            A, B = A.index_select(0, slot), B.index_select(0, slot)
        rows = x.shape[0]
        h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(A.dtype), A)  # (rows, tokens, r)
        return base_out + torch.bmm(h, B).view(base_out.shape).to(base_out.dtype)


# -- the method ---------------------------------------------------------------------------------------
@register
class VeraMethod(Method):
    name, config, shape = "vera", VeraConfig, "layer"
    category, params, paper = "reparameterized", "r+d_out", "arXiv:2310.11454"
    mergeable, peft_type = True, "VERA"
    tensor_keys = {"A": "base_model.vera_A", "B": "base_model.vera_B"}  # PEFT's keys (adapter name removed)
    linear_only = True

    def build_shared(self, model: nn.Module, cfg: VeraConfig, targets: list[str], init: bool = True
                     ) -> VeraProjections | None:
        """A and B sized to the largest d_in and d_out among the targets (regenerated on load too: a file
        with save_projection=True then overwrites them)."""
        if not targets:
            return None
        bases = [_unwrapped(model.get_submodule(t)) for t in targets]
        for target, base in zip(targets, bases, strict=True):
            if not kind_of(base).linear:
                raise NotImplementedError(f"VeRA on {target} ({type(base).__name__}) is not implemented "
                                          "(Linear and GPT-2 Conv1D only)")
        dims = [kind_of(b).sizes(b) for b in bases]
        return VeraProjections(cfg.r, max(d for d, _ in dims), max(d for _, d in dims), cfg.projection_prng_key,
                               cfg.save_projection, **factory(bases[0]))

    def build_layer(self, base: nn.Module, cfg: VeraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        if not isinstance(shared, VeraProjections):
            raise ValueError("VeRA layers need the adapter's shared projections (Method.build_shared)")
        return Vera(base, cfg, shared)

    def select(self, model: nn.Module, cfg: VeraConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """The `bias` option: biases of the wrapped modules ("vera_only") or of the whole model ("all")."""
        return bias_selections(model, cfg.bias, targets)

    def to_peft(self, cfg: VeraConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **ctx.common("VERA"),
            "auto_mapping": None,
            "r": cfg.r,
            "target_modules": ctx.target_modules,
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": "conv1d_gpt2" in ctx.target_kinds,
            "bias": cfg.bias,
            "modules_to_save": ctx.modules_to_save,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any]) -> VeraConfig:
        """Our config for an HF PEFT VERA adapter_config.json (`init_weights` only matters before training:
        the vectors come from the file)."""
        return config_from_dict({
            "method": "vera",
            "r": int(data.get("r", 256)),
            "d_initial": float(data.get("d_initial", 0.1)),
            "projection_prng_key": int(data.get("projection_prng_key", 0)),
            "save_projection": bool(data.get("save_projection", True)),
            "dropout": float(data.get("vera_dropout", 0.0)),
            "bias": data.get("bias", "none"),
            **peft_target_fields(data),
        })


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module of a target (already wrapped by another adapter or not)."""
    return module.base_layer if isinstance(module, AdapterLayer) else module


__all__ = ["Vera", "VeraConfig", "VeraMethod", "VeraProjections", "projections"]
