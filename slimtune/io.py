"""Adapter files: our format and HF PEFT's, safetensors only, atomic writes, strict loading.

Both formats store tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`, ...), so
a slimtune adapter and a PEFT adapter differ only in `adapter_config.json`. See docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune import __version__
from slimtune.config import MethodConfig, config_from_dict
from slimtune.errors import AdapterLoadError, ConfigError, did_you_mean
from slimtune.layer import AdapterLayer, SavedModule
from slimtune.methods.base import METHODS
from slimtune.targets import WRAPPABLE, is_conv1d_gpt2

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
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


# -- which tensors make up an adapter ----------------------------------------------------------
def _adapter_slots(tuned, name: str, for_export: bool = False) -> dict[str, Tensor]:
    """key (module name + PEFT suffix) -> the live tensor, for every tensor of adapter `name`."""
    slots: dict[str, Tensor] = {}
    cfg = tuned.configs[name]
    for module_name, module in tuned.model.named_modules():
        if isinstance(module, AdapterLayer) and name in module.adapters:
            adapter = module.adapters[name]
            tensors = adapter.export_tensors() if for_export and hasattr(adapter, "export_tensors") else \
                dict(adapter.state_dict(keep_vars=True))
            for tname, t in tensors.items():
                slots[f"{module_name}.{adapter.peft_keys.get(tname, tname)}"] = t
            if getattr(cfg, "bias", "none") == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                slots[f"{module_name}.base_layer.bias"] = module.base_layer.bias
        elif isinstance(module, SavedModule) and name in module.modules_to_save:
            for tname, t in module.modules_to_save[name].state_dict(keep_vars=True).items():
                slots[f"{module_name}.{tname}"] = t
    if getattr(cfg, "bias", "none") == "all":
        for pname, p in tuned.model.named_parameters():
            if pname.endswith("bias") and ".adapters." not in pname and ".modules_to_save." not in pname:
                slots[pname] = p
    return slots


def adapter_tensors(tuned, name: str) -> dict[str, Tensor]:
    """Detached copies of adapter `name`'s tensors, keyed as in memory (no PEFT prefix)."""
    return {k: v.detach().clone() for k, v in _adapter_slots(tuned, name).items()}


def load_tensors_into(tuned, name: str, tensors: dict[str, Tensor], source: str) -> None:
    """Copy `tensors` into adapter `name`, checking every name and shape first.

    Raises:
        AdapterLoadError: an unknown, missing or wrongly shaped tensor (named, with both shapes).
    """
    slots = _adapter_slots(tuned, name)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    tensors = {_legacy_saved_key(k, slots): v for k, v in tensors.items()}
    fingerprint = base_fingerprint(tuned.model)
    for key, value in tensors.items():
        if key not in slots:
            raise AdapterLoadError(f"{source}: tensor {key!r} matches nothing in this "
                                   f"{type(tuned.model).__name__} (fingerprint {fingerprint})."
                                   + did_you_mean(key, slots))
        if tuple(value.shape) != tuple(slots[key].shape):
            raise AdapterLoadError(f"{source}: tensor {key!r} is {tuple(value.shape)}, this model expects "
                                   f"{tuple(slots[key].shape)}; the adapter was made for another base "
                                   f"(this base's fingerprint: {fingerprint}).")
    missing = [k for k in slots if k not in tensors]
    if missing:
        raise AdapterLoadError(f"{source}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
    with torch.no_grad():
        for key, value in tensors.items():
            slots[key].copy_(value.to(slots[key].dtype))


def _legacy_saved_key(key: str, slots: dict[str, Tensor]) -> str:
    """PEFT's older modules_to_save layout: '<m>.modules_to_save.<name>.weight' -> '<m>.weight'."""
    if ".modules_to_save." in key and key not in slots:
        head, _, tail = key.partition(".modules_to_save.")
        return f"{head}.{tail.partition('.')[2]}"
    return key


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base's tensor names and shapes (wrappers stripped)."""
    h = hashlib.sha256()
    for n, p in model.state_dict().items():
        if ".adapters." in n or ".modules_to_save." in n:
            continue
        n = n.replace(".base_layer.", ".").replace(".original_module.", ".")
        h.update(f"{n}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


# -- configs: ours and PEFT's -------------------------------------------------------------------
def _target_names(tuned, name: str) -> list[str]:
    return [n for n, m in tuned.model.named_modules() if isinstance(m, AdapterLayer) and name in m.adapters]


def _peft_target_modules(tuned, targets: list[str]) -> list[str]:
    """Leaf names when they pick exactly `targets` (what vLLM expects), else full names."""
    from slimtune.targets import _base_modules

    leaves = sorted({t.split(".")[-1] for t in targets})
    picked = {n for n, m in _base_modules(tuned.model) if isinstance(m, WRAPPABLE) and n.split(".")[-1] in leaves}
    return leaves if picked == set(targets) else sorted(targets)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def to_peft_config(tuned, name: str, cfg: MethodConfig) -> dict[str, Any]:
    info = METHODS[cfg.method]
    if info.peft_type != "LORA":
        raise NotImplementedError(f"format='peft' for method {cfg.method!r} is not implemented")
    targets = _target_names(tuned, name)
    conv1d = any(is_conv1d_gpt2(tuned.model.get_submodule(t).base_layer) for t in targets)
    saved = [n for n, m in tuned.model.named_modules() if isinstance(m, SavedModule) and name in m.modules_to_save]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(tuned.model),
        "base_model_name_or_path": getattr(getattr(tuned.model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_target_modules(tuned, targets),
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,
        "bias": cfg.bias,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.method == "dora",
        "modules_to_save": saved or None,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": cfg.rank_pattern or {},
        "alpha_pattern": cfg.alpha_pattern or {},
        "lora_bias": False,
        "use_qalora": False,
        "peft_version": "0.21.2",
    }


def from_peft_config(data: dict[str, Any]) -> MethodConfig:
    """Our config for an HF PEFT adapter_config.json (LoRA, rsLoRA, DoRA)."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise NotImplementedError(f"loading HF PEFT adapters of peft_type={peft_type!r} is not implemented yet "
                                  "(LORA is, including rsLoRA and DoRA)")
    for flag in ("lora_bias", "use_qalora"):
        if data.get(flag):
            raise NotImplementedError(f"PEFT adapter with {flag}=true is not supported")
    if data.get("target_parameters"):
        raise NotImplementedError("PEFT adapters with target_parameters are not supported")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian",):
        log.warning("adapter was initialised with %r; its base must be the matching residual model", init)
    targets = data.get("target_modules")
    return config_from_dict({
        "method": "dora" if data.get("use_dora") else "lora",
        "r": int(data.get("r", 8)),
        "alpha": float(data.get("lora_alpha", 8)),
        "dropout": float(data.get("lora_dropout", 0.0)),
        "rslora": bool(data.get("use_rslora", False)),
        "bias": data.get("bias", "none"),
        "targets": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
        "exclude": data.get("exclude_modules"),
        "layers": data.get("layers_to_transform"),
        "modules_to_save": data.get("modules_to_save"),
        "rank_pattern": data.get("rank_pattern") or None,
        "alpha_pattern": data.get("alpha_pattern") or None,
    })


# -- save / load ---------------------------------------------------------------------------------
def save_adapter(tuned, name: str, path: Path, format: str = "slimtune") -> None:
    if format not in ("slimtune", "peft"):
        raise ConfigError(f"format={format!r}: expected 'slimtune' or 'peft'")
    cfg = tuned.configs[name]
    if hasattr(cfg, "as_rank_doubled") and (cfg.init.startswith("pissa") or cfg.init == "olora"):
        cfg = cfg.as_rank_doubled()  # tensors below are exported as the equivalent rank-2r LoRA
    tensors = {PREFIX + k: v for k, v in _adapter_slots(tuned, name, for_export=True).items()}
    if format == "peft":
        config = to_peft_config(tuned, name, cfg)
    else:
        config = {
            "slimtune_version": __version__,
            "config": cfg.to_dict(),
            "base_model_class": type(tuned.model).__name__,
            "base_model_name_or_path": getattr(getattr(tuned.model, "config", None), "_name_or_path", None) or None,
            "base_fingerprint": base_fingerprint(tuned.model),
            "targets_resolved": _target_names(tuned, name),
        }
    path = Path(path)
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME)
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def read_adapter_dir(path: str | Path) -> tuple[MethodConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, raw config json, tensors) of an adapter folder in either format.

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
    if "peft_type" in raw:
        cfg = from_peft_config(raw)
    elif "config" in raw:
        cfg = config_from_dict(raw["config"])
    else:
        raise AdapterLoadError(f"{path / CONFIG_NAME}: neither a slimtune nor an HF PEFT adapter config")
    return cfg, raw, read_safetensors(weights)


def load(model: nn.Module, path: str | Path, name: str = "default"):
    """Attach the adapter(s) saved at `path` (ours or HF PEFT's) to `model`.

    Subfolders holding an adapter (as `save()` writes for extra adapters) load under their folder name.
    Returns the TunedModel.
    """
    from slimtune.tuned import TunedModel

    path = Path(path)
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    entries = [(name, path)]
    if path.is_dir():
        entries += sorted((p.name, p) for p in path.iterdir() if (p / CONFIG_NAME).exists())
    for adapter_name, folder in entries:
        cfg, raw, tensors = read_adapter_dir(folder)
        theirs = raw.get("base_fingerprint")
        if "peft_type" in raw and cfg.modules_to_save:  # PEFT lists heads of every task type; keep ours
            names = [n for n, _ in tuned.model.named_modules()]
            kept = [e for e in cfg.modules_to_save if any(n == e or n.endswith("." + e) for n in names)]
            cfg = cfg.replace(modules_to_save=list(dict.fromkeys(kept)) or None)
        tuned.add(cfg, adapter_name, init=False)
        try:
            load_tensors_into(tuned, adapter_name, tensors, source=str(folder))
        except AdapterLoadError as e:
            tuned.delete(adapter_name)
            if theirs and theirs != base_fingerprint(tuned.model):
                raise AdapterLoadError(f"{e} Adapter base_fingerprint {theirs} differs.") from None
            raise
    return tuned
