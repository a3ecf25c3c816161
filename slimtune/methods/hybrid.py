"""Hybrids by composition: one adapter made of parts, each a method config of its own.

    HybridConfig(parts=[LoraConfig(targets=["q_proj"]), IA3Config(targets=["q_proj"])])
    HybridConfig.unipelt()   # gated bottleneck adapter + prefix tuning + LoRA on q, v (Mao et al. 2022)
    HybridConfig.mam()       # prefix tuning + scaled parallel adapter on the FFN (He et al. 2022)

A hybrid computes what its parts compute when attached as separate adapters and active together, in part
order: on a module several parts wrap, y = part_k(x, ... part_1(x, base(x'))) with x' the input after
every part's input transform; input parts prepare the call in order and finish it in reverse; selections
add up. Each part keeps its own targets, init, shared state, hooks (`attached`), per-step work, regulariser
and saved config (AdapterHub's ConfigUnion, STYLE.md §4). Mergeable when every part is and there are no gates.

Gates (UniPELT, arXiv:2110.07577; hybrid_parts.py): gates=True scales each part's change on each module by
a learned g = sigmoid(W x + b) (x: the module's input; one Linear(d_in, 1) per part per module), so a part
can be switched off per input: y = out + g * (part(x, out) - out). A prefix-tuning part gets UniPELT's gate
pair per layer on its keys and values. Other input parts and selections cannot be gated: refused.
Params: the sum of the parts', + (d_in + 1) per gated part per module, + 2(d + 1) per layer for a gated prefix.
Files: our format only ('parts.<i>.' before each part's tensor names; HF PEFT has no format for a union).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from slimtune.adapter_files import canonical
from slimtune.bases import FfnBlockKind, kind_of
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.adapters import BottleneckConfig
from slimtune.methods.base import METHODS, AdapterView, InputAdapter, LayerAdapter, Method, Selection, register
from slimtune.methods.hybrid_parts import Chain, GatedPrefix, HybridInput, HybridShared, layer_gate
from slimtune.methods.lora import LoraConfig
from slimtune.methods.prefix_tuning import KVPrefix, PrefixTuningConfig

QV = r".*\.(?:q_proj|v_proj|query|value|c_attn)"  # attention query and value projections (GPT-2: fused c_attn)


@dataclass
class HybridConfig(MethodConfig):
    """An adapter made of parts (any method configs, each with its own targets).

    Args:
        parts: method configs, or dicts with a 'method' key (YAML / JSON); nested hybrids with the same
            `gates` are flattened into this one.
        gates: UniPELT's learned gates on every part (layer parts and prefix tuning).
    `modules_to_save` belongs to the hybrid (a classifier head trained in full), not to its parts;
    `targets`, `exclude` and `layers` belong to the parts.
    """

    #: the module this copy was resolved for (not a field: never saved)
    target: ClassVar[str | None] = None

    parts: list[Any] = field(default_factory=list)
    gates: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: each part names its own modules")
        check_field(isinstance(self.gates, bool), self, "gates", "True or False")
        check_field(isinstance(self.parts, (list, tuple)) and len(self.parts) > 0, self, "parts",
                    "a non-empty list of method configs (or dicts with a 'method' key)")
        self.parts = self._flatten([_as_config(i, p) for i, p in enumerate(self.parts)])
        for i, part in enumerate(self.parts):
            _check_part(i, part)
        _refuse_shared_inputs(self.parts)

    def _flatten(self, parts: list[MethodConfig]) -> list[MethodConfig]:
        out = []
        for i, part in enumerate(parts):
            if isinstance(part, HybridConfig):
                if part.gates != self.gates or part.modules_to_save:
                    raise ConfigError(f"HybridConfig.parts[{i}] is a hybrid with gates={part.gates}"
                                      f"{' and modules_to_save' if part.modules_to_save else ''}: expected its "
                                      f"parts listed here directly (this hybrid has gates={self.gates})")
                out.extend(part.parts)
            else:
                out.append(part)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "parts": [p.to_dict() for p in self.parts]}

    def resolve(self, module_name: str) -> HybridConfig:
        """This config, knowing the module it is built on (each part resolves its own)."""
        resolved = copy.copy(self)
        resolved.target = module_name
        return resolved

    @classmethod
    def unipelt(cls, prefix: PrefixTuningConfig | None = None, adapter: BottleneckConfig | None = None,
                lora: LoraConfig | None = None, **fields: Any) -> HybridConfig:
        """UniPELT (Mao et al. 2022): gated prefix (10 tokens), bottleneck adapter after the FFN (d/16, AdapterHub
        SeqBn) and LoRA (r=8, alpha=2) on the query and value projections, as AdapterHub's UniPELTConfig."""
        parts = [prefix or PrefixTuningConfig(num_virtual_tokens=10), adapter or BottleneckConfig.pfeiffer(),
                 lora or LoraConfig(r=8, alpha=2, targets=QV)]
        return cls(**{"parts": parts, "gates": True, **fields})

    @classmethod
    def mam(cls, prefix: PrefixTuningConfig | None = None, adapter: BottleneckConfig | None = None,
            **fields: Any) -> HybridConfig:
        """MAM adapter (He et al. 2022): prefix tuning (30 tokens) + parallel adapter beside the FFN (d/2, s = 4)."""
        parts = [prefix or PrefixTuningConfig(num_virtual_tokens=30), adapter or BottleneckConfig.parallel()]
        return cls(**{"parts": parts, **fields})


def _as_config(i: int, part: Any) -> MethodConfig:
    if isinstance(part, MethodConfig):
        return part
    if not isinstance(part, dict):
        raise ConfigError(f"HybridConfig.parts[{i}]={part!r}: expected a method config or a dict with a 'method' key")
    try:
        return config_from_dict(part)
    except ConfigError as e:
        raise ConfigError(f"HybridConfig.parts[{i}]: {e}") from None


def _check_part(i: int, part: MethodConfig) -> None:
    if part.method not in METHODS:
        raise ConfigError(f"HybridConfig.parts[{i}]: {type(part).__name__} is not a registered method config")
    method = METHODS[part.method].method
    if part.modules_to_save:
        raise ConfigError(f"HybridConfig.parts[{i}] ({part.method}).modules_to_save={part.modules_to_save!r}: "
                          "expected None; give modules_to_save on the HybridConfig itself")
    if method.changes_trainable:
        raise ConfigError(f"HybridConfig.parts[{i}] ({part.method}) changes what trains while training (tensors "
                          "frozen or left without gradient in a step), which the engine tracks per adapter, not per "
                          "part; use it as an adapter of its own")


def _refuse_shared_inputs(parts: list[MethodConfig]) -> None:
    """Two input parts of one method would fight over one model input (two prefixes filling one KV cache)."""
    seen: dict[str, int] = {}
    for i, part in enumerate(parts):
        if METHODS[part.method].shape != "input":
            continue
        if part.method in seen:
            raise ConfigError(f"HybridConfig.parts[{seen[part.method]}] and parts[{i}] are both {part.method}: "
                              "two input parts of one method cannot share a model call (one KV cache, one "
                              "embedding hook); use one part with more virtual tokens")
        seen[part.method] = i


class Plan(list):
    """find_targets' answer: the union of the parts' targets, plus each part's own (the engine hands this same
    list to build_shared and select)."""

    def __init__(self, per_part: list[list[str]]) -> None:
        super().__init__(dict.fromkeys(n for names in per_part for n in names))
        self.per_part = per_part
        self.selected: list[set[str]] = [set() for _ in per_part]


def _method(part: MethodConfig) -> Method:
    return METHODS[part.method].method


@register
class HybridMethod(Method):
    name, config, shape = "hybrid", HybridConfig, "layer"
    category, paper = "hybrid", "arXiv:2110.07577 (UniPELT), arXiv:2110.04366 (MAM)"
    params = "sum of the parts' (+ d_in+1 per gated part and module, 2*(d+1) per layer for a gated prefix)"
    mergeable = False  # is_mergeable asks the parts

    # -- attaching ------------------------------------------------------------------------------------------
    def find_targets(self, model: nn.Module, cfg: HybridConfig, skip: set[str]) -> Plan:
        plan = Plan([_method(p).find_targets(model, p, skip) for p in cfg.parts])
        names = set(plan)
        for name in plan:
            levels = name.split(".")
            outer = next((o for o in (".".join(levels[:k]) for k in range(1, len(levels))) if o in names), None)
            if outer is not None:
                raise ConfigError(f"HybridConfig: {outer} and {name}, inside it, are both targets of parts; "
                                  "a wrapped module's inner modules cannot be wrapped too")
        return plan

    def call_arguments_of(self, cfg: HybridConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for p in cfg.parts for a in _method(p).call_arguments_of(p)))

    def is_mergeable(self, cfg: HybridConfig) -> bool:
        return not cfg.gates and all(_method(p).is_mergeable(p) for p in cfg.parts)

    def build_shared(self, model: nn.Module, cfg: HybridConfig, targets: list[str], init: bool = True
                     ) -> HybridShared:
        plan = targets if isinstance(targets, Plan) else Plan(
            [[t for t in _method(p).find_targets(model, p, set()) if t in targets] for p in cfg.parts])
        shared = {i: _method(p).build_shared(model, p, plan.per_part[i], init) for i, p in enumerate(cfg.parts)}
        return HybridShared(shared, plan.per_part, plan.selected)

    def build_layer(self, base: nn.Module, cfg: HybridConfig, init: bool = True,
                    shared: nn.Module | None = None) -> Chain:
        parts, gates = {}, {}
        for i, part in enumerate(cfg.parts):
            if cfg.target in shared.targets[i]:
                parts[i] = _build_part(i, part, base, cfg.target, init, shared.part(i))
                if cfg.gates:
                    gates[i] = _gate_for(i, part, base)
        return Chain(parts, gates or None)

    def build_input(self, model: nn.Module, cfg: HybridConfig, init: bool = True) -> HybridInput | None:
        inputs: dict[int, InputAdapter] = {}
        for i, part in enumerate(cfg.parts):
            adapter = _method(part).build_input(model, part, init)
            if adapter is not None:
                inputs[i] = _gated_input(i, part, adapter, model) if cfg.gates else adapter
        keys = {i: _method(cfg.parts[i]).tensor_keys for i in inputs}
        return HybridInput(inputs, keys) if inputs else None

    def select(self, model: nn.Module, cfg: HybridConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        data = list(data) if data is not None else None  # every part may read it
        per_part = targets.per_part if isinstance(targets, Plan) else [list(targets)] * len(cfg.parts)
        out: list[Selection] = []
        owner: dict[str, int] = {}
        for i, part in enumerate(cfg.parts):
            chosen = _select_part(i, part, model, per_part[i], init, data, cfg.gates)
            for sel in chosen:
                key = canonical(sel.name)
                if key in owner:
                    raise ConfigError(f"HybridConfig.parts[{owner[key]}] and parts[{i}] both train base tensor "
                                      f"{sel.name!r}; let one part train it")
                owner[key] = i
            if isinstance(targets, Plan):
                targets.selected[i].update(canonical(s.name) for s in chosen)
            out.extend(chosen)
        return out

    # -- files ----------------------------------------------------------------------------------------------
    def saved_config(self, cfg: HybridConfig, adapter: AdapterView) -> HybridConfig:
        parts = [_method(p).saved_config(p, part_view(adapter, i)) for i, p in enumerate(cfg.parts)]
        return cfg.replace(parts=parts)

    def to_peft(self, cfg: HybridConfig, ctx: Any) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for a hybrid: HF PEFT has no single-file format for a union of "
                                  "methods; save it with model.save(path, format='slimtune')")

    def attached(self, adapter: AdapterView, cfg: HybridConfig) -> None:
        for i, part in enumerate(cfg.parts):
            if METHODS[part.method].has_attached:
                _method(part).attached(part_view(adapter, i), part)

    # -- training -------------------------------------------------------------------------------------------
    def step(self, adapter: AdapterView, cfg: HybridConfig, global_step: int, optimizer: Any) -> None:
        for i, part in enumerate(cfg.parts):
            if METHODS[part.method].has_step:
                _method(part).step(part_view(adapter, i), part, global_step, optimizer)

    def regularizer(self, adapter: AdapterView, cfg: HybridConfig) -> Tensor | None:
        terms = [_method(p).regularizer(part_view(adapter, i), p) for i, p in enumerate(cfg.parts)
                 if METHODS[p.method].has_regularizer]
        terms = [t.reshape(()) for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def describe(self, adapter: AdapterView, cfg: HybridConfig) -> str:
        lines = [f"{i}: {p.method}" + _part_detail(adapter, i, p) for i, p in enumerate(cfg.parts)]
        return "parts " + "; ".join(lines) + ("; gated" if cfg.gates else "")


def _build_part(i: int, part: MethodConfig, base: nn.Module, target: str, init: bool,
                shared: nn.Module | None) -> LayerAdapter:
    method = _method(part)
    if method.linear_only and not kind_of(base).linear:
        raise NotImplementedError(f"part {i} ({part.method}) adapts linear layers only")
    try:
        return method.build_layer(base, part.resolve(target), init, shared)
    except NotImplementedError as e:
        raise NotImplementedError(f"part {i} ({part.method}): {e}") from None
    except Exception as e:
        raise ValueError(f"part {i} ({part.method}): {e}") from e


def _gate_for(i: int, part: MethodConfig, base: nn.Module) -> nn.Linear:
    kind = kind_of(base)
    if not (kind.linear or isinstance(kind, FfnBlockKind)):
        raise NotImplementedError(f"part {i} ({part.method}): gates read the last dimension of the module input "
                                  f"(Linear, Conv1D, FFN blocks); {type(base).__name__} has none")
    return layer_gate(base)


def _gated_input(i: int, part: MethodConfig, adapter: InputAdapter, model: nn.Module) -> InputAdapter:
    if not isinstance(adapter, KVPrefix):
        raise ConfigError(f"HybridConfig(gates=True).parts[{i}] ({part.method}): only layer parts and prefix tuning "
                          "can be gated; put this part in an adapter of its own")
    return GatedPrefix(adapter, model)


def _select_part(i: int, part: MethodConfig, model: nn.Module, targets: list[str], init: bool,
                 data: list[dict] | None, gates: bool) -> list[Selection]:
    method = _method(part)
    if method.needs_data and init and data is None:
        raise ConfigError(f"HybridConfig.parts[{i}] ({part.method}) chooses what to train from gradients: pass "
                          "calibration batches, st.attach(model, config, data=batches)")
    chosen = method.select(model, part, targets, init, data)
    if chosen and gates:
        raise ConfigError(f"HybridConfig(gates=True).parts[{i}] ({part.method}) trains base tensors, which cannot "
                          "be gated per input; put it in an adapter of its own or use gates=False")
    return chosen


def part_view(adapter: AdapterView, i: int) -> AdapterView:
    """Adapter `adapter` narrowed to part i: its layer adapters, shared module, input adapter and selections."""
    key = str(i)
    layers = {n: c.parts[key] for n, c in adapter.layers.items() if isinstance(c, Chain) and key in c.parts}
    shared = adapter.shared if isinstance(adapter.shared, HybridShared) else None
    inputs = adapter.input.parts if isinstance(adapter.input, HybridInput) else {}
    inner = inputs[key] if key in inputs else None
    selected = shared.selected[i] if shared is not None else None
    selections = {n: e for n, e in adapter.selections.items() if selected is None or canonical(n) in selected}
    return AdapterView(adapter.name, layers, {n: adapter.bases[n] for n in layers},
                       shared.part(i) if shared is not None else None,
                       inner.prefix if isinstance(inner, GatedPrefix) else inner, selections)


def _part_detail(adapter: AdapterView, i: int, part: MethodConfig) -> str:
    if not METHODS[part.method].has_describe:
        return ""
    detail = _method(part).describe(part_view(adapter, i), part)
    return f" ({detail})" if detail else ""


__all__ = ["QV", "HybridConfig", "HybridMethod", "part_view"]
