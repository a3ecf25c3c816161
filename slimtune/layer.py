"""AdapterLayer: one wrapped base module holding any number of named adapters.

The layer composes the active adapters in order (`out = a_k(x, ... a_1(x, base(x)))`, a sum of
deltas for additive methods), skips merged ones, and routes mixed batches: with
`state.routing = [name or None per row]`, row i sees only its own adapter. Adapters whose
`route_key` agree (same kind, rank and dtype, say) run as one batched op; others run row group
by row group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimtune import composition
from slimtune.composition import Block


@dataclass
class AdapterState:
    """State shared by every layer of one TunedModel."""

    active: list[str] = field(default_factory=list)  # adapter names in the active setup
    setup: Block | None = None  # a composition (Average, Split, Fuse, Parallel, nested); None: `active` stacks
    routing: list[str | Block | None] | None = None
    disabled: bool = False
    call: dict[str, Any] = field(default_factory=dict)  # keyword arguments of this call the methods read
    rows: Tensor | None = None  # rows of the call the running adapter sees (mixed batches)


_WRAPPER_PARTS = (".base_layer", ".original_module")


def is_adapter_tensor(name: str) -> bool:
    """Whether a parameter name of a wrapped model belongs to an adapter rather than to the base."""
    return ".adapters." in name or ".modules_to_save." in name


def base_name(name: str) -> str:
    """A wrapped model's parameter name as the unwrapped base calls it ('q_proj.base_layer.bias' -> 'q_proj.bias')."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part + ".", ".")
    return name


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(base name, parameter) of the base model's own tensors, seen through slimtune's wrappers."""
    return [(base_name(n), p) for n, p in model.named_parameters() if not is_adapter_tensor(n)]


class AdapterLayer(nn.Module):
    """Wraps `base_layer` (named as in HF PEFT so base tensor names match its files)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._merge_log: list[tuple[str, str]] = []  # (name, "whole" | "output" | "input") in merge order
        self._released: list[str] = []  # idle base-changing adapters given back to the base while merged
        self._state = state
        self._stack_cache: dict[tuple, tuple] = {}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        state = self._state
        if not self.adapters:
            return self.base_layer(x, *args, **kwargs)
        if state.routing is not None and not state.disabled:
            return self._routed(x, state.routing, args, kwargs)
        live = [] if state.disabled else [n for n in state.active if n in self.adapters and n not in self.merged]
        if state.setup is not None and live:
            return self._composed(state.setup, live, x, args, kwargs)
        idle = [a for n, a in self.adapters.items()
                if a.changes_base and n not in live and n not in self.merged and n not in self._released]
        if len(live) == 1 and not idle and not args and not kwargs:
            out = self.adapters[live[0]].fused_forward(x, self.base_layer)  # base + adapter in one node
            if out is not None:
                return out
        adapters = [self.adapters[n] for n in live]
        for adapter in adapters:
            if adapter.transforms_input:
                x = adapter.transform_input(x, self.base_layer)
        out = self.base_layer(x, *args, **kwargs)
        for adapter in idle:
            out = adapter.inactive_forward(x, out, self.base_layer)
        for adapter in adapters:
            out = adapter(x, out, self.base_layer)
        return out

    def _composed(self, setup: Block, live: list[str], x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """A composition block's output here (composition.py). Input-side adapters may only be children of a
        top-level Stack (their transforms apply first, as in a plain list); blocks combine output sides."""
        top = setup.children if isinstance(setup, composition.Stack) else ()
        for name in live:
            if self.adapters[name].transforms_input:
                if name not in top:
                    raise NotImplementedError(f"adapter {name!r} changes this layer's input, which a "
                                              f"{type(setup).__name__} block cannot combine; stack it at the top")
                x = self.adapters[name].transform_input(x, self.base_layer)
        out = self.base_layer(x, *args, **kwargs)
        for name, adapter in self.adapters.items():
            if adapter.changes_base and name not in live and name not in self.merged + self._released:
                out = adapter.inactive_forward(x, out, self.base_layer)
        return composition.apply(setup, x, out, self._leaf, self._fuse, live.__contains__)

    def _leaf(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        return self.adapters[name](x, out, self.base_layer)

    def _fuse(self, name: str, x: Tensor, out: Tensor, deltas: list[Tensor]) -> Tensor:
        return self.adapters[name].fuse(x, out, deltas, self.base_layer)

    # -- merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Fold `names` into the base weight, in order; input-side adapters fold in last, as they
        change the input of the base and of every other adapter alike, and in reverse order: forward
        computes W M_b M_a x for transforms a then b, so M_b folds into W before M_a."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        inputs = [n for n in todo if self.adapters[n].transforms_input]
        for name, adapter in self.adapters.items():  # an idle residual init: give the base back first, so
            if todo and adapter.changes_base and name not in todo and name not in self.merged + self._released:
                adapter.release(self.base_layer)  # merged weights scale the original base, not the residual
                self._released.append(name)
        for name in todo:
            self.adapters[name].prepare_merge(self.base_layer)
        for name in todo:  # output sides in the active order (an input-side adapter's output part, e.g. a scale)
            if name in inputs:
                self.adapters[name].merge_output(self.base_layer)
                self._merge_log.append((name, "output"))
            else:
                self.adapters[name].merge(self.base_layer)
                self._merge_log.append((name, "whole"))
        for name in inputs[::-1]:
            self.adapters[name].merge(self.base_layer)
            self._merge_log.append((name, "input"))
        self.merged.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self._merge_log:
            name, part = self._merge_log.pop()
            if part == "output":
                self.adapters[name].unmerge_output(self.base_layer)
            else:
                self.adapters[name].unmerge(self.base_layer)
        self.merged.clear()
        while self._released:
            self.adapters[self._released.pop()].install(self.base_layer)

    @torch.no_grad()
    def release_unmerged(self) -> None:
        """Give the base back what unmerged adapters' inits took (before removing this wrapper)."""
        for name, adapter in self.adapters.items():
            if name not in self.merged and name not in self._released:
                adapter.release(self.base_layer)

    # -- mixed batches -------------------------------------------------------------------
    def _routed(self, x: Tensor, routing: list[str | None], args: tuple, kwargs: dict) -> Tensor:
        if len(routing) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows")
        out = self.base_layer(x, *args, **kwargs)
        rows_of: dict[str, list[int]] = {}
        rows_of_block: dict[Block, list[int]] = {}
        for i, name in enumerate(routing):
            if isinstance(name, Block):
                rows_of_block.setdefault(name, []).append(i)
            elif name is not None and name in self.adapters:
                rows_of.setdefault(name, []).append(i)
        for name, adapter in self.adapters.items():  # rows that do not use a base-changing adapter
            if adapter.changes_base and name not in self.merged:
                others = [i for i, n in enumerate(routing) if n != name
                          and not (isinstance(n, Block) and name in composition.leaves(n))]
                if others:
                    out = self._on_rows(others, out, lambda xr, o, a=adapter: a.inactive_forward(xr, o,
                                                                                               self.base_layer), x)
        groups: dict[tuple[bool, object], list[str]] = {}
        for name in rows_of:
            adapter = self.adapters[name]
            key = None if adapter.transforms_input else adapter.route_key
            groups.setdefault((False, name) if key is None else (True, key), []).append(name)
        for (batched, _), names in groups.items():
            if not batched:
                out = self._rows_one_adapter(names[0], rows_of[names[0]], x, out, args, kwargs)
            else:
                out = self._rows_batched(names, rows_of, x, out)
        for block, rows in rows_of_block.items():
            live = [n for n in composition.leaves(block) if n in self.adapters and n not in self.merged]
            if live:
                out = self._on_rows(rows, out, lambda xr, o, b=block, lv=live: self._composed_rows(b, lv, xr, o), x)
        return out

    def _composed_rows(self, block: Block, live: list[str], x: Tensor, out: Tensor) -> Tensor:
        for name in live:
            if self.adapters[name].transforms_input:
                raise NotImplementedError(f"adapter {name!r} changes this layer's input, which cannot be combined "
                                          f"in a {type(block).__name__} block")
        return composition.apply(block, x, out, self._leaf, self._fuse, live.__contains__)

    def _on_rows(self, rows: list[int], out: Tensor, fn, x: Tensor) -> Tensor:
        index = torch.tensor(rows, device=out.device)
        self._state.rows = index  # what `call_argument()` slices call arguments to
        try:
            return out.index_copy(0, index, fn(x.index_select(0, index), out.index_select(0, index)))
        finally:
            self._state.rows = None

    def _rows_one_adapter(self, name: str, rows: list[int], x: Tensor, out: Tensor, args: tuple,
                          kwargs: dict) -> Tensor:
        adapter = self.adapters[name]

        def run(xr: Tensor, base_out: Tensor) -> Tensor:
            if adapter.transforms_input:
                xr = adapter.transform_input(xr, self.base_layer)
                base_out = self.base_layer(xr, *args, **kwargs)
            return adapter(xr, base_out, self.base_layer)

        return self._on_rows(rows, out, run, x)

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
