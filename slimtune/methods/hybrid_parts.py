"""The modules of a hybrid adapter (hybrid.py): its parts' modules, composed.

- `Chain`: the layer adapters of the parts wrapping one module, applied in part order exactly as the
  engine applies several active adapters (input transforms composed, then `out = part(x, out)` in turn);
  with gates, each part's change is scaled by its gate: out + g(x) * (part(x, out) - out).
- `HybridShared`: each part's shared module (VeRA's projections, Compacter's slow matrices) and which
  modules each part wraps.
- `HybridInput`: the parts' input adapters, prepared in order and finished in reverse.
- `GatedPrefix`: UniPELT's gate on a prefix-tuning part: each layer's prefix keys and values scaled by
  sigmoid(W_l h + b_l) averaged over the real tokens of the call (h: the attention input of layer l).

Gates (UniPELT, Mao et al. 2022, arXiv:2110.07577): a Linear(d_in, 1) per gated part and module (d_in: the
wrapped module's input), a Linear(d, 2) per layer for a prefix (key gate, value gate); weights N(0, 0.02)
and biases 0 (AdapterHub's init), so every gate starts near sigmoid(0) = 0.5.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.methods.base import InputAdapter, LayerAdapter, factory
from slimtune.methods.prefix_tuning import KVPrefix, _backbone
from slimtune.methods.prompt_tuning import _first, _text_config

GATE_STD = 0.02


def new_gate(d_in: int, outputs: int, **kw: Any) -> nn.Linear:
    """A gate's Linear(d_in, outputs): weight N(0, 0.02), bias 0 (sigmoid starts near 0.5)."""
    gate = nn.Linear(d_in, outputs, **kw)
    with torch.no_grad():
        gate.weight.normal_(0.0, GATE_STD)
        gate.bias.zero_()
    return gate


def freeze_into_buffers(part: LayerAdapter) -> list[str]:
    """Turn the parameters `part.frozen` names into buffers (same names and values); returns their names.

    The engine freezes a layer adapter's tensors by their first name segment (`Chain` sees only "parts");
    a tensor that never trains is a buffer just as well, so the part's LoRA-FA A stays frozen in a chain.
    """
    names = [n for n, _ in part.named_parameters() if n.split(".")[0] in part.frozen]
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = part.get_submodule(owner_name) if owner_name else part
        p = owner._parameters.pop(leaf)
        owner.register_buffer(leaf, p.detach())
    return names


class _PartKeys(Mapping):
    """On-disk suffixes of a chain's tensors: 'parts.<i>.<name>' through part i's own `peft_keys`."""

    def __init__(self, parts: nn.ModuleDict) -> None:
        self._parts = parts

    def get(self, key: str, default: Any = None) -> Any:
        head, i, rest = (key.split(".", 2) + ["", ""])[:3]
        if head != "parts" or i not in self._parts:
            return default
        return f"parts.{i}.{self._parts[i].peft_keys.get(rest, rest)}"

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


class Chain(LayerAdapter):
    """The layer adapters of a hybrid's parts on one module, in part order (keys: the part indices)."""

    def __init__(self, parts: dict[int, LayerAdapter], gates: dict[int, nn.Linear] | None = None) -> None:
        super().__init__()
        self._buffered = {str(i): freeze_into_buffers(p) for i, p in parts.items()}  # saved like parameters
        self.parts = nn.ModuleDict({str(i): p for i, p in parts.items()})
        self.gates = nn.ModuleDict({str(i): g for i, g in gates.items()}) if gates else None
        self.transforms_input = any(p.transforms_input for p in parts.values())
        self.changes_base = any(p.changes_base for p in parts.values())
        self.peft_keys = _PartKeys(self.parts)

    def gate(self, key: str, x: Tensor) -> Tensor:
        """Part `key`'s gate on input x: sigmoid(W x + b), (..., 1)."""
        g = self.gates[key]
        return torch.sigmoid(g(x.to(g.weight.dtype)))

    def _mix(self, key: str, x: Tensor, old: Tensor, new: Tensor) -> Tensor:
        if self.gates is None:
            return new
        return old + self.gate(key, x).to(old.dtype) * (new - old)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        out = base_out
        for key, part in self.parts.items():
            out = self._mix(key, x, out, part(x, out, base))
        return out

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        for key, part in self.parts.items():
            if part.transforms_input:
                x = self._mix(key, x, x, part.transform_input(x, base))
        return x

    def inactive_forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        for part in self.parts.values():
            if part.changes_base:
                base_out = part.inactive_forward(x, base_out, base)
        return base_out

    # -- merging: the engine's order for adapters on one layer (input-side ones last, reversed) -------------
    def _merge_order(self) -> list[LayerAdapter]:
        parts = list(self.parts.values())
        return [p for p in parts if not p.transforms_input] + [p for p in parts if p.transforms_input][::-1]

    def delta_weight(self, base: nn.Module) -> Tensor:
        return sum(p.delta_weight(base) for p in self.parts.values())

    def prepare_merge(self, base: nn.Module) -> None:
        for part in self.parts.values():
            part.prepare_merge(base)

    def merge(self, base: nn.Module) -> None:
        for part in self._merge_order():
            part.merge(base)

    def unmerge(self, base: nn.Module) -> None:
        for part in reversed(self._merge_order()):
            part.unmerge(base)

    def install(self, base: nn.Module) -> None:
        for part in self.parts.values():
            part.install(base)

    def release(self, base: nn.Module) -> None:
        for part in reversed(list(self.parts.values())):
            part.release(base)

    def export_tensors(self) -> dict[str, Tensor]:
        out = {}
        for key, part in self.parts.items():
            tensors = part.export_tensors()
            for name in self._buffered[key]:  # a part exporting its parameters would miss the ones made buffers
                tensors.setdefault(name, part.get_buffer(name))
            out.update({f"parts.{key}.{n}": t for n, t in tensors.items()})
        if self.gates is not None:
            out.update({f"gates.{n}": t for n, t in self.gates.state_dict(keep_vars=True).items()})
        return out


class HybridShared(nn.Module):
    """Per part: its shared module (saved as 'shared.<i>.<name>'), the modules it wraps, the base tensors it selects."""

    def __init__(self, shared: dict[int, nn.Module | None], targets: list[list[str]],
                 selected: list[set[str]]) -> None:
        super().__init__()
        self.shared = nn.ModuleDict({str(i): m for i, m in shared.items() if m is not None})
        self.targets = [set(t) for t in targets]
        self.selected = selected  # filled by HybridMethod.select, which runs after build_shared

    def part(self, i: int) -> nn.Module | None:
        return self.shared[str(i)] if str(i) in self.shared else None


class HybridInput(InputAdapter):
    """The parts' input adapters: prepare in part order, finish in reverse (as the engine runs active ones)."""

    def __init__(self, parts: dict[int, InputAdapter], keys: dict[int, dict[str, str]]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({str(i): p for i, p in parts.items()})
        self._keys = {str(i): k for i, k in keys.items()}  # each part method's tensor_keys

    def attach(self, model: nn.Module) -> None:
        for part in self.parts.values():
            part.attach(model)

    def detach(self, model: nn.Module) -> None:
        for part in reversed(list(self.parts.values())):
            part.detach(model)

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        for part in self.parts.values():
            kwargs = part.prepare(kwargs, rows)
        return kwargs

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        for part in reversed(list(self.parts.values())):
            output = part.finish(output, kwargs)
        return output

    def prepare_generate(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        for part in self.parts.values():
            kwargs = part.prepare_generate(kwargs, rows)
        return kwargs

    def finish_generate(self, output: Any) -> Any:
        for part in reversed(list(self.parts.values())):
            output = part.finish_generate(output)
        return output

    def end_call(self) -> None:
        for part in self.parts.values():
            part.end_call()

    def export_tensors(self) -> dict[str, Tensor]:
        return {f"parts.{i}.{self._keys[i].get(n, n)}": t
                for i, part in self.parts.items() for n, t in part.export_tensors().items()}


def cache_attention(model: nn.Module) -> list[str]:
    """Names of the attention modules that write the KV cache, by layer index (those with `layer_idx` whose
    forward takes the cache; the innermost where several do)."""
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and _cache_param(module) is not None:
            if idx not in found or len(name) > len(found[idx]):
                found[idx] = name
    return [found[i] for i in sorted(found)]


def _cache_param(module: nn.Module) -> str | None:
    names = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in names), None)


class GatedPrefix(InputAdapter):
    """A prefix-tuning adapter whose per-layer keys and values are scaled by learned gates (UniPELT).

    Layer l's gate pair (g_k, g_v) = mean over the call's real tokens of sigmoid(W_l h + b_l), h the
    attention input; applied once to the prefix part of the cache the prefix adapter filled, when layer l
    first runs with it. A later call continuing that cache (generation) keeps the gates of the first call.
    """

    def __init__(self, prefix: KVPrefix, model: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        layers = cache_attention(model)
        if len(layers) != prefix.kv.layers:
            raise NotImplementedError(f"gated prefix: found {len(layers)} attention modules that write the KV "
                                      f"cache (with layer_idx), expected {prefix.kv.layers}")
        self._names = layers
        d = _first(_text_config(model), "hidden_size", "n_embd", "d_model")
        kw = {"dtype": prefix.embedding.dtype, "device": prefix.embedding.device}
        self.gates = nn.ModuleList([new_gate(d, 2, **kw) for _ in layers])
        self._mask: Tensor | None = None
        self._gated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> layers gated
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        self.prefix.attach(model)  # its hook first: ours sees the mask it extended
        self._handles = [_backbone(model).register_forward_pre_hook(self._record_mask, with_kwargs=True)]
        for name in self._names:
            module = model.get_submodule(name)
            params = list(inspect.signature(module.forward).parameters)
            hook = lambda m, a, k, p=params: self._gate_layer(m, a, k, p)  # noqa: E731
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.prefix.detach(model)

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        return self.prefix.prepare(kwargs, rows)

    def prepare_generate(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        return self.prefix.prepare_generate(kwargs, rows)

    def end_call(self) -> None:
        self.prefix.end_call()
        self._mask = None

    def export_tensors(self) -> dict[str, Tensor]:
        gates = {f"gates.{n}": t for n, t in self.gates.state_dict(keep_vars=True).items()}
        return {**self.prefix.export_tensors(), **gates}

    # -- hooks ---------------------------------------------------------------------------------------------
    def _record_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.prefix._armed:
            mask = kwargs.get("attention_mask")
            self._mask = mask[:, self.prefix.p:] if mask is not None and mask.dim() == 2 else None

    def _gate_layer(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], params: list[str]) -> None:
        if not self.prefix._armed:
            return
        call = {**dict(zip(params, args, strict=False)), **kwargs}
        cache = call.get("cache", call.get("past_key_values"))
        if cache is None or cache not in self.prefix._filled:
            return
        done = self._gated.setdefault(cache, set())
        if module.layer_idx not in done:
            done.add(module.layer_idx)
            self._scale(cache, module.layer_idx, call["hidden_states"])

    def gate_values(self, layer: int, hidden: Tensor) -> Tensor:
        """(batch, 2): layer `layer`'s key and value gates for attention inputs `hidden` (batch, s, d)."""
        gate = self.gates[layer]
        g = torch.sigmoid(gate(hidden.to(gate.weight.dtype)))  # (batch, s, 2)
        if self._mask is None:
            return g.mean(1)
        real = self._mask[:, -hidden.shape[1]:].to(g.dtype).unsqueeze(-1)  # (batch, s, 1): the call's real tokens
        return (g * real).sum(1) / real.sum(1).clamp(min=1)

    def _scale(self, cache: Any, layer: int, hidden: Tensor) -> None:
        try:
            kv = cache.layers[layer]
            keys, values = kv.keys, kv.values  # (batch, H_kv, p + past, d_head)
        except (AttributeError, IndexError):
            raise NotImplementedError(f"gated prefix: {type(cache).__name__} has no per-layer keys/values "
                                      "(cache.layers[i].keys) to scale") from None
        g = self.gate_values(layer, hidden)
        p = self.prefix.p
        g_k, g_v = (g[:, j].view(-1, 1, 1, 1) for j in (0, 1))
        kv.keys = torch.cat([keys[:, :, :p] * g_k.to(keys.dtype), keys[:, :, p:]], dim=2)
        kv.values = torch.cat([values[:, :, :p] * g_v.to(values.dtype), values[:, :, p:]], dim=2)


def layer_gate(base: nn.Module) -> nn.Linear:
    """A part's gate on one wrapped module: Linear(d_in, 1) on the module's input."""
    return new_gate(kind_of(base).sizes(base)[0], 1, **factory(base))


__all__ = ["Chain", "GatedPrefix", "HybridInput", "HybridShared", "cache_attention", "layer_gate", "new_gate"]
