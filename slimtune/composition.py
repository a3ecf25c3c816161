"""Composition blocks: how several adapters of one model combine, as the active setup.

    model.use(st.Stack("lang", "task"))          # out = task(x, lang(x, base(x)))   (= use(["lang", "task"]))
    model.use(st.Average("a", "b", weights=[0.7, 0.3]))   # out = 0.7 a(x, base(x)) + 0.3 b(x, base(x))
    model.use(st.Parallel("a", "b"))             # the batch runs once per child: output rows [a's B, b's B]
    model.use(st.Split("a", "b", splits=16))     # positions < 16 through a, the rest through b
    model.use(st.Fuse("a", "b", fusion="ab"))    # AdapterFusion: attention over the children's outputs

Blocks nest (`Stack("lang", Fuse("a", "b", fusion="f"))`, `Average(Stack("a", "b"), "c")`); `Parallel`
may appear at the top or inside a `Stack` (it is distributed out: `Stack(a, Parallel(b, c))` is
`Parallel(Stack(a, b), Stack(a, c))`). Per wrapped layer a block is an output transform
`f(x, base_out)`; a child absent from a layer leaves it unchanged there. AdapterHub's blocks of the
same names are the model (Pfeiffer et al. 2020, "AdapterHub", arXiv:2007.07779; Pfeiffer et al. 2021,
"AdapterFusion", arXiv:2005.00247). The engine evaluates blocks without knowing any method: `Fuse`
hands the children's deltas to the fusion adapter's `fuse()` hook. See docs/composition.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from slimtune.errors import ConfigError


@dataclass(frozen=True, init=False)
class Block:
    """A composition of adapters (names) and nested blocks."""

    children: tuple

    def __init__(self, *children: str | Block) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise ConfigError(f"{type(self).__name__}() needs at least one adapter name or block")
        for child in children:
            if not isinstance(child, (str, Block)):
                raise ConfigError(f"{type(self).__name__}: child {child!r} is neither an adapter name nor a block")
        object.__setattr__(self, "children", tuple(children))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{self._extra()})"

    def _extra(self) -> str:
        return ""


class Stack(Block):
    """Children applied in sequence, each on the previous one's output: `out = c_k(x, ... c_1(x, base(x)))`."""


class Parallel(Block):
    """The batch runs once per child (the model's output has len(children) x batch rows, child by child)."""


@dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """Weighted mean of the children's outputs: `out = Σ w_i c_i(x, base(x))` (weights default to 1/n and
    need not sum to 1; for additive methods this is `base + Σ w_i Δ_i` when they do)."""

    weights: tuple

    def __init__(self, *children: str | Block, weights: list[float] | None = None) -> None:
        super().__init__(*children)
        n = len(self.children)
        weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise ConfigError(f"Average: {len(weights)} weights for {n} children; expected one weight per child")
        object.__setattr__(self, "weights", tuple(weights))

    def _extra(self) -> str:
        return f", weights={list(self.weights)}"


@dataclass(frozen=True, init=False, repr=False)
class Split(Block):
    """Sequence positions split between children: child i sees `splits[i]` positions, the last child the
    rest (`splits` an int: that many for every child but the last). Positions are those of each call,
    so a split does not follow a key/value cache through `generate()`."""

    splits: tuple

    def __init__(self, *children: str | Block, splits: int | list[int]) -> None:
        super().__init__(*children)
        n = len(self.children)
        if n < 2:
            raise ConfigError("Split needs at least two children")
        sizes = [splits] * (n - 1) if isinstance(splits, int) else list(splits)
        if len(sizes) != n - 1 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ConfigError(f"Split: splits={splits!r}: expected {n - 1} positive int(s), the positions "
                              "of every child but the last (which takes the rest)")
        object.__setattr__(self, "splits", tuple(sizes))

    def _extra(self) -> str:
        return f", splits={list(self.splits)}"


@dataclass(frozen=True, init=False, repr=False)
class Fuse(Block):
    """AdapterFusion: the fusion adapter `fusion` combines the children's deltas per layer
    (`fuse(x, base_out, deltas)`). `fusion=None`: the one attached fusion adapter."""

    fusion: str | None

    def __init__(self, *children: str | Block, fusion: str | None = None) -> None:
        super().__init__(*children)
        object.__setattr__(self, "fusion", fusion)

    def _extra(self) -> str:
        return f", fusion={self.fusion!r}"


def leaves(node: str | Block) -> list[str]:
    """Adapter names in a setup, in order, without repeats (a Fuse's fusion adapter included)."""
    if isinstance(node, str):
        return [node]
    out = [n for child in node.children for n in leaves(child)]
    if isinstance(node, Fuse) and node.fusion is not None:
        out.append(node.fusion)
    return list(dict.fromkeys(out))


def fused_children(node: str | Block) -> list[str]:
    """Adapters under a Fuse anywhere in the setup (frozen by default while the fusion trains)."""
    if isinstance(node, str):
        return []
    own = [n for c in node.children for n in leaves(c)] if isinstance(node, Fuse) else []
    return list(dict.fromkeys(own + [n for c in node.children for n in fused_children(c)]))


def normalize(node: str | Block) -> str | Block:
    """Distribute Parallel out of Stacks, flatten nested Stacks; Parallel elsewhere is refused."""
    if isinstance(node, str):
        return node
    kids = [normalize(c) for c in node.children]
    if isinstance(node, Parallel):
        return Parallel(*[g for k in kids for g in (k.children if isinstance(k, Parallel) else (k,))])
    if isinstance(node, Stack):
        flat = [g for k in kids for g in (k.children if isinstance(k, Stack) else (k,))]
        for i, k in enumerate(flat):
            if isinstance(k, Parallel):
                return normalize(Parallel(*[Stack(*flat[:i], c, *flat[i + 1:]) for c in k.children]))
        return flat[0] if len(flat) == 1 else Stack(*flat)
    for k in kids:
        if isinstance(k, Parallel):
            raise ConfigError(f"{type(node).__name__}: a Parallel block may only be the setup itself or inside a "
                              f"Stack, not inside {type(node).__name__}")
    return _rebuild(node, kids)


def _rebuild(node: Block, kids: list) -> Block:
    if isinstance(node, Average):
        return Average(*kids, weights=list(node.weights))
    if isinstance(node, Split):
        return Split(*kids, splits=list(node.splits))
    if isinstance(node, Fuse):
        return Fuse(*kids, fusion=node.fusion)
    return type(node)(*kids)


def flat_names(node: str | Block) -> list[str] | None:
    """The plain active list a setup is equivalent to (a name, or a Stack of names), else None."""
    if isinstance(node, str):
        return [node]
    if type(node) is Stack and all(isinstance(c, str) for c in node.children):
        return list(node.children)
    return None


def walk(node: str | Block) -> Iterator[Block]:
    if isinstance(node, Block):
        yield node
        for child in node.children:
            yield from walk(child)


# -- evaluation per wrapped layer ------------------------------------------------------------------
Leaf = Callable[[str, Tensor, Tensor], Tensor]  # (adapter name, x, out) -> out
Fuser = Callable[[str, Tensor, Tensor, list], Tensor]  # (fusion name, x, base_out, deltas) -> out


def apply(node: str | Block, x: Tensor, out: Tensor, leaf: Leaf, fuse: Fuser, present: Callable[[str], bool]
          ) -> Tensor:
    """The output of `node` at one layer, given its input and the output so far."""
    if isinstance(node, str):
        return leaf(node, x, out) if present(node) else out
    kids = node.children
    if isinstance(node, Stack):
        for child in kids:
            out = apply(child, x, out, leaf, fuse, present)
        return out
    if isinstance(node, Average):
        return sum(w * apply(c, x, out, leaf, fuse, present) for c, w in zip(kids, node.weights, strict=True))
    if isinstance(node, Split):
        return _split(node, x, out, leaf, fuse, present)
    if isinstance(node, Fuse):
        live = [c for c in kids if any(present(n) for n in leaves(c))]
        if not live or node.fusion is None or not present(node.fusion):
            return out
        return fuse(node.fusion, x, out, [apply(c, x, out, leaf, fuse, present) - out for c in live])
    raise ConfigError(f"{type(node).__name__} cannot be evaluated inside a layer (Parallel is resolved per row)")


def _split(node: Split, x: Tensor, out: Tensor, leaf: Leaf, fuse: Fuser, present: Callable[[str], bool]) -> Tensor:
    if x.dim() < 3 or out.dim() < 3:
        raise ConfigError(f"Split needs (batch, positions, features) tensors; this layer sees {tuple(x.shape)}")
    parts, start = [], 0
    for child, size in zip(node.children, (*node.splits, None), strict=True):
        stop = x.shape[1] if size is None else min(start + size, x.shape[1])
        if stop > start:
            parts.append(apply(child, x[:, start:stop], out[:, start:stop], leaf, fuse, present))
        start = stop
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


# -- Parallel: the batch once per child --------------------------------------------------------------
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "attention_mask")


def repeat_batch(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict, int]:
    """Every tensor with the batch's rows repeated n times along dim 0 (copy after copy); the row count."""
    first = args[0] if args and isinstance(args[0], Tensor) else next(
        (kwargs[k] for k in _BATCH_KEYS if isinstance(kwargs.get(k), Tensor)),
        next((v for v in kwargs.values() if isinstance(v, Tensor) and v.dim() > 0), None))
    if first is None:
        return args, kwargs, 0
    rows = first.shape[0]
    if kwargs.get("past_key_values") is not None:
        raise NotImplementedError("Parallel with past_key_values: start from the input ids (generate() repeats them)")

    def rep(v):
        return v.repeat(n, *[1] * (v.dim() - 1)) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows else v

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}, rows
