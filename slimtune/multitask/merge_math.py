"""Tensor math of adapter merging: task arithmetic, TIES, DARE, magnitude pruning, SVD re-compression.

Every combiner takes task tensors tau_1..tau_k of one shape and weights w_1..w_k:

    linear (task arithmetic, arXiv:2212.04089):  tau = sum_t w_t tau_t
    magnitude_prune:   tau = sum_t w_t trim(tau_t)            trim: keep the top `density` of |tau_t|
    ties (arXiv:2306.01708):  tau_hat_t = trim(tau_t);  gamma = sign(sum_t tau_hat_t)   ("total")
                              or sign(sum_t sign(tau_hat_t))                            ("frequency")
                       tau = sum_{t agrees} w_t tau_hat_t / #{t: sign(tau_hat_t) = gamma}
    dare_linear (arXiv:2311.03099):  tau = sum_t w_t m_t * tau_t / density,  m_t ~ Bernoulli(density)
    dare_ties:         ties with the DARE drop-and-rescale in place of trim

The operations and their order are HF PEFT's (peft/utils/merge_utils.py), so results agree with it to
the last bit on the same inputs (DARE: on the same random stream). Note the sign election looks at the
trimmed tensors before weighting, as PEFT does. `svd_factors` cuts a dense delta to rank r.
"""

from __future__ import annotations

import torch
from torch import Tensor

COMBINERS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def combine(kind: str, tensors: list[Tensor], weights: list[float], density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Merge task tensors of one shape with combiner `kind` (module docstring).

    Args:
        density: fraction of each tensor kept by trimming / DARE; >= 1 keeps everything.
        generator: DARE's random stream (None: torch's global one, as HF PEFT).
    """
    if kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density, generator) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"combiner {kind!r}: expected one of {', '.join(COMBINERS)}")
    stacked = torch.stack(tensors)  # (k, *shape)
    w = torch.tensor(weights, device=stacked.device).view(-1, *(1,) * (stacked.dim() - 1))
    if kind.endswith("ties"):
        return disjoint_merge(stacked * w, majority_sign_mask(stacked, majority_sign_method))
    return (stacked * w).sum(dim=0)


def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """The k = int(density * numel) largest-magnitude entries of `tensor`, the rest zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top.indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability `density` and rescale by 1 / density (E[result] = tensor)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Bool mask (k, *shape): where task t's sign equals the elected sign (a zero entry never does)."""
    sign = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r}: expected 'total' or 'frequency'")
    return sign == torch.where(mass >= 0, 1, -1)


def disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean over the tasks that agree with the elected sign, entry by entry (0 where none does)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def svd_factors(delta: Tensor, r: int, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A the best rank-r approximation of `delta` (d_out, n): A = Vh_r, B = U_r S_r.

    `clamp`: a quantile q of the entries of A and B together; both are clipped to [-v_q, v_q] (as HF
    PEFT's svd_clamp). Half-precision deltas are factored in float32 and returned in their dtype.
    """
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # the leading r columns are all we keep
    B, A = U[:, :r] * S[:r], Vh[:r]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.to(delta.dtype), B.to(delta.dtype)


__all__ = ["COMBINERS", "SIGN_METHODS", "combine", "disjoint_merge", "magnitude_prune", "majority_sign_mask",
           "random_prune", "svd_factors"]
