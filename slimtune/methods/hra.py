"""HRA: Householder reflection adaptation, an orthogonal input-side transform of a frozen weight.

HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", arXiv:2405.17484). Per target r vectors u_1..u_r in R^d_in (the columns of
U: (d_in, r), HF PEFT's `hra_u`), each defining a reflection H_i = I - 2 u_i u_i^T / ||u_i||^2:
    W' = W0 H,   H = H_1 H_2 ... H_r       y = x @ W'.T + b = base(x @ H.T)
so HRA rewrites the layer's input: x -> x H^T, applied as one rank-r update through the compact WY
(UT) form H = I - Y T^-1 Y^T (Y: unit columns, T = I/2 + strict-upper(Y^T Y)); the d_in x d_in H is
formed only to merge. Gram-Schmidt variant (`gram_schmidt`, PEFT's `apply_GS`): the u_i are made
orthonormal first (Q), and H = I - 2 Q Q^T. Merge: W = W H; unmerge: W = W H^T (H is orthogonal).
Init ("symmetric", PEFT's default): u_1 = u_2, u_3 = u_4, ... (kaiming-uniform halves repeated), so
each pair of reflections cancels and the chain is the identity (up to rounding); "random": all r
kaiming-uniform (not an identity start). Regulariser (the paper's, off by default):
    regularization * sum over layers ||U_hat^T U_hat - I||_F^2,   U_hat = U with unit columns.
Parameters per module: r * d_in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import AdapterView, LayerAdapter, Method, PeftContext, factory, peft_target_fields, register

_INITS = ("symmetric", "random")


@dataclass
class HRAConfig(MethodConfig):
    """HRA: W' = W0 H_1 ... H_r, H_i = I - 2 u_i u_i^T / ||u_i||^2 (an input-side orthogonal transform).

    Args:
        r: the number of Householder reflections (PEFT's rank).
        gram_schmidt: orthonormalise u_1..u_r first (PEFT's `apply_GS`): H = I - 2 Q Q^T. Never the
            identity, whatever the init.
        init: "symmetric" (u's in equal pairs: the chain is the identity at start; needs an even r) or
            "random" (all kaiming-uniform). PEFT's `init_weights` True / False.
        regularization: lambda of the paper's orthogonality regulariser
            lambda * sum_layers ||U_hat^T U_hat - I||_F^2 (0: none; not part of HF PEFT).

    Paper: Yuan et al. 2024, arXiv:2405.17484.
    """

    aliases = {**MethodConfig.aliases, "apply_GS": "gram_schmidt", "init_weights": "init", "rank": "r"}

    r: int = 8
    gram_schmidt: bool = False
    init: str = "symmetric"
    regularization: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, self, "r",
                    "an int >= 1, e.g. r=8")
        check_field(isinstance(self.gram_schmidt, bool), self, "gram_schmidt", "True or False")
        check_field(self.init in _INITS, self, "init", "'symmetric' (identity at start) or 'random'")
        if self.init == "symmetric":
            check_field(self.r % 2 == 0, self, "r", "an even int with init='symmetric' (the u's come in "
                                                    "pairs), or init='random'")
        check_field(isinstance(self.regularization, (int, float)) and not isinstance(self.regularization, bool)
                    and math.isfinite(self.regularization) and self.regularization >= 0, self, "regularization",
                    "a finite number >= 0 (0: no regulariser), e.g. 1e-5")


class HRA(LayerAdapter):
    """U: (d_in, r) on a Linear or GPT-2 Conv1D; the layer sees x @ H.T instead of x."""

    peft_keys = {"u": "hra_u"}
    transforms_input = True

    def __init__(self, base: nn.Module, cfg: HRAConfig, init: bool = True) -> None:
        super().__init__()
        d_in, _ = sizes(base)
        if cfg.gram_schmidt and cfg.r > d_in:
            raise ValueError(f"HRAConfig.r={cfg.r} with gram_schmidt=True: expected r <= d_in = {d_in}")
        kw = factory(base)
        self.r, self.gram_schmidt = cfg.r, cfg.gram_schmidt
        if cfg.init == "symmetric":  # as HF PEFT: a (d_in, r/2) kaiming-uniform draw, each column twice
            half = torch.empty(d_in, cfg.r // 2, **kw)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)
        else:
            u = torch.empty(d_in, cfg.r, **kw)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.u = nn.Parameter(u)

    # -- the orthogonal transform --------------------------------------------------------------------
    def _work_u(self) -> Tensor:
        """u in float32 at least: half-precision u's would give visibly non-orthogonal chains."""
        return self.u.to(torch.promote_types(self.u.dtype, torch.float32))

    def unit_vectors(self) -> Tensor:
        """U with unit columns (PEFT: u / u.norm(dim=0))."""
        u = self._work_u()
        return u / u.norm(dim=0)

    def orthonormal_basis(self) -> Tensor:
        """Gram-Schmidt of u_1..u_r, column by column as HF PEFT does it: (d_in, r) orthonormal."""
        u = self._work_u()
        q = [u[:, :1] / u[:, 0].norm()]
        for i in range(1, self.r):
            ui = u[:, i:i + 1]
            for qj in q:
                ui = ui - (qj.T @ ui) * qj
            q.append(ui / ui.norm())
        return torch.cat(q, dim=1)

    def _wy(self) -> tuple[Tensor, Tensor]:
        """(Y, M) with H = I - Y M Y^T: the compact WY form of the chain of reflections."""
        if self.gram_schmidt:
            Q = self.orthonormal_basis()
            return Q, 2 * torch.eye(self.r, dtype=Q.dtype, device=Q.device)
        Y = self.unit_vectors()
        eye = torch.eye(self.r, dtype=Y.dtype, device=Y.device)
        T = 0.5 * eye + torch.triu(Y.T @ Y, diagonal=1)  # H_1 ... H_r = I - Y T^-1 Y^T (UT transform)
        return Y, torch.linalg.solve_triangular(T, eye, upper=True)

    def householder(self) -> Tensor:
        """H = H_1 ... H_r (I - 2 Q Q^T with Gram-Schmidt), (d_in, d_in)."""
        Y, M = self._wy()
        return torch.eye(Y.shape[0], dtype=Y.dtype, device=Y.device) - Y @ M @ Y.T

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        """x @ H.T = x - ((x Y) M^T) Y^T: O(d_in * r) per row, H never formed."""
        Y, M = self._wy()
        h = x.to(Y.dtype)
        return (h - ((h @ Y) @ M.T) @ Y.T).to(x.dtype)

    # -- merging: multiplicative, through the weight ---------------------------------------------------
    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        kind = kind_of(base)
        W = kind.weight(base)
        H = self.householder()
        kind.write_weight(base, (W.to(H.dtype) @ H).to(W.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        kind = kind_of(base)
        W = kind.weight(base)
        H = self.householder()
        kind.write_weight(base, (W.to(H.dtype) @ H.T).to(W.dtype))

    def orthogonality(self) -> Tensor:
        """||U_hat^T U_hat - I||_F^2 of this layer's unit u's (the paper's regulariser, before lambda)."""
        Y = self.unit_vectors()
        return (Y.T @ Y - torch.eye(self.r, dtype=Y.dtype, device=Y.device)).pow(2).sum()


# -- the method ---------------------------------------------------------------------------------------
@register
class HRAMethod(Method):
    name, config, shape = "hra", HRAConfig, "layer"
    category, params, paper = "reparameterized", "r*d_in", "arXiv:2405.17484"
    mergeable, peft_type = True, "HRA"
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: HRAConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return HRA(base, cfg, init)

    def regularizer(self, adapter: AdapterView, cfg: HRAConfig) -> Tensor | None:
        """lambda * sum over this adapter's layers of ||U_hat^T U_hat - I||_F^2; None when lambda = 0."""
        if cfg.regularization <= 0 or not adapter.layers:
            return None
        terms = [layer.orthogonality() for layer in adapter.layers.values()]
        total = terms[0]
        for t in terms[1:]:  # layers may sit on several devices
            total = total + t.to(total.device)
        return cfg.regularization * total

    def to_peft(self, cfg: HRAConfig, ctx: PeftContext) -> dict[str, Any]:
        if "conv1d_gpt2" in ctx.target_kinds:
            raise NotImplementedError("format='peft' for HRA on GPT-2 Conv1D modules: HF PEFT's HRA takes "
                                      "Linear and Conv2d only")
        return {
            **ctx.common("HRA"),
            "auto_mapping": None,
            "r": cfg.r,
            "apply_GS": cfg.gram_schmidt,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "init_weights": cfg.init == "symmetric",
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "modules_to_save": ctx.modules_to_save,
        }

    def from_peft(self, data: dict[str, Any]) -> HRAConfig:
        """Our config for an HF PEFT HRA adapter_config.json. An odd r with `init_weights` (PEFT then warns and
        draws at random) reads as init='random'; the init does not matter for loaded tensors anyway."""
        if data.get("bias", "none") != "none":
            raise NotImplementedError(f"PEFT HRA adapter with bias={data['bias']!r}: only 'none' is supported")
        r = int(data.get("r", 8))
        return config_from_dict({
            "method": "hra",
            "r": r,
            "gram_schmidt": bool(data.get("apply_GS", False)),
            "init": "symmetric" if data.get("init_weights", True) and r % 2 == 0 else "random",
            **peft_target_fields(data),
        })


__all__ = ["HRA", "HRAConfig", "HRAMethod"]
