"""Method configs: the base dataclass every method config extends, and JSON/YAML round trips.

A config is plain data: `to_dict()` gives JSON-safe values with a `method` key naming the
registered method, and `config_from_dict()` rebuilds the right class, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slimtune.errors import ConfigError, did_you_mean

_CONFIG_CLASSES: dict[str, type[MethodConfig]] = {}


@dataclass
class MethodConfig:
    """Fields every method shares: which modules it attaches to.

    Args:
        targets: module-name suffixes (list), one regex matched against the full module name
            (a string with regex characters), a single suffix (plain string) or "all-linear"
            (every Linear / Conv1D except the output head).
        exclude: names, suffixes or a regex of modules never to touch.
        layers: restrict to transformer blocks by index: an int, a list of ints, or "a-b"
            (inclusive range).
        modules_to_save: base modules trained in full and saved with the adapter (e.g. a
            classification head "score" or "classifier").
    """

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "exclude_modules": "exclude",
                                         "layers_to_transform": "layers"}  # other libraries' names
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    layers: int | list[int] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = [str(t) for t in self.targets]
            if not self.targets:
                raise ConfigError(f"{type(self).__name__}.targets=[]: expected at least one module name")
        elif self.targets is not None and not isinstance(self.targets, str):
            raise ConfigError(
                f"{type(self).__name__}.targets={self.targets!r}: expected a list of module names, "
                'a regex string or "all-linear"'
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.layers = parse_layers(self.layers, type(self).__name__)

    def resolve(self, module_name: str) -> MethodConfig:
        """The config to use for one module (methods with per-module patterns override this)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


def register_config(name: str, cls: type[MethodConfig]) -> None:
    if name in _CONFIG_CLASSES and _CONFIG_CLASSES[name] is not cls:
        raise ConfigError(f"method name {name!r} is already registered by {_CONFIG_CLASSES[name].__name__}")
    cls.method = name
    _CONFIG_CLASSES[name] = cls


def config_class(name: str) -> type[MethodConfig]:
    """The config class registered under `name`."""
    try:
        return _CONFIG_CLASSES[name]
    except KeyError:
        raise ConfigError(
            f"method={name!r} is not a registered method; expected one of {sorted(_CONFIG_CLASSES)}."
            + did_you_mean(name, _CONFIG_CLASSES)
        ) from None


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a method config from a dict with a `method` key; unknown keys are errors."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"config {data!r}: expected a mapping with a 'method' key, e.g. {{'method': 'NAME'}}")
    data = dict(data)
    cls = config_class(data.pop("method"))
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            alias = cls.aliases.get(key)
            hint = f" Did you mean {alias!r}?" if alias else did_you_mean(key, names)
            raise ConfigError(f"{cls.__name__} has no field {key!r}; valid fields: {', '.join(names)}." + hint)
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def load_config(path: str | Path) -> MethodConfig:
    """Read a method config from a .json or .yaml file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return config_from_dict(data)


def parse_layers(layers: Any, owner: str = "config") -> list[int] | None:
    """Normalise a layer selection (int, list of ints, "a-b" or "a,b,c") to a sorted list."""
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise ConfigError(f"{owner}.layers={layers!r}: expected an int, a list of ints or a range 'a-b'")
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        out: list[int] = []
        for part in layers.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise ConfigError(f"{owner}.layers={layers!r}: expected ints or inclusive ranges like '0-3,6'")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ConfigError(f"{owner}.layers={layers!r}: range {lo}-{hi} is empty")
            out.extend(range(lo, hi + 1))
        return sorted(set(out))
    if isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return sorted(set(layers))
    raise ConfigError(f"{owner}.layers={layers!r}: expected an int, a list of ints or a range 'a-b'")


def check_field(ok: bool, owner: Any, name: str, expected: str) -> None:
    """Raise ConfigError naming `owner.name`, its value and what was expected, unless `ok`."""
    if not ok:
        raise ConfigError(f"{type(owner).__name__}.{name}={getattr(owner, name)!r}: expected {expected}")


__all__ = ["MethodConfig", "config_from_dict", "config_class", "load_config", "register_config", "field"]
