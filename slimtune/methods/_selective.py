"""Helpers the selective methods share: which base tensors a config picks, empirical Fisher scores
streamed over calibration batches, top-k masks, and the density line `summary()` prints.

Tensors are picked by the modules they live under: `targets` (suffixes or a regex, matched against
every module above the tensor, so "mlp" picks every tensor of the MLP blocks; "all-linear": the
linear layers except the output head), `exclude` the same way, `layers` by block index. Tensors
shared by several modules (tied input / output embeddings) are never picked: the engine reads a
selected tensor through one owner module, so the other would not see the tuned entries.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig
from slimtune.errors import ConfigError, TargetNotFoundError
from slimtune.layer import base_name, is_adapter_tensor
from slimtune.targets import find_targets, matches, narrow


def base_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Base name -> parameter of the base model's own floating tensors, seen through wrappers."""
    return {base_name(n): p for n, p in model.named_parameters()
            if not is_adapter_tensor(n) and p.is_floating_point()}


def tied_names(model: nn.Module) -> set[str]:
    """Base names of tensors that several modules share (tied embeddings)."""
    seen: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if not is_adapter_tensor(n):
            seen.setdefault(id(p), []).append(base_name(n))
    return {n for names in seen.values() if len(names) > 1 for n in names}


def ancestors(name: str) -> list[str]:
    """The modules above a tensor: 'a.b.weight' -> ['a', 'a.b']."""
    parts = name.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def under(name: str, pattern: str | list[str]) -> bool:
    """Whether some module above tensor `name` is matched by `pattern`."""
    return any(matches(a, pattern) for a in ancestors(name))


def in_saved(name: str, cfg: MethodConfig) -> bool:
    """Whether tensor `name` belongs to a `modules_to_save` module (trained in full by its copy)."""
    return any(a == e or a.endswith("." + e) for e in cfg.modules_to_save or [] for a in ancestors(name))


def chosen_tensors(model: nn.Module, cfg: MethodConfig, what: str = "tensor") -> list[str]:
    """Base names of the tensors `cfg` picks (module docstring), in model order.

    Raises:
        TargetNotFoundError: nothing left; the message says what was looked at.
    """
    names = list(base_tensors(model))
    if cfg.targets == "all-linear":
        modules = find_targets(model, cfg)  # applies exclude and layers too
        names = [n for n in names if any(a in modules for a in ancestors(n))]
    else:
        names = narrow(names, cfg, match=under)
    tied = tied_names(model)
    chosen = [n for n in names if n not in tied and not in_saved(n, cfg)]
    if not chosen:
        skipped = f"; skipped as tied: {sorted(tied & set(names))}" if tied & set(names) else ""
        raise TargetNotFoundError(f"{type(cfg).__name__}(targets={cfg.targets!r}, exclude={cfg.exclude!r}, "
                                  f"layers={cfg.layers!r}) picks no {what} in {type(model).__name__}{skipped}")
    return chosen


# -- empirical Fisher ---------------------------------------------------------------------------------
def rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch split into one-row batches (tensors with the batch's leading size are sliced)."""
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0]
    if not sizes:
        raise ConfigError(f"calibration batch with keys {sorted(batch)}: expected tensors with a batch dimension")
    n = sizes[0]
    return [{k: v[i : i + 1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
             for k, v in batch.items()} for i in range(n)]


def _loss(model: nn.Module, batch: dict[str, Any], device: torch.device) -> Tensor:
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ConfigError(f"calibration batch with keys {sorted(batch)} gives no loss: expected labels in it "
                          "(the Fisher scores are squared gradients of the loss)")
    return loss


def empirical_fisher(model: nn.Module, names: list[str], data: Iterable[dict],
                     per_example: bool = True) -> dict[str, Tensor]:
    """Sum over the calibration data of squared loss gradients, per entry of each tensor in `names`:
    F_i = sum_n (dL_n/dtheta_i)^2, with n one example (per_example) or one batch.

    Streamed: each gradient is added into the float32 scores as soon as backward produces it and then
    dropped, so memory holds one score copy of the tensors plus one tensor's gradient, for any data size.
    The model runs in eval mode (no dropout); its parameters' requires_grad and its modules' modes are
    restored, and no gradient is left behind.
    """
    params = base_tensors(model)
    scores = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    with _gradients_only_for(model, {params[n]: scores[n] for n in names}):
        seen = 0
        for batch in data:
            for part in rows(batch) if per_example else [batch]:
                _loss(model, part, params[names[0]].device).backward()
                seen += 1
    if not seen:
        raise ConfigError("calibration data is empty: expected at least one batch with labels")
    return scores


@contextlib.contextmanager
def _gradients_only_for(model: nn.Module, scores: dict[nn.Parameter, Tensor]) -> Iterator[None]:
    """Within the block: eval mode, and only the parameters in `scores` get gradients, each squared into
    its score by a hook as soon as it is complete. Afterwards everything is as it was."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    hooks = []
    try:
        for p in flags:
            p.requires_grad_(p in scores)
        hooks = [p.register_post_accumulate_grad_hook(_accumulator(s)) for p, s in scores.items()]
        model.eval()
        yield
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in scores:
            p.grad = None
        for m, training in modes.items():
            m.training = training


def _accumulator(score: Tensor) -> Callable[[Tensor], None]:
    def hook(p: Tensor) -> None:
        score.add_(p.grad.detach().float().square())
        p.grad = None  # one gradient alive at a time

    return hook


def budget(density: float, n: int) -> int:
    """Entries kept out of n at `density`: at least one."""
    return max(1, min(n, round(density * n)))


def top_k_masks(scores: dict[str, Tensor], density: float, scope: str = "global") -> dict[str, Tensor]:
    """Bool masks of the highest scores (>= 0): `density` of all entries together ("global") or of each
    tensor ("per_tensor"). Exact budget; ties at the threshold go to the earliest entries in model order.
    No concatenated copy of the scores is made: the threshold is found by bisection over their bits."""
    if scope == "per_tensor":
        return {n: _top_k({n: s}, budget(density, s.numel()))[n] for n, s in scores.items()}
    return _top_k(scores, budget(density, sum(s.numel() for s in scores.values())))


def top_k(scores: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Bool masks of exactly the k highest scores (>= 0) over all tensors together (ties: model order)."""
    if not 0 <= k <= sum(s.numel() for s in scores.values()):
        raise ValueError(f"top_k: k={k} outside 0..{sum(s.numel() for s in scores.values())}")
    return _top_k(scores, k) if k else {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}


def _top_k(scores: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    # scores >= 0: their float32 bit patterns, read as int32, sort as the values do
    bits = {n: s.detach().float().contiguous().view(torch.int32) for n, s in scores.items()}

    def count(pred: Callable[[Tensor], Tensor]) -> int:
        return sum(int(pred(b).sum()) for b in bits.values())

    lo, hi = 0, 0x7F800000  # the k-th largest value's bits: the largest t with count(bits >= t) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(lambda b, t=mid: b >= t) >= k else (lo, mid - 1)
    left = k - count(lambda b: b > lo)  # entries equal to the threshold still to take, in model order
    out = {}
    for n, b in bits.items():
        tie = b == lo
        take = tie & (tie.reshape(-1).cumsum(0).view_as(b) <= left)
        left -= int(take.sum())
        out[n] = (b > lo) | take
    return out


def is_fraction(value: Any) -> bool:
    """A number in (0, 1]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and 0 < value <= 1


# -- summary lines ----------------------------------------------------------------------------------
def tensor_numel(entries: nn.Module) -> int | None:
    """Entries of the whole base tensor a `TunedEntries` tunes: a dense one holds all of them; a sparse one
    knows it from `tensor_shape` (recorded at construction), else None."""
    if entries.index is None:
        return entries.values.numel()
    shape = getattr(entries, "tensor_shape", None)
    return math.prod(shape) if shape is not None else None


def density_line(selections: dict[str, nn.Module], top: int = 3) -> str:
    """One summary line for `AdapterView.selections`: overall density and the `top` densest tensors,
    e.g. 'density 0.50% (1,234 of 246,784 entries, 14 tensors); densest: layers.1.mlp.down_proj.weight 2.10%, ...'"""
    counts = {base_name(n): (e.values.numel(), tensor_numel(e)) for n, e in selections.items()}
    k = sum(c for c, _ in counts.values())
    if not counts or any(n is None for _, n in counts.values()):
        return f"{k:,} entries in {len(counts)} tensors"
    total = sum(n for _, n in counts.values())
    densest = sorted(counts.items(), key=lambda item: -item[1][0] / max(item[1][1], 1))[:top]
    detail = ", ".join(f"{_short(name)} {100 * c / max(n, 1):.2f}%" for name, (c, n) in densest)
    overall = f"density {100 * k / max(total, 1):.2f}% ({k:,} of {total:,} entries, {len(counts)} tensors)"
    return f"{overall}; densest: {detail}"


def _short(name: str) -> str:
    """A tensor name from its block on ('model.layers.1.mlp.down_proj.weight' -> 'layers.1.mlp.down_proj.weight')."""
    m = re.search(r"(?:^|\.)((?:layers|layer|h|blocks|block)\.\d+\..*)$", name)
    return m[1] if m else name
