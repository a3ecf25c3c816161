"""The base-layer registry: which modules the engine can wrap, and how to read and write their weight.

Every method sees a wrapped module through its `BaseKind`: its sizes, its dense weight in
(d_out, d_in, *kernel) layout, and whether a merge can write into it. Methods never test for
module types or transpose GPT-2's Conv1D themselves. A quantized Linear is one more kind: its
`weight()` dequantizes, its `write_weight()` re-quantizes (or it declares `mergeable = False`).

    kind = base_kind(module)                  # None when the module cannot be wrapped
    d_in, d_out = kind.sizes(module)
    W = kind.weight(module)                   # (d_out, d_in[, *kernel]); a view where possible
    kind.write_weight(module, W + delta)      # back into the module's own layout
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.selection import plain_class

try:  # GPT-2 style fan-in/fan-out linear: weight stored as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]


class BaseKind:
    """One family of wrappable modules. Subclass and `register_base()` it to support a new one."""

    name: str = ""
    types: tuple[type, ...] = ()
    linear: bool = False  # counted by targets="all-linear"
    mergeable: bool = True  # write_weight() keeps the module exact

    def matches(self, module: nn.Module) -> bool:
        return bool(self.types) and (type(module) in self.types or isinstance(module, self.types))

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out): input and output features (Embedding: vocabulary size, embedding dim)."""
        W = self.weight(module)
        return W.shape[1], W.shape[0]

    def weight(self, module: nn.Module) -> Tensor:
        """The dense weight in (d_out, d_in[, *kernel]) layout; a writable view for plain layers."""
        return module.weight

    def write_weight(self, module: nn.Module, value: Tensor) -> None:
        """Store `value` (layout of `weight()`) as the module's weight, in place."""
        target = self.weight(module)
        target.data.copy_(value.to(target.dtype))

    def matmul_weight(self, module: nn.Module) -> Tensor | None:
        """The (d_out, d_in) weight for a fused `x @ W.T` (None: no fused path for this kind)."""
        return None

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        """The floating dtype an adapter on this module should use (a quantized base's compute dtype)."""
        dtype = module.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device


class LinearKind(BaseKind):
    name, types, linear = "linear", (nn.Linear,), True

    def matmul_weight(self, module: nn.Module) -> Tensor | None:
        return module.weight if plain_class(module) is nn.Linear else None


class GPT2Conv1DKind(BaseKind):
    """transformers' Conv1D: a linear layer whose weight is stored transposed, (d_in, d_out)."""

    name, types, linear = "conv1d_gpt2", ((Conv1D,) if Conv1D is not None else ()), True

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.T

    def matmul_weight(self, module: nn.Module) -> Tensor | None:
        return module.weight.T


class EmbeddingKind(BaseKind):
    """nn.Embedding seen as a linear map from one-hot ids: (d_out, d_in) = (dim, vocabulary)."""

    name, types = "embedding", (nn.Embedding,)

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.T


class ConvKind(BaseKind):
    """nn.Conv1d / nn.Conv2d: weight (out_channels, in_channels / groups, *kernel)."""

    name, types = "conv", (nn.Conv1d, nn.Conv2d)

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels


class FfnBlockKind(BaseKind):
    """A transformer FFN block (LlamaMLP, GPT2MLP, ...: a class named "...MLP" holding linear layers).

    Lets an adapter see the block's input and output (parallel adapters). Sizes: d_in of its first linear
    layer, d_out of its last. No single weight, so nothing merges into it; once a block is wrapped, the
    linear layers inside it are not targets for adapters added later.
    """

    name, linear, mergeable = "ffn_block", False, False

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__.lower().endswith("mlp") and len(_linears(module)) >= 2

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        first, last = _linears(module)[0], _linears(module)[-1]
        return kind_of(first).sizes(first)[0], kind_of(last).sizes(last)[1]

    def weight(self, module: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(module).__name__} is an FFN block: it has no single weight to merge into")

    def write_weight(self, module: nn.Module, value: Tensor) -> None:
        self.weight(module)

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        first = _linears(module)[0]
        return kind_of(first).adapter_dtype(first)

    def device(self, module: nn.Module) -> torch.device:
        first = _linears(module)[0]
        return kind_of(first).device(first)


def _linears(module: nn.Module) -> list[nn.Module]:
    """The direct children of `module` that are linear layers (seen through wrappers), in order."""
    out = []
    for child in module.children():
        child = getattr(child, "base_layer", child)
        kind = base_kind(child)
        if kind is not None and kind.linear:
            out.append(child)
    return out


BASE_KINDS: list[BaseKind] = []


def register_base(kind: BaseKind, first: bool = False) -> BaseKind:
    """Add a kind of wrappable module; `first=True` lets it shadow a kind it subclasses (e.g. 4-bit Linear)."""
    BASE_KINDS.insert(0, kind) if first else BASE_KINDS.append(kind)
    return kind


for _kind in (LinearKind(), GPT2Conv1DKind(), EmbeddingKind(), ConvKind(), FfnBlockKind()):
    register_base(_kind)


def base_kind(module: nn.Module) -> BaseKind | None:
    """The registered kind of `module`, or None when the engine cannot wrap it."""
    for kind in BASE_KINDS:
        if kind.matches(module):
            return kind
    return None


def kind_of(module: nn.Module) -> BaseKind:
    """Like base_kind(), raising a clear TypeError for modules that cannot be wrapped."""
    kind = base_kind(module)
    if kind is None:
        names = ", ".join([t.__name__ for k in BASE_KINDS for t in k.types] + ["FFN blocks (classes named ...MLP)"])
        raise TypeError(f"cannot wrap {type(module).__name__}; wrappable modules: {names}")
    return kind


def sizes(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a wrappable module."""
    return kind_of(module).sizes(module)


def weight_2d(module: nn.Module) -> Tensor:
    """The dense weight flattened to (d_out, d_in * kernel): what SVD-based inits factor."""
    W = kind_of(module).weight(module)
    return W.reshape(W.shape[0], -1)


def add_to_weight(module: nn.Module, delta: Tensor, sign: float = 1.0) -> None:
    """W += sign * delta, with delta in (d_out, d_in[, *kernel]) or flattened (d_out, d_in * kernel) layout."""
    kind = kind_of(module)
    W = kind.weight(module)
    kind.write_weight(module, W + sign * delta.reshape(W.shape).to(W.dtype))
