"""Adapter folders on disk: safetensors only (pickle is refused), JSON configs, atomic writes.

This module reads and writes bytes; what the tensors mean for a model lives on the model side
(slimtune/adapter_files.py). A folder holds `adapter_config.json` (our format or HF PEFT's) and
`adapter_model.safetensors`. See docs/formats.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from slimtune.errors import AdapterLoadError, AdapterSaveError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


# -- atomic writes -------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata={"format": "pt", **(metadata or {})}))


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning corrupt/truncated files into AdapterLoadError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def read_adapter_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(raw config json, tensors) of an adapter folder in either format.

    Raises:
        AdapterLoadError: missing files, pickle-only weights, bad JSON or a corrupt tensor file.
    """
    path = Path(path)
    if path.is_file() and path.suffix in _PICKLE_SUFFIXES:
        raise AdapterLoadError(f"{path}: pickle files are refused (they can run code); "
                               "convert it to adapter_model.safetensors")
    if not path.is_dir():
        raise AdapterLoadError(f"{path}: no such adapter folder")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise AdapterLoadError(f"{path}: only pickle weights found ({', '.join(pickles)}); pickle files are "
                                   f"refused (they can run code). Re-save them as {WEIGHTS_NAME}.")
        raise AdapterLoadError(f"{path}: {WEIGHTS_NAME} not found")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: {CONFIG_NAME} not found") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path / CONFIG_NAME}: invalid JSON ({e})") from None
    if not isinstance(raw, dict) or ("peft_type" not in raw and "config" not in raw):
        raise AdapterLoadError(f"{path / CONFIG_NAME}: neither a slimtune nor an HF PEFT adapter config")
    return raw, read_safetensors(weights)


def write_adapter_dir(path: str | Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write an adapter folder atomically (weights first, then the config that names them).

    Raises:
        AdapterSaveError: `path` is an existing file, or a folder cannot be created there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterSaveError(f"{path}: is an existing file; an adapter is saved as a folder, pick another path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise AdapterSaveError(f"{path}: {parent} is a file, so no folder can be created there")
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME)
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return path
