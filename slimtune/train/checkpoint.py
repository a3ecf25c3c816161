"""Training checkpoints: ``run_dir/checkpoints/step-N/``, written atomically, no pickle anywhere.

A checkpoint holds
    adapter/                   the adapter as ``TunedModel.save`` writes it (loadable with ``st.load``)
    params.safetensors         every trainable tensor by parameter name (exact resume)
    optimizer.safetensors      optimizer state tensors, keyed "<param index>.<name>"
    rng.safetensors            torch CPU (and CUDA) generator states
    state.json                 step, data position, optimizer param groups, counters
It is written to ``checkpoints/.tmp-step-N-<pid>/`` and then renamed, so a killed save leaves at
most a ``.tmp-*`` folder (removed on the next save) and never a partial ``step-N``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimtune.train.errors import CheckpointError

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"step-(\d+)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open a folder
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with path.open("rb") as f:
        os.fsync(f.fileno())


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-safe rest."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                plain[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": plain}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and prune to the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    model.save(tmp / "adapter")
    _save_tensors(dict(model.trainable_parameters()), tmp / "params.safetensors")
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _save_tensors(rng_tensors(), tmp / "rng.safetensors")
    with (tmp / "state.json").open("w") as f:
        json.dump({**state, "step": step, "optimizer": opt_meta}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable tensors, optimizer and RNG from a checkpoint; return its ``state.json``."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (state.json missing)")
    state = json.loads((path / "state.json").read_text())
    params = load_file(str(path / "params.safetensors"))
    current = dict(model.trainable_parameters())
    if set(params) != set(current):
        missing = sorted(set(current) - set(params)) or sorted(set(params) - set(current))
        raise CheckpointError(f"{path}: trainable tensors differ from this run's model (first: {missing[0]!r})")
    with torch.no_grad():
        for name, p in current.items():
            if params[name].shape != p.shape:
                raise CheckpointError(f"{path}: {name!r} is {tuple(params[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(params[name])
    optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    restore_rng(load_file(str(path / "rng.safetensors")))
    return state
