"""Merging adapters into one LoRA: task arithmetic (negation for forgetting), TIES, DARE, magnitude
pruning, SVD re-compression, concatenation. Formulas: slimtune/multitask/merge_math.py, docs/merging.md.

    st.load(base, "out/topics", name="topics"); st.load(model, "out/sentiment", name="sentiment")
    st.merge_adapters(model, ["topics", "sentiment"], [1.0, 1.0], method="ties", density=0.2, name="both")
    model.use("both"); model.save("out/both", name="both")

The result is a LoRA adapter added to the model (not activated), s = 1 (alpha = r), as HF PEFT's
`add_weighted_adapter` builds it. For plain LoRA inputs every method equals PEFT's combination type of
the same name:
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" combine the A's and the B's separately,
  A with sign(w s) sqrt(|w s|), B with sqrt(|w s|) (all inputs of one rank; not the sum of the deltas);
- "cat" stacks [w_t s_t A_t] and [B_t]: exactly sum_t w_t s_t B_t A_t, at rank sum_t r_t;
- "svd" and the "*_svd" variants combine the dense deltas delta_W_t, then keep the top-`rank` SVD.
One LoRA alone is merged by "linear", whatever the method (as PEFT), unless an SVD method gets an explicit
rank: that re-compresses it. Any other mergeable adapter (IA3, DoRA, VeRA, LoHa, selective deltas...)
enters through its dense delta_W = W_merged - W0 per module, so only the SVD methods take it; rank="full"
keeps it exact. Bias deltas become the LoRA's `bias` option, `modules_to_save` copies merge tensor by tensor.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimtune.adapter_files import canonical
from slimtune.bases import base_kind, kind_of
from slimtune.errors import AdapterNameError, ConfigError, did_you_mean
from slimtune.layer import AdapterLayer, SavedModule, base_name
from slimtune.methods.base import METHODS, LayerAdapter
from slimtune.methods.lora import LoraConfig
from slimtune.multitask.merge_math import SIGN_METHODS, combine, svd_factors
from slimtune.selection import owner_and_attr, plain_class
from slimtune.tuned import TunedModel

FACTOR_METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MERGE_METHODS = FACTOR_METHODS + SVD_METHODS


@dataclass
class _Task:
    """One input adapter as task vectors. Module deltas are flat: (d_out, d_in * kernel)."""

    name: str
    weight: float
    lora: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)  # module -> (A, B, s)
    dense: dict[str, Tensor] = field(default_factory=dict)  # module -> delta_W of a non-LoRA adapter
    tensors: dict[str, Tensor] = field(default_factory=dict)  # base tensor name -> delta (biases, saved copies)

    def delta(self, module: str) -> Tensor:
        out = self.dense.get(module)
        if module in self.lora:
            A, B, s = self.lora[module]
            out = s * (B @ A) if out is None else out + s * (B @ A)
        return out

    @property
    def rank(self) -> int | None:
        return max((A.shape[0] for A, _, _ in self.lora.values()), default=None)


def merge_adapters(model: TunedModel, names: list[str], weights: list[float] | None = None, *,
                   method: str = "linear", density: float | None = None, majority_sign_method: str = "total",
                   rank: int | str | None = None, clamp: float | None = None, seed: int | None = None,
                   name: str = "merged") -> TunedModel:
    """Add adapter `name`: the merge of adapters `names` with `weights` (negative: subtract, to forget).

    Args:
        weights: one per adapter (default 1.0 each).
        method: one of MERGE_METHODS (module docstring; HF PEFT's combination types).
        density: fraction kept per tensor by ties / dare / magnitude_prune (and their _svd variants).
        majority_sign_method: TIES's sign election, "total" (mass) or "frequency" (count).
        rank: SVD methods: the rank kept (default: the largest input LoRA rank), or "full" (exact).
        clamp: SVD methods: clip the factors at this quantile of their entries (PEFT's svd_clamp).
        seed: DARE's random stream (None: torch's global RNG, as PEFT).
    Returns:
        `model`, holding the new adapter (activate it with `model.use(name)`).
    Raises:
        AdapterNameError: an unknown input adapter, or `name` taken.
        ConfigError: a bad option, mismatched ranks, or a delta a LoRA cannot hold.
        NotImplementedError: an input adapter that cannot merge (prompt tuning, bottleneck adapters).
        RuntimeError: adapters are merged into the base (unmerge first).
    """
    weights = _check_inputs(model, names, weights, name)
    _check_options(method, density, majority_sign_method, rank, clamp, seed)
    tasks = [_read_task(model, n, w) for n, w in zip(names, weights, strict=True)]
    if len(tasks) == 1 and not tasks[0].dense and not (method in SVD_METHODS and rank is not None):
        method = "linear"  # as PEFT: one LoRA is scaled exactly by the factor path (unless re-compressed)
    rng = _Rng(seed)
    modules = _module_order(model, tasks)
    if method in FACTOR_METHODS:
        _require_factors(model, tasks, method)
        factors = {m: _factor_merge(tasks, m, method, density, majority_sign_method, rng) for m in modules}
    else:
        target = _svd_rank(model, tasks, rank, method)
        factors = {m: _svd_merge(tasks, m, method, density, majority_sign_method, rng, target, clamp)
                   for m in modules}
    tensors = _tensor_merge(tasks, method, density, majority_sign_method, rng)
    cfg = _merged_config(model, tasks, factors, tensors)
    _install(model, name, cfg, factors, tensors)
    return model


# -- checks ------------------------------------------------------------------------------------------
def _check_inputs(model: TunedModel, names: list[str], weights: list[float] | None, name: str) -> list[float]:
    if not isinstance(model, TunedModel):
        raise TypeError(f"merge_adapters: expected a TunedModel (st.load / st.attach), got {type(model).__name__}")
    if isinstance(names, str) or not names:
        raise ConfigError(f"merge_adapters: names={names!r}: expected a non-empty list of adapter names")
    for n in names:
        if n not in model.configs:
            raise AdapterNameError(f"merge_adapters: no adapter named {n!r}; adapters here: {list(model.configs)}."
                                   + did_you_mean(n, model.configs))
        cfg = model.configs[n]
        info = METHODS[cfg.method]
        if not info.method.is_mergeable(cfg):
            raise NotImplementedError(f"merge_adapters: adapter {n!r} ({cfg.method}, {info.shape} shape) cannot be "
                                      "merged: it changes what the model computes, not its weights; merge takes "
                                      "adapters marked mergeable in `slimtune methods`")
    if name in model.configs:
        raise AdapterNameError(f"merge_adapters: an adapter named {name!r} already exists; pass another name=")
    if model._merged_names():
        raise RuntimeError(f"merge_adapters: adapters {model._merged_names()} are merged into the base weights; "
                           "call model.unmerge() first")
    weights = [1.0] * len(names) if weights is None else list(weights)
    ok = len(weights) == len(names) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                            and math.isfinite(w) for w in weights)
    if not ok:
        raise ConfigError(f"merge_adapters: weights={weights!r}: expected {len(names)} finite numbers, one per "
                          f"adapter in {names}")
    return [float(w) for w in weights]


def _check_options(method: str, density, sign: str, rank, clamp, seed) -> None:
    if method not in MERGE_METHODS:
        raise ConfigError(f"merge_adapters: method={method!r}: expected one of {', '.join(MERGE_METHODS)}."
                          + did_you_mean(method, MERGE_METHODS))
    pruning = _combiner(method) != "linear"
    if pruning and not (isinstance(density, (int, float)) and not isinstance(density, bool) and 0 <= density <= 1):
        raise ConfigError(f"merge_adapters: method={method!r} needs density= (the fraction kept), a number in "
                          f"[0, 1], e.g. 0.2; got {density!r}")
    if not pruning and density is not None:
        raise ConfigError(f"merge_adapters: density={density!r} applies to ties / dare / magnitude_prune methods, "
                          f"not {method!r}")
    if sign not in SIGN_METHODS:
        raise ConfigError(f"merge_adapters: majority_sign_method={sign!r}: expected 'total' or 'frequency'")
    if method in FACTOR_METHODS and (rank is not None or clamp is not None):
        raise ConfigError(f"merge_adapters: rank= and clamp= apply to the SVD methods ({', '.join(SVD_METHODS)}); "
                          f"method={method!r} keeps the input factors' rank")
    if rank is not None and rank != "full" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ConfigError(f"merge_adapters: rank={rank!r}: expected an int >= 1 or 'full'")
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0 < clamp <= 1):
        raise ConfigError(f"merge_adapters: clamp={clamp!r}: expected a quantile in (0, 1], e.g. 0.99")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"merge_adapters: seed={seed!r}: expected an int or None")


def _combiner(method: str) -> str:
    """The tensor combiner of a method: its name without '_svd'; svd and cat are plain task arithmetic."""
    kind = method.removesuffix("_svd")
    return "linear" if kind in ("svd", "cat") else kind


def _require_factors(model: TunedModel, tasks: list[_Task], method: str) -> None:
    for t in tasks:
        if t.dense:
            kind = model.configs[t.name].method
            alt = "svd" if method in ("linear", "cat") else f"{method}_svd"
            raise ConfigError(f"merge_adapters: method={method!r} combines LoRA factors A and B (as HF PEFT); "
                              f"adapter {t.name!r} ({kind}) has no such factors. Use method={alt!r}: dense deltas, "
                              "then SVD (rank='full' keeps them exact)")


# -- reading the inputs --------------------------------------------------------------------------------
def _read_task(model: TunedModel, name: str, weight: float) -> _Task:
    task = _Task(name, weight)
    plain_lora = model.configs[name].method == "lora"
    view = model.view(name)
    with torch.no_grad():
        for module, adapter in view.layers.items():
            if plain_lora:  # the tensors written to files: rank 2r against the untouched base for PiSSA/OLoRA
                t = adapter.export_tensors()
                A, B = t["A"].detach(), t["B"].detach()
                task.lora[module] = (A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), adapter.scale)
            else:
                _add_layer_delta(task, model, module, adapter)
        for wrapped, entries in view.selections.items():
            owner, attr = owner_and_attr(model.model, wrapped)
            _add_tensor_delta(task, owner, attr, base_name(wrapped), entries.delta(owner._parameters[attr]))
        for module, saved in _saved_modules(model, name):
            original = dict(saved.original_module.named_parameters())
            for pname, p in saved.modules_to_save[name].named_parameters():
                task.tensors[f"{module}.{pname}"] = p.detach() - original[pname].detach()
    return task


def _add_layer_delta(task: _Task, model: TunedModel, module: str, adapter: LayerAdapter) -> None:
    """delta_W (and a bias delta) of a non-LoRA layer adapter against the original base weight."""
    layer = model.model.get_submodule(module)
    base = layer.base_layer
    if type(adapter).merge is LayerAdapter.merge and not adapter.changes_base:  # additive: W += delta_weight
        dW, db = adapter.delta_weight(base), None
    else:
        dW, db = _merged_copy_delta(task.name, module, adapter, layer)
    task.dense[module] = dW.reshape(dW.shape[0], -1)
    if db is not None and bool(db.ne(0).any()):
        task.tensors[f"{module}.bias"] = db


def _merged_copy_delta(name: str, module: str, adapter: LayerAdapter, layer: AdapterLayer
                       ) -> tuple[Tensor, Tensor | None]:
    """Merge the adapter into a scratch copy of the base module and diff (IA3, DoRA, OFT: non-additive)."""
    kind = kind_of(layer.base_layer)
    if not kind.mergeable or adapter.changes_base:
        why = "changes the base weight itself" if adapter.changes_base else f"{kind.name} bases cannot merge"
        raise NotImplementedError(f"merge_adapters: adapter {name!r} on {module}: {why}")
    work = _scratch_copy(layer.base_layer)
    for other in layer.adapters.values():  # an init that took part of W0 (PiSSA): give it back in the copy
        if other.changes_base:
            other.release(work)
    W0, b0 = kind.weight(work).detach().clone(), _bias(work)
    b0 = None if b0 is None else b0.detach().clone()
    adapter.prepare_merge(work)
    adapter.merge(work)
    dW = kind.weight(work).detach() - W0
    db = None if b0 is None else _bias(work).detach() - b0
    adapter.unmerge(work)  # drops what the adapter keeps while merged
    return dW, db


def _scratch_copy(base: nn.Module) -> nn.Module:
    """A shallow copy of `base` with its own copies of its tensors (and the plain class, no selections)."""
    work = copy.copy(base)
    work.__class__ = plain_class(base)
    work._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False)
                        for k, v in base._parameters.items()}
    work._buffers = {k: None if v is None else v.clone() for k, v in base._buffers.items()}
    return work


def _bias(module: nn.Module) -> Tensor | None:
    return module._parameters.get("bias")


def _add_tensor_delta(task: _Task, owner: nn.Module, attr: str, key: str, delta: Tensor) -> None:
    """A selected tensor's delta: the weight of a linear-like module joins that module's delta_W."""
    kind = base_kind(owner)
    module = key.rpartition(".")[0]
    if attr != "weight" or kind is None or not kind.mergeable:
        task.tensors[key] = delta
        return
    stand = copy.copy(owner)  # read the delta in the kind's (d_out, d_in) layout (GPT-2 Conv1D: transposed)
    stand.__class__ = plain_class(owner)
    stand._parameters = {**owner._parameters, "weight": delta}
    dW = kind.weight(stand).reshape(kind.weight(stand).shape[0], -1)
    task.dense[module] = dW if module not in task.dense else task.dense[module] + dW


def _saved_modules(model: TunedModel, name: str) -> list[tuple[str, SavedModule]]:
    return [(n, m) for n, m in model.model.named_modules() if isinstance(m, SavedModule) and name in m.modules_to_save]


def _module_order(model: TunedModel, tasks: list[_Task]) -> list[str]:
    """Modules any task changes, in model order (DARE draws in this order, as PEFT does)."""
    touched = {m for t in tasks for m in (*t.lora, *t.dense)}
    return [n for n, _ in model.model.named_modules() if n in touched]


# -- merging -------------------------------------------------------------------------------------------
class _Rng:
    """DARE's random stream: one torch.Generator per device from `seed` (None: the global RNG)."""

    def __init__(self, seed: int | None) -> None:
        self.seed, self.generators = seed, {}

    def on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]


def _factor_merge(tasks: list[_Task], module: str, method: str, density, sign: str, rng: _Rng
                  ) -> tuple[Tensor, Tensor]:
    present = [t for t in tasks if module in t.lora]
    if method == "cat":  # B_cat @ A_cat = sum_t B_t (w_t s_t A_t)
        return (torch.cat([t.lora[module][0] * t.weight * t.lora[module][2] for t in present], dim=0),
                torch.cat([t.lora[module][1] for t in present], dim=1))
    ranks = {t.name: t.lora[module][0].shape[0] for t in present}
    if len(set(ranks.values())) > 1:
        raise ConfigError(f"merge_adapters: method={method!r} needs one rank per module; at {module} the ranks are "
                          f"{ranks}. Use 'cat' or an SVD method ('svd', '{method}_svd')")
    w_a, w_b = [], []
    for t in present:
        ws = t.weight * t.lora[module][2]
        w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on A only, or it would cancel
        w_b.append(math.sqrt(abs(ws)))
    dtype, device = present[0].lora[module][0].dtype, present[0].lora[module][0].device
    kind = _combiner(method)
    A = combine(kind, [t.lora[module][0] for t in present], w_a, density, sign, rng.on(device))
    B = combine(kind, [t.lora[module][1] for t in present], w_b, density, sign, rng.on(device))
    return A.to(dtype), B.to(dtype)


def _svd_merge(tasks: list[_Task], module: str, method: str, density, sign: str, rng: _Rng,
               rank: int | None, clamp: float | None) -> tuple[Tensor, Tensor]:
    present = [t for t in tasks if module in t.lora or module in t.dense]
    deltas = [t.delta(module) for t in present]
    delta = combine(_combiner(method), deltas, [t.weight for t in present], density, sign, rng.on(deltas[0].device))
    r = min(delta.shape) if rank is None else min(rank, *delta.shape)
    return svd_factors(delta, r, clamp)


def _svd_rank(model: TunedModel, tasks: list[_Task], rank: int | str | None, method: str) -> int | None:
    """The rank the SVD keeps (None: full, each module at min(d_out, d_in))."""
    if rank == "full":
        return None
    if rank is not None:
        return rank
    ranks = [t.rank for t in tasks if t.rank is not None]
    if not ranks:
        kinds = sorted({model.configs[t.name].method for t in tasks})
        raise ConfigError(f"merge_adapters: method={method!r} on {', '.join(kinds)} adapters needs rank= (no LoRA "
                          "input to take it from): an int, or 'full' to keep the merge exact")
    return max(ranks)


def _tensor_merge(tasks: list[_Task], method: str, density, sign: str, rng: _Rng) -> dict[str, Tensor]:
    """Biases, modules_to_save tensors and other selected tensors, combined as dense deltas."""
    names = list(dict.fromkeys(k for t in tasks for k in t.tensors))
    out = {}
    for key in names:
        present = [t for t in tasks if key in t.tensors]
        deltas = [t.tensors[key] for t in present]
        out[key] = combine(_combiner(method), deltas, [t.weight for t in present], density, sign,
                           rng.on(deltas[0].device))
    return out


# -- the result ---------------------------------------------------------------------------------------
def _merged_config(model: TunedModel, tasks: list[_Task], factors: dict[str, tuple[Tensor, Tensor]],
                   tensors: dict[str, Tensor]) -> LoraConfig:
    """A LoRA with s = 1 on every module some input changed; per-module ranks in rank_pattern."""
    ranks = {m: A.shape[0] for m, (A, _) in factors.items()}
    if not ranks:
        raise ConfigError(f"merge_adapters: adapters {[t.name for t in tasks]} change no module weight a LoRA "
                          "could hold")
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r} or None
    saved = sorted({m for t in tasks for m, _ in _saved_modules(model, t.name)})
    biases = [k for k in tensors if not any(k.startswith(s + ".") for s in saved)]
    for key in biases:
        if not key.endswith(".bias"):
            owner = next(t.name for t in tasks if key in t.tensors)
            raise ConfigError(f"merge_adapters: adapter {owner!r} changes {key!r}, which a LoRA cannot hold (only "
                              "linear-layer weights, biases and modules_to_save); merge that adapter into the base "
                              "instead (model.merge(), `slimtune merge`)")
    on_targets = all(k.removesuffix(".bias") in ranks for k in biases)
    first = next((model.configs[t.name] for t in tasks if model.configs[t.name].method == "lora"), None)
    return LoraConfig(r=r, alpha=float(r), targets=list(ranks), dropout=first.dropout if first else 0.0,
                      bias="none" if not biases else "lora_only" if on_targets else "all",
                      modules_to_save=saved or None, rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()} if pattern else None)


def _install(model: TunedModel, name: str, cfg: LoraConfig, factors: dict[str, tuple[Tensor, Tensor]],
             tensors: dict[str, Tensor]) -> None:
    """Add the merged LoRA and load its tensors (checked like a file); on failure the model is unchanged."""
    model.add(cfg, name, init=False)
    try:
        state = model.adapter_state_dict(name)  # copies, keyed as on disk; selections hold W0
        keys = {canonical(k): k for k in state}
        layers = model.view(name).layers
        for module, (A, B) in factors.items():
            peft_keys = type(layers[module]).peft_keys
            state[keys[f"{module}.{peft_keys['A']}"]] = A.reshape(layers[module].A.shape)
            state[keys[f"{module}.{peft_keys['B']}"]] = B.reshape(layers[module].B.shape)
        for key, delta in tensors.items():
            state[keys[key]] = state[keys[key]] + delta.to(state[keys[key]].dtype)
        model.load_adapter_state_dict(state, name)
    except BaseException:
        model.delete(name)
        raise


__all__ = ["MERGE_METHODS", "merge_adapters"]
