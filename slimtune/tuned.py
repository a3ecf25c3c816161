"""TunedModel: a base model with named adapters attached in place.

    model = st.attach(base, st.LoraConfig(r=16, targets="all-linear"))
    model.add(cfg2, name="other"); model.use(["default", "other"])
    model(**batch, adapter_names=["default", "other", None])   # one adapter per row
    model.merge(); model.unmerge(); plain = model.detach(merge=True)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from slimtune.config import MethodConfig
from slimtune.errors import AdapterNameError, ConfigError, did_you_mean
from slimtune.layer import AdapterLayer, AdapterState, SavedModule
from slimtune.methods.base import METHODS
from slimtune.targets import features, find_targets

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class TunedModel(nn.Module):
    """A base model whose target modules carry named adapters. Calls go to the base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, TunedModel):
            raise TypeError("model is already a TunedModel; call .add() on it to add another adapter")
        self.model = model
        self.configs: dict[str, MethodConfig] = {}
        self._state = AdapterState()
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # -- calling -----------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """Call the base model; `adapter_names` gives one adapter name (or None: base) per row."""
        with self._routing(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        with self._routing(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str | None] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        for name in adapter_names:
            if name is not None and name not in self.configs:
                raise AdapterNameError(self._unknown(name))
        if any(layer.merged for layer in self._layers()):
            raise RuntimeError("adapter_names routing needs unmerged adapters: call model.unmerge() first")
        self._state.routing = list(adapter_names)
        try:
            yield
        finally:
            self._state.routing = None

    # -- adapters ----------------------------------------------------------------------------
    def add(self, config: MethodConfig, name: str = "default", *, init: bool = True) -> TunedModel:
        """Attach a new adapter. The first one becomes active; later ones wait for `use()`.

        Args:
            init: run data-dependent init (PiSSA/OLoRA); `st.load` passes False.
        Raises:
            AdapterNameError: the name is taken or not an identifier.
            TargetNotFoundError: the config's targets match no module.
        """
        if name in self.configs:
            raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AdapterNameError(f"adapter name {name!r}: expected letters, digits, '_' or '-', e.g. 'default'")
        info = METHODS.get(config.method)
        if info is None:
            raise ConfigError(f"{type(config).__name__} is not a registered method config")
        saved = self._resolve_modules_to_save(config)
        targets = find_targets(self.model, config, skip=set(saved))
        for target in targets:
            layer = self._wrap(target)
            layer.adapters[name] = info.build(layer.base_layer, config.resolve(target), init)
        for target in saved:
            self._wrap_saved(target).add(name)
        self.configs[name] = config
        if not self._state.active:
            self._state.active = [name]
        self._refresh_trainable()
        return self

    def use(self, names: str | list[str]) -> TunedModel:
        """Set the active adapter(s); several compose (their deltas add up)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.configs:
                raise AdapterNameError(self._unknown(name))
        if any(layer.merged for layer in self._layers()):
            raise RuntimeError("cannot change the active set while adapters are merged: call unmerge() first")
        self._state.active = names
        self._refresh_trainable()
        return self

    def delete(self, name: str) -> None:
        """Remove an adapter (giving back any base weights its init took)."""
        if name not in self.configs:
            raise AdapterNameError(self._unknown(name))
        for layer in self._layers():
            if name in layer.merged:
                raise RuntimeError(f"adapter {name!r} is merged: call unmerge() before delete()")
            if name in layer.adapters:
                adapter = layer.adapters.pop(name)
                if hasattr(adapter, "release"):
                    adapter.release(layer.base_layer)
        for saved in self._saved_modules():
            saved.modules_to_save.pop(name, None)
        del self.configs[name]
        self._state.active = [n for n in self._state.active if n != name]
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
        for name in self._state.active:
            if not METHODS[self.configs[name].method].mergeable:
                raise NotImplementedError(f"adapter {name!r} ({self.configs[name].method}) cannot be merged")
        for layer in self._layers():
            layer.merge(self._state.active)
        return self

    def unmerge(self) -> TunedModel:
        """Undo `merge()`, restoring the base weights (up to float rounding)."""
        for layer in self._layers():
            layer.unmerge()
        return self

    def detach(self, merge: bool = False) -> nn.Module:
        """Remove every slimtune module and return the plain base model.

        merge=True folds the active adapters in first (and keeps their modules_to_save copies);
        merge=False gives back the untouched base. The TunedModel is unusable afterwards.
        """
        self.merge() if merge else self.unmerge()
        for name, layer in list(self._layers(named=True)):
            if not merge:
                for adapter in layer.adapters.values():
                    if hasattr(adapter, "release"):
                        adapter.release(layer.base_layer)
            self._replace(name, layer.base_layer)
        for name, saved in list(self._saved_modules(named=True)):
            self._replace(name, saved.current() if merge else saved.original_module)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, True))
        model, self.configs = self.model, {}
        return model

    # -- inspection --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def summary(self, show: bool = True) -> str:
        """Per adapter: method, modules, parameters (and % of the base); prints it by default."""
        base_total = sum(p.numel() for n, p in self.model.named_parameters() if _is_base_param(n))
        lines = [f"{'adapter':<12} {'method':<8} {'modules':>7} {'params':>12} {'% of base':>9}  active"]
        for name, cfg in self.configs.items():
            n_params = sum(t.numel() for t in self._adapter_params(name).values())
            n_modules = sum(name in layer.adapters for layer in self._layers())
            lines.append(f"{name:<12} {cfg.method:<8} {n_modules:>7} {n_params:>12,} "
                         f"{100 * n_params / max(base_total, 1):>8.3f}%  {'yes' if name in self.active else ''}")
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        lines.append(f"trainable now: {trainable:,} of {base_total + trainable:,} "
                     f"({100 * trainable / max(base_total + trainable, 1):.3f}%); base: {base_total:,}")
        text = "\n".join(lines)
        if show:
            print(text)
        return text

    def adapter_state_dict(self, name: str | None = None) -> dict[str, Tensor]:
        """The tensors that define adapter `name` (default: the first active), keyed as on disk."""
        from slimtune.io import adapter_tensors

        return adapter_tensors(self, self._one_name(name))

    def load_adapter_state_dict(self, tensors: dict[str, Tensor], name: str | None = None) -> None:
        from slimtune.io import load_tensors_into

        load_tensors_into(self, self._one_name(name), tensors, source="state dict")

    def save(self, path: str | Path, format: str = "slimtune", name: str | None = None) -> Path:
        """Save adapter(s): `name` alone, or every adapter (the first at `path`, others in subfolders).

        format="peft" writes exactly what HF PEFT writes, for methods PEFT has.
        """
        from slimtune.io import save_adapter

        names = [name] if name is not None else list(self.configs)
        if not names:
            raise AdapterNameError("this model has no adapters to save")
        path = Path(path)
        for i, n in enumerate(names):
            save_adapter(self, n, path if i == 0 else path / n, format=format)
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
        return sorted({n for layer in self._layers() for n in layer.merged})

    def _adapter_params(self, name: str) -> dict[str, Tensor]:
        out = {}
        for n, p in self.model.named_parameters():
            if f".adapters.{name}." in n or f".modules_to_save.{name}." in n:
                out[n] = p
        return out

    def _wrap(self, target: str) -> AdapterLayer:
        module = self.model.get_submodule(target)
        if isinstance(module, AdapterLayer):
            return module
        features(module)  # raises a clear TypeError for unsupported module types
        layer = AdapterLayer(module, self._state)
        self._replace(target, layer)
        return layer

    def _wrap_saved(self, target: str) -> SavedModule:
        module = self.model.get_submodule(target)
        if isinstance(module, SavedModule):
            return module
        saved = SavedModule(module, self._state)
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
        active = set(self._state.active)
        for layer in self._layers():
            for name, adapter in layer.adapters.items():
                frozen = getattr(adapter, "frozen", set())
                for pname, p in adapter.named_parameters():
                    p.requires_grad_(name in active and pname.split(".")[0] not in frozen)
        for saved in self._saved_modules():
            for name, copy in saved.modules_to_save.items():
                copy.requires_grad_(name in active)
        self._refresh_bias(active)

    def _refresh_bias(self, active: set[str]) -> None:
        modes = {getattr(self.configs[n], "bias", "none") for n in active if n in self.configs}
        if "all" in modes:
            for n, p in self.model.named_parameters():
                if n.endswith("bias") and _is_base_param(n):
                    p.requires_grad_(True)
        elif "lora_only" in modes:
            for layer in self._layers():
                bias = getattr(layer.base_layer, "bias", None)
                if bias is not None and any(n in layer.adapters for n in active):
                    bias.requires_grad_(True)


def _is_base_param(name: str) -> bool:
    return ".adapters." not in name and ".modules_to_save." not in name


def attach(model: nn.Module, config: MethodConfig, name: str = "default") -> TunedModel:
    """Wrap `model` in place with one adapter; only adapter parameters are trainable afterwards."""
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    return tuned.add(config, name)

