"""AdapterLayer: one wrapped base module holding any number of named adapters.

The layer composes the active adapters in order (`out = a_k(x, ... a_1(x, base(x)))`, a sum of
deltas for additive methods), skips merged ones, and routes mixed batches: with
`state.routing = [name or None per row]`, row i sees only its own adapter. Adapters whose
`route_key` agree (LoRA of one rank and dtype) run as one gathered bmm; others run row group
by row group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class AdapterState:
    """State shared by every layer of one TunedModel."""

    active: list[str] = field(default_factory=list)
    routing: list[str | None] | None = None
    disabled: bool = False


class AdapterLayer(nn.Module):
    """Wraps `base_layer` (named as in HF PEFT so base tensor names match its files)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._state = state
        self._stack_cache: dict[tuple, tuple] = {}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        state = self._state
        if state.disabled or not self.adapters:
            return self.base_layer(x, *args, **kwargs)
        if state.routing is not None:
            return self._routed(x, self.base_layer(x, *args, **kwargs), state.routing)
        live = [n for n in state.active if n in self.adapters and n not in self.merged]
        fused = getattr(self.adapters[live[0]], "fused_forward", None) if len(live) == 1 else None
        if fused is not None and not args and not kwargs:
            out = fused(x, self.base_layer)  # base and adapter in one node, when the method offers it
            if out is not None:
                return out
        out = self.base_layer(x, *args, **kwargs)
        for name in live:
            out = self.adapters[name](x, out, self.base_layer)
        return out

    # -- merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            adapter = self.adapters[name]
            if hasattr(adapter, "merge"):
                adapter.merge(self.base_layer)
            else:
                weight = self.base_layer.weight
                weight.add_(adapter.delta_weight(self.base_layer).to(weight.dtype))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            adapter = self.adapters[self.merged.pop()]
            if hasattr(adapter, "unmerge"):
                adapter.unmerge(self.base_layer)
            else:
                weight = self.base_layer.weight
                weight.sub_(adapter.delta_weight(self.base_layer).to(weight.dtype))

    # -- mixed batches -------------------------------------------------------------------
    def _routed(self, x: Tensor, out: Tensor, routing: list[str | None]) -> Tensor:
        if len(routing) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows")
        rows_of: dict[str, list[int]] = {}
        for i, name in enumerate(routing):
            if name is not None and name in self.adapters:
                rows_of.setdefault(name, []).append(i)
        groups: dict[tuple | None, list[str]] = {}
        for name in rows_of:
            key = getattr(self.adapters[name], "route_key", None)
            groups.setdefault(key, []).append(name)
        for key, names in groups.items():
            if key is None:
                for name in names:
                    out = self._rows_one_adapter(name, rows_of[name], x, out)
            else:
                out = self._rows_batched(names, rows_of, x, out)
        return out

    def _rows_one_adapter(self, name: str, rows: list[int], x: Tensor, out: Tensor) -> Tensor:
        index = torch.tensor(rows, device=out.device)
        sub = self.adapters[name](x.index_select(0, index), out.index_select(0, index), self.base_layer)
        return out.index_copy(0, index, sub)

    def _rows_batched(self, names: list[str], rows_of: dict[str, list[int]], x: Tensor, out: Tensor) -> Tensor:
        adapters = [self.adapters[n] for n in names]
        stacks = self._stacks(names, adapters)
        kind = type(adapters[0])
        n_rows = x.shape[0]
        slots = [0] * n_rows
        covered = 0
        for slot, name in enumerate(names):
            for i in rows_of[name]:
                slots[i] = slot
            covered += len(rows_of[name])
        if covered == n_rows and slots == list(range(n_rows)):
            return kind.forward_rows(stacks, x, out, None)  # row i is adapter i: no gather
        if covered == n_rows:
            return kind.forward_rows(stacks, x, out, torch.tensor(slots, device=out.device))
        index = torch.tensor([i for n in names for i in rows_of[n]], device=out.device)
        slot = torch.tensor([s for s, n in enumerate(names) for _ in rows_of[n]], device=out.device)
        sub = kind.forward_rows(stacks, x.index_select(0, index), out.index_select(0, index), slot)
        return out.index_copy(0, index, sub)

    def _stacks(self, names: list[str], adapters: list[nn.Module]) -> tuple:
        """Stacked adapter tensors; cached in inference until any of them changes."""
        if torch.is_grad_enabled() and any(p.requires_grad for a in adapters for p in a.parameters()):
            return type(adapters[0]).stack(adapters)
        key = (tuple(names), tuple((id(p), p._version) for a in adapters for p in a.parameters()))
        if key not in self._stack_cache:
            self._stack_cache.clear()
            self._stack_cache[key] = type(adapters[0]).stack(adapters)
        return self._stack_cache[key]


class SavedModule(nn.Module):
    """A base module trained in full per adapter (`modules_to_save`): one copy per adapter name."""

    def __init__(self, original_module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._state = state

    def add(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def current(self) -> nn.Module:
        if not self._state.disabled:
            for name in self._state.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        routing = self._state.routing
        if routing is None or self._state.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(n for n in routing if n in self.modules_to_save):
            index = torch.tensor([i for i, n in enumerate(routing) if n == name], device=out.device)
            sub = self.modules_to_save[name](x.index_select(0, index), *args, **kwargs)
            out = out.index_copy(0, index, sub.to(out.dtype))
        return out
