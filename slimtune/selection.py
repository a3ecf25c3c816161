"""Selective tuning: trainable values for chosen entries of the base model's own tensors.

The base tensor itself never changes while training: each selected tensor gets a `TunedEntries`
module holding only the tuned values (the whole tensor, or the entries of a mask as a flat
index + values), so the optimizer, its state and weight decay see k numbers, never the rest.
The owner module's class is swapped for a subclass whose attribute (`bias`, `weight`) is a
property returning the effective tensor: the base with the active adapters' entries put in.
Every read goes through it (the module's forward, fused kernels, activation-checkpoint
recomputation), and `state_dict()` still shows the untouched base tensor.

Several active adapters on one tensor add their deltas: W = W0 + sum_a (W_a - W0) on their entries.
`merge()` writes the effective tensor into the base (keeping the original), `unmerge()` and
`disabled()` give the original back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class TunedEntries(nn.Module):
    """The trainable entries of one base tensor for one adapter: all of it, or `index` (flat) entries."""

    def __init__(self, original: Tensor, mask: Tensor | None = None) -> None:
        super().__init__()
        self.tensor_shape = tuple(original.shape)  # the whole base tensor's (densities in summary())
        flat = original.detach().reshape(-1)
        if mask is None:
            self.register_buffer("index", None)
            self.values = nn.Parameter(original.detach().clone())
        else:
            if tuple(mask.shape) != tuple(original.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} differs from the tensor's {tuple(original.shape)}")
            index = mask.reshape(-1).nonzero().squeeze(1).to(device=flat.device)
            self.register_buffer("index", index)
            self.values = nn.Parameter(flat[index].clone())

    @property
    def sparse(self) -> bool:
        return self.index is not None

    def resize(self, k: int) -> None:
        """Make room for k sparse entries (loading a mask chosen elsewhere)."""
        self.index = torch.zeros(k, dtype=torch.long, device=self.values.device)
        self.values = nn.Parameter(self.values.new_zeros(k), requires_grad=self.values.requires_grad)

    def put_into(self, W0: Tensor) -> Tensor:
        """W0 with this adapter's entries put in (differentiable in `values`). Not named `apply`:
        that is nn.Module.apply(fn), which model.apply(init_fn) calls on every submodule."""
        values = self.values.to(W0.dtype)
        if self.index is None:
            return values
        return W0.reshape(-1).index_put((self.index,), values).view_as(W0)

    def delta(self, W0: Tensor) -> Tensor:
        return self.put_into(W0) - W0


class SelectedTensor:
    """Bookkeeping for one selected base tensor: its owner, the adapters tuning it, merge state."""

    def __init__(self, owner: nn.Module, attr: str, is_live: Callable[[str], bool]) -> None:
        self.owner, self.attr, self.is_live = owner, attr, is_live
        self.entries: dict[str, TunedEntries] = {}
        self.merged: list[str] = []
        self._original: Tensor | None = None

    @property
    def base(self) -> Tensor:
        return self.owner._parameters[self.attr]

    def effective(self) -> Tensor:
        """What the owner module should compute with right now."""
        return _compose(self.base, [e for n, e in self.entries.items() if n not in self.merged and self.is_live(n)])

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        todo = [n for n in names if n in self.entries and n not in self.merged]
        if not todo:
            return
        if self._original is None:
            self._original = self.base.detach().clone()
        self.base.copy_(_compose(self.base, [self.entries[n] for n in todo]))
        self.merged.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._original is not None:
            self.base.copy_(self._original)  # bit for bit
        self._original, self.merged = None, []


def _compose(W0: Tensor, entries: list[TunedEntries]) -> Tensor:
    """W0 with the entries of every adapter in `entries`: one adapter's values exactly, several
    adapters' deltas added (W0 + sum_a (W_a - W0))."""
    if not entries:
        return W0
    if len(entries) == 1:
        return entries[0].put_into(W0)
    out = W0
    for entry in entries:
        out = out + entry.delta(W0)
    return out


def install_property(owner: nn.Module, attr: str, selected: SelectedTensor) -> None:
    """Swap `owner`'s class for a subclass where `attr` reads `selected.effective()`."""
    cls = type(owner)
    if not getattr(cls, "_slimtune_selected", False):
        namespace = {"_slimtune_selected": True, "_slimtune_original_class": cls}
        cls = type(cls.__name__, (cls,), namespace)
        owner.__class__ = cls
        owner._slimtune_tensors = {}
    owner._slimtune_tensors[attr] = selected
    if not isinstance(cls.__dict__.get(attr), property):
        setattr(cls, attr, property(lambda self, a=attr: self._slimtune_tensors[a].effective()))


def remove_property(owner: nn.Module, attr: str) -> None:
    """Undo `install_property` for `attr` (and the class swap when nothing is left)."""
    tensors = getattr(owner, "_slimtune_tensors", None)
    if tensors is None:
        return
    tensors.pop(attr, None)
    if not tensors:
        owner.__class__ = type(owner)._slimtune_original_class
        del owner._slimtune_tensors


def plain_class(module: nn.Module) -> type:
    """The module's class before any selected-tensor swap."""
    return getattr(type(module), "_slimtune_original_class", type(module))


def owner_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    if attr not in owner._parameters:
        raise KeyError(name)
    return owner, attr
