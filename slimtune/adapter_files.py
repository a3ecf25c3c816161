"""The model side of adapter files: which tensors make up an adapter, on-disk names, strict loading.

Keys on disk follow HF PEFT: module tensors are `base_model.model.<module>.<PEFT suffix>`
(`...q_proj.lora_A.weight`), input-method tensors have no prefix (`prompt_embeddings`),
selected base tensors keep the base parameter's name (`...c_attn.base_layer.bias`), sparse ones as
`<name>.sparse_index` + `<name>.sparse_values`. Loading matches names with wrappers stripped, so a
tensor saved beside other adapters loads into a model that has none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune import __version__
from slimtune.bases import base_kind, kind_of
from slimtune.config import MethodConfig, config_from_dict
from slimtune.errors import AdapterLoadError, ConfigError, did_you_mean
from slimtune.io import read_adapter_dir, write_adapter_dir
from slimtune.layer import base_name, is_adapter_tensor
from slimtune.methods.base import METHODS, PEFT_PREFIX, PEFT_SHORT_PREFIX, PeftContext, method_for_peft_type
from slimtune.selection import TunedEntries


@dataclass
class Slot:
    """One tensor of an adapter: the live tensor, and the sizes that come from the base (for diagnosis)."""

    tensor: Tensor
    base_dims: set[int] = field(default_factory=set)
    entries: TunedEntries | None = None  # sparse selections: resized to the file's entry count on load


def canonical(key: str) -> str:
    """A key with the PEFT prefix and slimtune/PEFT wrapper levels removed."""
    for prefix in (PEFT_PREFIX, PEFT_SHORT_PREFIX):
        if key.startswith(prefix):
            return base_name(key[len(prefix):])
    return base_name(key)


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base's tensor names and shapes (wrappers stripped)."""
    h = hashlib.sha256()
    for n, p in model.state_dict().items():
        if not is_adapter_tensor(n):
            h.update(f"{canonical(n)}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def adapter_slots(tuned, name: str, export: bool = False) -> dict[str, Slot]:
    """On-disk key -> Slot for every tensor of adapter `name` (export=True: as written to files)."""
    slots: dict[str, Slot] = {}
    prefix = METHODS[tuned.configs[name].method].method.module_prefix
    for module_name, layer in tuned._layers(named=True):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            dims = set(kind_of(layer.base_layer).sizes(layer.base_layer))
            tensors = adapter.export_tensors() if export else dict(adapter.state_dict(keep_vars=True))
            for tname, t in tensors.items():
                slots[f"{prefix}{module_name}.{adapter.peft_keys.get(tname, tname)}"] = Slot(t, dims)
    for module_name, saved in tuned._saved_modules(named=True):
        if name in saved.modules_to_save:
            for tname, t in saved.modules_to_save[name].state_dict(keep_vars=True).items():
                slots[f"{prefix}{module_name}.{tname}"] = Slot(t, set(t.shape))
    keys = METHODS[tuned.configs[name].method].method.tensor_keys
    if name in tuned.inputs:
        for tname, t in tuned.inputs[name].export_tensors().items():
            slots[keys.get(tname, tname)] = Slot(t, {t.shape[-1]})
    if name in tuned.shared:
        for tname, t in tuned.shared[name].state_dict(keep_vars=True).items():
            slots[keys.get(tname, tname)] = Slot(t, set())
    selection_key = METHODS[tuned.configs[name].method].method.selection_key
    names = {id(p): n for n, p in tuned.model.named_parameters()}
    for selected in tuned._selected.values():
        entries = selected.entries.get(name)
        if entries is None:
            continue
        pname = prefix + selection_key(names[id(selected.base)])
        if entries.sparse:
            index = _compact_index(entries.index, selected.base.numel()) if export else entries.index
            slots[pname + ".sparse_index"] = Slot(index, set(), entries)
            slots[pname + ".sparse_values"] = Slot(entries.values, set(), entries)
        else:
            slots[pname] = Slot(entries.values, set(entries.values.shape))
    return slots


def _compact_index(index: Tensor, numel: int) -> Tensor:
    """Flat indices as int32 on disk where the tensor allows (files 8 instead of 12 bytes per tuned entry);
    loading widens them back to int64."""
    return index.to(torch.int32) if numel < 2**31 else index


def load_tensors(tuned, name: str, tensors: dict[str, Tensor], source: str, allow_nonfinite: bool = False) -> None:
    """Copy `tensors` into adapter `name`, checking every name, size and value first.

    Raises:
        AdapterLoadError: an unknown, missing, empty, non-finite or wrongly shaped tensor, with a
            diagnosis (another base, an inconsistent file, unsaved ZeRO-3 shards).
    """
    slots = {canonical(k): s for k, s in adapter_slots(tuned, name).items()}
    given = {_legacy_saved_key(canonical(k), slots): v for k, v in tensors.items()}
    fingerprint = base_fingerprint(tuned.model)
    resized = False
    for key, value in given.items():
        if key not in slots:
            raise AdapterLoadError(f"{source}: tensor {key!r} matches nothing in this {type(tuned.model).__name__} "
                                   f"(fingerprint {fingerprint})." + did_you_mean(key, slots))
        slot = slots[key]
        _check_values(key, value, source, allow_nonfinite, expect_empty=slot.tensor.numel() == 0)
        if slot.entries is not None and key.endswith(".sparse_index") and slot.entries.index.numel() != value.numel():
            slot.entries.resize(value.numel())
            resized = True
    if resized:  # sparse entries got new tensors
        slots = {canonical(k): s for k, s in adapter_slots(tuned, name).items()}
    for key, value in given.items():
        _check_shape(key, value, slots[key], source, fingerprint)
    missing = [k for k in slots if k not in given]
    if missing:
        raise AdapterLoadError(f"{source}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
    with torch.no_grad():
        for key, value in given.items():
            slots[key].tensor.copy_(value.to(slots[key].tensor.dtype))


def _check_values(key: str, value: Tensor, source: str, allow_nonfinite: bool, expect_empty: bool) -> None:
    """Refuse non-finite values, and empty tensors where the model expects numbers (a rank pruned to
    zero is a legitimately empty tensor)."""
    if value.numel() == 0 and not expect_empty:
        raise AdapterLoadError(f"{source}: tensor {key!r} is empty (shape {tuple(value.shape)}). Files like this "
                               "come from DeepSpeed ZeRO-3 runs that saved without gathering the parameters; "
                               "save again with the parameters gathered\n"
                               "(e.g. stage3_gather_16bit_weights_on_model_save).")
    if value.is_floating_point() and not allow_nonfinite and not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise AdapterLoadError(f"{source}: tensor {key!r} holds {bad} NaN/inf value(s); the run that saved it "
                               "diverged. Pass allow_nonfinite=True to load it anyway.")


def _check_shape(key: str, value: Tensor, slot: Slot, source: str, fingerprint: str) -> None:
    got, want = tuple(value.shape), tuple(slot.tensor.shape)
    if got == want:
        return
    differing = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
    if len(got) == len(want) and all(want[i] not in slot.base_dims for i in differing):
        raise AdapterLoadError(f"{source}: inconsistent adapter file: tensor {key!r} is {got} but the file's own "
                               f"config builds {want} (e.g. its rank disagrees with its tensors); the config and "
                               "weights come from different runs.")
    raise AdapterLoadError(f"{source}: tensor {key!r} is {got}, this model expects {want}; the adapter was made "
                           f"for another base (this base's fingerprint: {fingerprint}).")


def _legacy_saved_key(key: str, slots: dict[str, Slot]) -> str:
    """PEFT's older modules_to_save layout: '<m>.modules_to_save.<name>.weight' -> '<m>.weight'."""
    if ".modules_to_save." in key and key not in slots:
        head, _, tail = key.partition(".modules_to_save.")
        return f"{head}.{tail.partition('.')[2]}"
    return key


# -- configs --------------------------------------------------------------------------------------
def peft_context(tuned, name: str) -> PeftContext:
    from slimtune.targets import base_modules

    targets = [n for n, layer in tuned._layers(named=True) if name in layer.adapters]
    kinds = {kind_of(tuned.model.get_submodule(t).base_layer).name for t in targets}
    leaves = sorted({t.split(".")[-1] for t in targets})
    picked = {n for n, m in base_modules(tuned.model) if n.split(".")[-1] in leaves and base_kind(m)}
    saved = [n for n, m in tuned._saved_modules(named=True) if name in m.modules_to_save]
    return PeftContext(
        task_type=_task_type(tuned.model),
        base_model_name_or_path=_name_or_path(tuned.model),
        target_modules=(leaves if picked == set(targets) else sorted(targets)) if targets else None,
        targets=targets,
        target_kinds=kinds,
        modules_to_save=saved or None,
        model=tuned.model,
    )


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def config_from_json(raw: dict[str, Any]) -> MethodConfig:
    """Our config from an adapter_config.json in either format (HF PEFT's via the owning method)."""
    if "peft_type" in raw:
        return method_for_peft_type(raw["peft_type"]).from_peft(raw)
    return config_from_dict(raw["config"])


def read_adapter(path: str | Path) -> tuple[MethodConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, raw config json, tensors) of an adapter folder in either format."""
    raw, tensors = read_adapter_dir(path)
    return config_from_json(raw), raw, tensors


def save(tuned, name: str, path: Path, format: str = "slimtune") -> None:
    """Write adapter `name` as a folder, in our format or HF PEFT's."""
    if format not in ("slimtune", "peft"):
        raise ConfigError(f"format={format!r}: expected 'slimtune' or 'peft'")
    cfg = METHODS[tuned.configs[name].method].method.saved_config(tuned.configs[name], tuned.view(name))
    method = METHODS[cfg.method].method  # the saved config's method owns the file (it may be another method)
    tensors = {k: s.tensor for k, s in adapter_slots(tuned, name, export=True).items()}
    if format == "peft":
        config = method.to_peft(cfg, peft_context(tuned, name))
    else:
        config = {
            "slimtune_version": __version__,
            "config": cfg.to_dict(),
            "base_model_class": type(tuned.model).__name__,
            "base_model_name_or_path": _name_or_path(tuned.model),
            "base_fingerprint": base_fingerprint(tuned.model),
            "targets_resolved": [n for n, layer in tuned._layers(named=True) if name in layer.adapters],
        }
    write_adapter_dir(path, config, tensors)


# -- a grown vocabulary -------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.txt", "chat_template.jinja")


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """Write `tokenizer`'s files into the adapter folder `path` (each one atomically)."""
    import tempfile

    from slimtune.io import atomic_write_bytes

    with tempfile.TemporaryDirectory(dir=path) as tmp:
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            if f.is_file():
                atomic_write_bytes(path / f.name, f.read_bytes())


def match_vocabulary(model: nn.Module, path: Path) -> None:
    """Resize `model`'s token embeddings to the tokenizer saved in the adapter folder `path`, if any.

    Raises:
        AdapterLoadError: the sizes differ and the model cannot resize (or its embeddings are wrapped).
    """
    if not path.is_dir() or not any((path / f).exists() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    wanted = len(AutoTokenizer.from_pretrained(str(path)))
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None or rows >= wanted:  # a model larger than its tokenizer (padding rows) is left alone
        return
    if not hasattr(model, "resize_token_embeddings"):
        raise AdapterLoadError(f"{path}: its tokenizer has {wanted} tokens but this {type(model).__name__} has "
                               f"{rows} embedding rows and cannot resize them")
    model.resize_token_embeddings(wanted)


__all__ = ["adapter_slots", "base_fingerprint", "canonical", "config_from_json", "is_adapter_tensor", "load_tensors",
           "match_vocabulary", "read_adapter", "save", "save_tokenizer"]
