"""TunedModel: a base model with named adapters attached in place.

    model = st.attach(base, st.LoraConfig(r=16, targets="all-linear"))
    model.add(cfg2, name="other"); model.use(["default", "other"])
    model(**batch, adapter_names=["default", "other", None])   # one adapter per row
    model.merge(); model.unmerge(); plain = model.detach(merge=True)

An adapter is whatever its method builds (methods/base.py): layer adapters inside wrapped modules,
an input adapter around the model call, selected entries of base tensors, full copies of
`modules_to_save`. This file names no method; it keeps names, the active set, freezing and merges.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune import adapter_files, composition
from slimtune.bases import kind_of
from slimtune.composition import Block, Fuse, Parallel, Stack
from slimtune.config import MethodConfig
from slimtune.errors import AdapterLoadError, AdapterNameError, ConfigError, SlimtuneError, did_you_mean
from slimtune.io import CONFIG_NAME
from slimtune.layer import AdapterLayer, AdapterState, SavedModule
from slimtune.methods.base import METHODS, AdapterView, InputAdapter, LayerAdapter, MethodInfo, Selection
from slimtune.selection import SelectedTensor, TunedEntries, install_property, owner_and_attr, remove_property

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class TunedModel(nn.Module):
    """A base model carrying named adapters. Calls go to the base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, TunedModel):
            raise TypeError("model is already a TunedModel; call .add() on it to add another adapter")
        self.model = model
        self.inputs = nn.ModuleDict()  # adapter name -> InputAdapter
        self.shared = nn.ModuleDict()  # adapter name -> state shared by its layer adapters
        self.selections = nn.ModuleDict()  # adapter name -> {tensor key -> TunedEntries}
        self.configs: dict[str, MethodConfig] = {}
        self._state = AdapterState()
        self._train: list[str] = []  # active adapters whose tensors train (use(..., train=))
        self._selected: dict[tuple[int, str], SelectedTensor] = {}
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.train(model.training)  # the wrapper and its holders start in the base's mode

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # -- calling -----------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str | Block | None] | None = None, **kwargs):
        """Call the base model; `adapter_names` gives one adapter name (a block, or None: base) per row."""
        with self._call(args, kwargs, adapter_names) as (args, kwargs, adapter_names), \
                self._routing(adapter_names), self._input_methods(adapter_names) as inputs:
            if inputs and args:
                kwargs["input_ids"], args = args[0], args[1:]
            for adapter, rows in inputs:
                kwargs = adapter.prepare(kwargs, rows)
            out = self.model(*args, **kwargs)
            for adapter, _ in reversed(inputs):
                out = adapter.finish(out, kwargs)
            return out

    def generate(self, *args, adapter_names: list[str | Block | None] | None = None, **kwargs):
        with self._call(args, kwargs, adapter_names) as (args, kwargs, adapter_names), \
                self._routing(adapter_names), self._input_methods(adapter_names) as inputs:
            if inputs and args:
                kwargs["input_ids"], args = args[0], args[1:]
            for adapter, rows in inputs:
                kwargs = adapter.prepare_generate(kwargs, rows)
            out = self.model.generate(*args, **kwargs)
            for adapter, _ in reversed(inputs):
                out = adapter.finish_generate(out)
            return out

    @contextlib.contextmanager
    def _call(self, args: tuple, kwargs: dict, adapter_names: list | None) -> Iterator[tuple]:
        """Take the methods' call arguments (task_ids) out of the call; a Parallel setup repeats the batch
        once per child and routes each copy to its child."""
        state = self._state
        declared = {a for c in self.configs.values() for a in METHODS[c.method].method.call_arguments_of(c)}
        state.call = {k: kwargs.pop(k) for k in list(kwargs) if k in declared}
        setup = state.setup
        if isinstance(setup, Parallel) and adapter_names is None and not state.disabled:
            args, kwargs, rows = composition.repeat_batch(args, kwargs, len(setup.children))
            state.call = composition.repeat_batch((), state.call, len(setup.children))[1]
            adapter_names = [child for child in setup.children for _ in range(rows)]
        try:
            yield args, kwargs, adapter_names
        finally:
            state.call = {}

    @contextlib.contextmanager
    def _input_methods(self, adapter_names: list[str | None] | None) -> Iterator[list]:
        inputs = self._live_inputs(adapter_names)
        try:
            yield inputs
        finally:
            for adapter, _ in inputs:
                adapter.end_call()

    def _live_inputs(self, adapter_names: list[str | None] | None) -> list[tuple[nn.Module, Tensor | None]]:
        """(input adapter, rows it applies to or None for all) in active order."""
        if self._state.disabled or not len(self.inputs):
            return []
        if adapter_names is None:
            return [(self.inputs[n], None) for n in self._state.active if n in self.inputs]
        out = []
        per_row = [composition.leaves(n) if n is not None else [] for n in adapter_names]
        for name in dict.fromkeys(n for names in per_row for n in names if n in self.inputs):
            out.append((self.inputs[name], torch.tensor([name in names for names in per_row])))
        return out

    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str | None] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        for name in (n for entry in adapter_names if entry is not None for n in composition.leaves(entry)):
            if name not in self.configs:
                raise AdapterNameError(self._unknown(name))
            if name in self.selections and len(self.selections[name]):
                raise NotImplementedError(f"adapter_names: adapter {name!r} ({self.configs[name].method}) tunes base "
                                          "tensors, which cannot differ per row; use model.use() instead")
        if self._merged_names():
            raise RuntimeError("adapter_names routing needs unmerged adapters: call model.unmerge() first")
        self._state.routing = list(adapter_names)
        try:
            yield
        finally:
            self._state.routing = None

    # -- adapters ----------------------------------------------------------------------------
    def add(self, config: MethodConfig, name: str = "default", *, init: bool = True,
            data: Iterable[dict] | None = None) -> TunedModel:
        """Attach a new adapter. The first one becomes active; later ones wait for `use()`.

        Every module is built before any is installed, so a failure leaves the model as it was.

        Args:
            init: run the method's data-dependent init (SVD of the base, sampled vocabulary...); `st.load` passes False.
            data: calibration batches (dicts of model keyword arguments, with labels) for methods that choose
                what to train from gradients (FishMask, child-tuning); ignored by the others.
        Raises:
            AdapterNameError: the name is taken or not an identifier.
            TargetNotFoundError: the config's targets match no module.
            ConfigError: the method cannot be built on a target (the message names the layer).
        """
        if name in self.configs:
            raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AdapterNameError(f"adapter name {name!r}: expected letters, digits, '_' or '-', e.g. 'default'")
        info = METHODS.get(config.method)
        if info is None or not isinstance(config, info.config):
            raise ConfigError(f"{type(config).__name__} is not a registered method config")
        if info.method.needs_data and init and data is None:
            raise ConfigError(f"{type(config).__name__} chooses what to train from gradients: pass calibration "
                              "batches, st.attach(model, config, data=batches) (slimtune train does it)")
        if init:
            config = info.method.plan(self.model, config, data)
        saved = self._resolve_modules_to_save(config)
        targets = info.method.find_targets(self.model, config, set(saved))
        shared = info.method.build_shared(self.model, config, targets, init)
        layers = {t: self._build_layer(info, t, config, init, shared) for t in targets}
        input_adapter = info.method.build_input(self.model, config, init)
        selections = self._build_selections(info, config, targets, init, saved, data)
        for module in [*layers.values(), input_adapter, shared, *(entries for *_, entries in selections)]:
            if module is not None:
                module.train(self.model.training)  # new modules follow the model's mode (dropout off in eval)
        # nothing above changed the model; install everything
        for target, adapter in layers.items():
            layer = self._wrap(target)
            layer.adapters[name] = adapter
            _bind_state(adapter, self._state)
            adapter.install(layer.base_layer)
        for target in saved:
            self._wrap_saved(target).add(name)
        if input_adapter is not None:
            self.inputs[name] = input_adapter
            _bind_state(input_adapter, self._state)
            input_adapter.attach(self.model)
        if shared is not None:
            self.shared[name] = shared
        self._install_selections(name, selections)
        self.configs[name] = config
        if not self._state.active:
            self._state.active, self._train = [name], [name]
        self._refresh_trainable()
        if info.has_attached:
            info.method.attached(self.view(name), config)
        return self

    def _build_layer(self, info: MethodInfo, target: str, config: MethodConfig, init: bool,
                     shared: nn.Module | None) -> LayerAdapter:
        base = self.model.get_submodule(target)
        base = base.base_layer if isinstance(base, AdapterLayer) else base
        kind = kind_of(base)
        if info.method.linear_only and not kind.linear:
            raise NotImplementedError(f"{info.name} on {target} ({type(base).__name__}) is not implemented: "
                                      "it adapts linear layers only (Linear, GPT-2 Conv1D, registered linear kinds)")
        try:
            return info.method.build_layer(base, config.resolve(target), init, shared)
        except NotImplementedError as e:
            raise NotImplementedError(f"{info.name} on {target} ({type(base).__name__}): {e}") from None
        except Exception as e:
            d_in, d_out = kind.sizes(base)
            raise ConfigError(f"{type(config).__name__} cannot be built on {target} ({type(base).__name__}, "
                              f"d_in={d_in}, d_out={d_out}): {e}") from e

    def _build_selections(self, info: MethodInfo, config: MethodConfig, targets: list[str], init: bool,
                          saved: list[str], data: Iterable[dict] | None
                          ) -> list[tuple[str, nn.Module, str, TunedEntries]]:
        """Entries to train for the method's selections; tensors of modules this adapter trains in full
        (`modules_to_save`) are left to the full copy."""
        base_names = {adapter_files.canonical(n): n for n, _ in self.model.named_parameters()
                      if not adapter_files.is_adapter_tensor(n)}
        out = []
        for sel in info.method.select(self.model, config, targets, init, data):
            if not isinstance(sel, Selection):
                raise TypeError(f"{info.name}.select() must return Selection objects, got {type(sel).__name__}")
            key = adapter_files.canonical(sel.name)
            if any(key.startswith(s + ".") for s in saved):
                continue
            full = base_names.get(key)
            if full is None:
                raise ConfigError(f"{type(config).__name__}: no base tensor named {sel.name!r}."
                                  + did_you_mean(sel.name, base_names))
            owner, attr = owner_and_attr(self.model, full)
            original = owner._parameters[attr]
            mask = torch.zeros_like(original, dtype=torch.bool) if sel.sparse and sel.mask is None else sel.mask
            entries = TunedEntries(original, mask)
            out.append((key, owner, attr, entries))
        return out

    def _install_selections(self, name: str, selections: list) -> None:
        if not selections:
            return
        holder = self.selections[name] = nn.ModuleDict()
        for key, owner, attr, entries in selections:
            holder[key.replace(".", "__")] = entries
            selected = self._selected.get((id(owner), attr))
            if selected is None:
                selected = self._selected[(id(owner), attr)] = SelectedTensor(owner, attr, self._is_live)
                install_property(owner, attr, selected)
            selected.entries[name] = entries

    def _is_live(self, name: str) -> bool:
        state = self._state
        return not state.disabled and state.routing is None and name in state.active

    def use(self, names: str | list[str] | Block, train: list[str] | None = None) -> TunedModel:
        """Set the active setup: an adapter name, a list (composed in order: deltas add up), or a
        composition block (st.Stack, st.Parallel, st.Average, st.Split, st.Fuse; docs/composition.md).

        train: the active adapters whose tensors train; default every active one except the children of
        a Fuse block (AdapterFusion trains the fusion over frozen adapters).
        """
        setup = composition.normalize(self._fill_fusion(names)) if isinstance(names, Block) else None
        flat = composition.flat_names(setup) if setup is not None else None
        names = flat if setup is not None and flat is not None else (
            composition.leaves(setup) if setup is not None else [names] if isinstance(names, str) else list(names))
        for name in names:
            if name not in self.configs:
                raise AdapterNameError(self._unknown(name))
        setup = None if flat is not None else setup
        if setup is not None:
            self._check_setup(setup)
        frozen = composition.fused_children(setup) if setup is not None else []
        train = [n for n in names if n not in frozen] if train is None else list(train)
        for name in train:
            if name not in names:
                raise AdapterNameError(f"train={train!r}: {name!r} is not in the active setup {names}")
        if self._merged_names():
            raise RuntimeError("cannot change the active set while adapters are merged: call unmerge() first")
        self._state.active, self._state.setup, self._train = names, setup, train
        self._refresh_trainable()
        return self

    @property
    def setup(self) -> list[str] | Block:
        """The active setup as given to `use()` (a block, or the list of active names)."""
        return self._state.setup if self._state.setup is not None else list(self._state.active)

    def _fill_fusion(self, node: str | Block) -> str | Block:
        """A Fuse without `fusion=` takes the one attached fusion adapter."""
        if isinstance(node, str):
            return node
        kids = [self._fill_fusion(c) for c in node.children]
        if isinstance(node, Fuse) and node.fusion is None:
            fusions = [n for n in self.configs if any(l.adapters[n].fuses for l in self._layers() if n in l.adapters)]
            if len(fusions) != 1:
                raise ConfigError(f"{node!r}: name the fusion adapter with fusion=...; fusion adapters here: "
                                  f"{fusions or 'none (add one, e.g. st.FusionConfig)'}")
            return Fuse(*kids, fusion=fusions[0])
        return composition._rebuild(node, kids)

    def _check_setup(self, setup: Block) -> None:
        """Input and selective adapters change the whole call: only a Stack or a Parallel child may hold them."""
        top = setup.children if isinstance(setup, (Stack, Parallel)) else ()
        for block in composition.walk(setup):
            for child in block.children:
                if isinstance(child, str) and (child in self.inputs or child in self.selections) \
                        and not (child in top or any(child in t.children for t in top if isinstance(t, Stack))):
                    raise NotImplementedError(f"adapter {child!r} ({self.configs[child].method}) changes the model call"
                                              f" or base tensors, which a {type(block).__name__} block cannot "
                                              "combine; stack it (a plain list or Stack) instead")
        for block in composition.walk(setup):
            if isinstance(block, Fuse) and not any(l.adapters[block.fusion].fuses for l in self._layers()
                                                   if block.fusion in l.adapters):
                raise ConfigError(f"{block!r}: adapter {block.fusion!r} ({self.configs[block.fusion].method}) is "
                                  "not a fusion adapter")

    def delete(self, name: str) -> None:
        """Remove an adapter (giving back any base weights its init took)."""
        if name not in self.configs:
            raise AdapterNameError(self._unknown(name))
        if name in self._merged_names():
            raise RuntimeError(f"adapter {name!r} is merged: call unmerge() before delete()")
        for layer in self._layers():
            if name in layer.adapters:
                layer.adapters.pop(name).release(layer.base_layer)
        for saved in self._saved_modules():
            if name in saved.modules_to_save:
                del saved.modules_to_save[name]
        if name in self.inputs:
            self.inputs.pop(name).detach(self.model)
        for holder in (self.selections, self.shared):
            if name in holder:
                del holder[name]
        for key, selected in list(self._selected.items()):
            selected.entries.pop(name, None)
            if not selected.entries:
                remove_property(selected.owner, selected.attr)
                del self._selected[key]
        del self.configs[name]
        if self._state.setup is not None and name in composition.leaves(self._state.setup):
            self._state.setup = None  # the rest stays active as a plain list
        self._state.active = [n for n in self._state.active if n != name]
        self._train = [n for n in self._train if n != name]
        self._unwrap_empty()

    @property
    def active(self) -> list[str]:
        return list(self._state.active)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[TunedModel]:
        """Within the block the model computes exactly the base model."""
        merged = self._merged_names()
        self.unmerge()
        self._state.disabled = True
        try:
            yield self
        finally:
            self._state.disabled = False
            if merged:
                self.merge()

    # -- merge / detach ----------------------------------------------------------------------
    def merge(self) -> TunedModel:
        """Fold the active adapters into the base weights in place (no-op where already merged)."""
        if self._state.setup is not None:
            raise NotImplementedError(f"merge() with the setup {self._state.setup!r}: only a plain list (Stack) of "
                                      "adapters folds into the weights; st.merge_adapters combines adapters into one")
        for name in self._state.active:
            info = METHODS[self.configs[name].method]
            if not info.method.is_mergeable(self.configs[name]):
                raise NotImplementedError(f"adapter {name!r} ({info.name}, {info.shape} shape) cannot be merged: it "
                                          "changes what the model computes, not its weights")
        for selected in self._selected.values():  # first: layer merges (a scaled bias) build on them
            selected.merge(self._state.active)
        for layer in self._layers():
            layer.merge(self._state.active)
        return self

    def unmerge(self) -> TunedModel:
        """Undo `merge()`, restoring the base weights (selected tensors bit for bit)."""
        for layer in self._layers():
            layer.unmerge()
        for selected in self._selected.values():
            selected.unmerge()
        return self

    def detach(self, merge: bool = False) -> nn.Module:
        """Remove every slimtune module and return the plain base model.

        merge=True folds the active adapters in first (and keeps their modules_to_save copies);
        merge=False gives back the untouched base. The TunedModel is unusable afterwards.
        """
        self.merge() if merge else self.unmerge()
        for name, layer in list(self._layers(named=True)):
            layer.release_unmerged()
            self._replace(name, layer.base_layer)
        for name, saved in list(self._saved_modules(named=True)):
            self._replace(name, saved.current() if merge else saved.original_module)
        for adapter in self.inputs.values():
            adapter.detach(self.model)
        for selected in self._selected.values():
            remove_property(selected.owner, selected.attr)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, True))
        model, self.configs, self._selected = self.model, {}, {}
        return model

    # -- training hooks ------------------------------------------------------------------------
    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Run the active adapters' per-step work (rank budgets, proximal updates, periodic merges).

        Call after every optimizer step: st.Trainer does, `slimtune.train.SlimtuneCallback` does it
        for HF Trainer, and a plain loop calls `model.step(step, optimizer)` itself.
        """
        for name in self._state.active:
            info = METHODS[self.configs[name].method]
            if info.has_step:  # a view walks the model's modules: only for methods that use it
                info.method.step(self.view(name), self.configs[name], global_step, optimizer)

    def regularization_loss(self) -> Tensor | None:
        """The sum of the active adapters' regularisers (orthogonality, sparsity), or None if none has one."""
        infos = {n: METHODS[self.configs[n].method] for n in self._state.active}  # called every forward:
        terms = [info.method.regularizer(self.view(n), self.configs[n])     # views only where needed
                 for n, info in infos.items() if info.has_regularizer]
        terms = [t for t in terms if t is not None]
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    def view(self, name: str) -> AdapterView:
        """Adapter `name`'s modules: per wrapped layer, the shared state, the input adapter."""
        name = self._one_name(name)
        layers = {n: m for n, m in self._layers(named=True) if name in m.adapters}
        selections = {}
        if any(name in s.entries for s in self._selected.values()):  # view() runs per step: walk only if needed
            names = {id(p): n for n, p in self.model.named_parameters()}
            selections = {names[id(s.base)]: s.entries[name] for s in self._selected.values() if name in s.entries}
        return AdapterView(name, {n: m.adapters[name] for n, m in layers.items()},
                           {n: m.base_layer for n, m in layers.items()},
                           self.shared[name] if name in self.shared else None,
                           self.inputs[name] if name in self.inputs else None, selections)

    # -- inspection --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything that trains now; base names as in `model.model`."""
        return [(n.removeprefix("model."), p) for n, p in self.named_parameters() if p.requires_grad]

    def adapter_parameter_count(self, name: str) -> int:
        """Numbers adapter `name` saves (sparse entries counted once, not their indices)."""
        return sum(s.tensor.numel() for k, s in adapter_files.adapter_slots(self, name).items()
                   if not k.endswith(".sparse_index"))

    def summary(self, show: bool = True) -> str:
        """Per adapter: method, shape, modules, parameters (and % of the base); prints it by default."""
        base_total = sum(p.numel() for n, p in self.model.named_parameters() if not adapter_files.is_adapter_tensor(n))
        lines = [f"{'adapter':<12} {'method':<14} {'shape':<9} {'modules':>7} {'params':>12} {'% of base':>9}  active"]
        for name, cfg in self.configs.items():
            n_params = self.adapter_parameter_count(name)
            n_modules = sum(name in layer.adapters for layer in self._layers()) + sum(
                name in s.entries for s in self._selected.values())
            lines.append(f"{name:<12} {cfg.method:<14} {METHODS[cfg.method].shape:<9} {n_modules:>7} {n_params:>12,} "
                         f"{100 * n_params / max(base_total, 1):>8.3f}%  {'yes' if name in self.active else ''}")
            info = METHODS[cfg.method]
            detail = info.method.describe(self.view(name), cfg) if info.has_describe else None
            if detail:
                lines.append(f"{'':<12} {detail}")
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        lines.append(f"trainable now: {trainable:,} of {base_total + trainable:,} "
                     f"({100 * trainable / max(base_total + trainable, 1):.3f}%); base: {base_total:,}")
        text = "\n".join(lines)
        if show:
            print(text)
        return text

    def adapter_state_dict(self, name: str | None = None) -> dict[str, Tensor]:
        """Copies of the tensors that define adapter `name` (default: the first active), keyed as on disk."""
        slots = adapter_files.adapter_slots(self, self._one_name(name))
        return {k: s.tensor.detach().clone() for k, s in slots.items()}

    def load_adapter_state_dict(self, tensors: dict[str, Tensor], name: str | None = None,
                                allow_nonfinite: bool = False) -> None:
        adapter_files.load_tensors(self, self._one_name(name), tensors, "state dict", allow_nonfinite)

    def save(self, path: str | Path, format: str = "slimtune", name: str | None = None,
             tokenizer: Any = None) -> Path:
        """Save adapter(s): `name` alone, or every adapter (the first at `path`, others in subfolders).

        format="peft" writes exactly what HF PEFT writes, for methods PEFT has. `tokenizer`: saved beside
        the adapter (a vocabulary grown with new tokens); `st.load` then resizes the base's embeddings
        to it before loading.
        """
        names = [name] if name is not None else list(self.configs)
        if not names:
            raise AdapterNameError("this model has no adapters to save")
        path = Path(path)
        for i, n in enumerate(names):
            adapter_files.save(self, n, path if i == 0 else path / n, format=format)
        if tokenizer is not None:
            adapter_files.save_tokenizer(tokenizer, path)
        return path

    # -- internals -----------------------------------------------------------------------------
    def _one_name(self, name: str | None) -> str:
        if name is None:
            if not self._state.active:
                raise AdapterNameError(f"no active adapter; name one of {list(self.configs)}")
            return self._state.active[0]
        if name not in self.configs:
            raise AdapterNameError(self._unknown(name))
        return name

    def _unknown(self, name: str | None) -> str:
        return f"no adapter named {name!r}; adapters here: {list(self.configs)}." + did_you_mean(name, self.configs)

    def _layers(self, named: bool = False):
        for n, m in self.model.named_modules():
            if isinstance(m, AdapterLayer):
                yield (n, m) if named else m

    def _saved_modules(self, named: bool = False):
        for n, m in self.model.named_modules():
            if isinstance(m, SavedModule):
                yield (n, m) if named else m

    def _merged_names(self) -> list[str]:
        names = {n for layer in self._layers() for n in layer.merged}
        names |= {n for s in self._selected.values() for n in s.merged}
        return sorted(names)

    def _wrap(self, target: str) -> AdapterLayer:
        module = self.model.get_submodule(target)
        if isinstance(module, AdapterLayer):
            return module
        layer = AdapterLayer(module, self._state).train(module.training)
        self._replace(target, layer)
        return layer

    def _wrap_saved(self, target: str) -> SavedModule:
        module = self.model.get_submodule(target)
        if isinstance(module, SavedModule):
            return module
        saved = SavedModule(module, self._state).train(module.training)
        self._replace(target, saved)
        return saved

    def _resolve_modules_to_save(self, config: MethodConfig) -> list[str]:
        """Full names of `config.modules_to_save` entries (a full name or a name suffix each)."""
        names = [n for n, m in self.model.named_modules() if n and not isinstance(m, AdapterLayer)]
        names = [n for n in names if ".original_module" not in n and ".modules_to_save" not in n]
        out = []
        for entry in config.modules_to_save or []:
            hits = [n for n in names if n == entry or n.endswith("." + entry)]
            if not hits:
                raise ConfigError(f"{type(config).__name__}.modules_to_save: no module named {entry!r} in "
                                  f"{type(self.model).__name__}." + did_you_mean(entry.split(".")[-1],
                                                                                {n.split(".")[-1] for n in names}))
            out.extend(h for h in hits if h not in out)
        return out

    def _replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def _unwrap_empty(self) -> None:
        for name, layer in list(self._layers(named=True)):
            if not layer.adapters:
                self._replace(name, layer.base_layer)
        for name, saved in list(self._saved_modules(named=True)):
            if not saved.modules_to_save:
                self._replace(name, saved.original_module)

    def _refresh_trainable(self) -> None:
        """Only the active adapters' tensors train (minus each layer adapter's `frozen` ones)."""
        active = set(self._train)
        for layer in self._layers():
            for name, adapter in layer.adapters.items():
                for pname, p in adapter.named_parameters():
                    p.requires_grad_(name in active and pname.split(".")[0] not in adapter.frozen)
        for saved in self._saved_modules():
            for name, copy in saved.modules_to_save.items():
                copy.requires_grad_(name in active)
        for holder in (self.inputs, self.selections, self.shared):
            for name, module in holder.items():
                module.requires_grad_(name in active)  # their fixed tensors are buffers


def _bind_state(adapter: nn.Module, state: AdapterState) -> None:
    """`call_argument()` reads the call through the shared state: give it to the adapter and to any
    adapter modules inside it (a hybrid's or a mixture's parts)."""
    for module in adapter.modules():
        if isinstance(module, (LayerAdapter, InputAdapter)):
            module.__dict__["_adapter_state"] = state


def attach(model: nn.Module, config: MethodConfig, name: str = "default", *,
           data: Iterable[dict] | None = None) -> TunedModel:
    """Wrap `model` in place with one adapter; only adapter parameters are trainable afterwards.

    `data`: calibration batches for methods that choose what to train from gradients (see `TunedModel.add`).
    """
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    return tuned.add(config, name, data=data)


def load(model: nn.Module, path: str | Path, name: str = "default", *, allow_nonfinite: bool = False,
         rank: int | None = None) -> TunedModel:
    """Attach the adapter(s) saved at `path` (ours or HF PEFT's) to `model`.

    Subfolders holding an adapter (as `save()` writes for extra adapters) load under their folder name.
    A failed load leaves `model` as it was.

    Args:
        allow_nonfinite: load tensors holding NaN/inf instead of refusing them.
        rank: load the adapter cut to this rank (methods trained with nested ranks, e.g. DyLoRA).
    Raises:
        NotImplementedError: `rank` given for a method without nested ranks.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"st.load(..., rank={rank!r}): expected an int >= 1")
    path = Path(path)
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    entries = [(name, path)]
    if path.is_dir():
        entries += sorted((p.name, p) for p in path.iterdir() if (p / CONFIG_NAME).exists())
    adapter_files.match_vocabulary(tuned.model, path)
    for adapter_name, folder in entries:
        cfg, raw, tensors = adapter_files.read_adapter(folder)
        if rank is not None:
            cfg, tensors = METHODS[cfg.method].method.choose_rank(cfg, tensors, rank)
        if "peft_type" in raw and cfg.modules_to_save:  # PEFT lists heads of every task type; keep ours
            names = [n for n, _ in tuned.model.named_modules()]
            kept = [e for e in cfg.modules_to_save if any(n == e or n.endswith("." + e) for n in names)]
            cfg = cfg.replace(modules_to_save=list(dict.fromkeys(kept)) or None)
        tuned.add(cfg, adapter_name, init=False)
        try:
            adapter_files.load_tensors(tuned, adapter_name, tensors, str(folder), allow_nonfinite)
        except SlimtuneError as e:
            tuned.delete(adapter_name)
            theirs = raw.get("base_fingerprint")
            if isinstance(e, AdapterLoadError) and theirs and theirs != adapter_files.base_fingerprint(tuned.model):
                raise AdapterLoadError(f"{e} Adapter base_fingerprint {theirs} differs.") from None
            raise
    return tuned
