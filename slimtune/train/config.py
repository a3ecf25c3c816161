"""The training config: five sections (model, method, data, train, output_dir), validated up front.

Every section is a flat dataclass. ``TrainConfig.from_dict`` rejects unknown keys (naming the
closest valid one), checks each value's type against the field annotation, and each section's
``__post_init__`` checks ranges, so a typo fails in milliseconds, before any model is loaded.

YAML example (``examples/*.yaml`` has one per task type)::

    model: {name: smollm2}
    method: {method: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}
    data: {task: causal_lm, train: data/train.jsonl, max_length: 256}
    train: {max_steps: 100, batch_size: 8, lr: 1e-3}
    output_dir: runs/my-run
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError
from slimtune.train.errors import TrainConfigError, did_you_mean

TASKS = ("causal_lm", "instruction", "classification", "generative_classification")
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
_DEFAULT_METHOD = {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}


@dataclass
class ModelSection:
    name: str = "smollm2"  # HF folder / hub id (offline cache), or packaged "smollm2" / "minilm"
    dtype: str = "float32"  # storage dtype of the base weights
    num_labels: int | None = None  # classification head size; default: number of labels in the data
    quantize: str | None = None  # nf4 | fp4 | int8 | int4 ...: st.quantize the base (QLoRA); head stays float

    def __post_init__(self) -> None:
        from slimtune.quant import FORMAT_NAMES

        _check(self.dtype in ("float32", "bfloat16", "float16"), self, "dtype",
               "'float32', 'bfloat16' or 'float16'")
        _check(self.quantize is None or self.quantize in FORMAT_NAMES, self, "quantize",
               f"one of {list(FORMAT_NAMES)} or null." + did_you_mean(str(self.quantize), FORMAT_NAMES))


@dataclass
class DataSection:
    task: str = "causal_lm"  # one of TASKS
    train: str | None = None  # file / folder, or "packaged:bbc_news", "packaged:rotten_tomatoes", ...
    eval: str | None = None  # same forms; default: a held-out split of `train`
    format: str = "auto"  # auto | jsonl | json | csv | text | folder | datasets
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = None  # class names (label words for generative classification)
    prompt: str = "{text}"  # generative classification: user turn; {text} is the (truncated) input
    system: str | None = None  # system prompt for chat-template tasks (None: the template's default)
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    max_length: int = 512  # tokens per example (causal_lm: block size after packing)
    max_text_tokens: int | None = None  # generative classification: truncate the input text first
    eval_size: float = 0.1  # held-out split when `eval` is unset: a fraction, or a count if >= 1
    per_label_eval: int | None = None  # classification: hold out exactly this many per label
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0  # for the split and subsampling

    def __post_init__(self) -> None:
        _check(self.task in TASKS, self, "task", f"one of {list(TASKS)}" + did_you_mean(self.task, TASKS))
        formats = ("auto", "jsonl", "json", "csv", "text", "folder", "datasets")
        _check(self.format in formats, self, "format", f"one of {list(formats)}" + did_you_mean(self.format, formats))
        _check(self.max_length >= 8, self, "max_length", "an int >= 8")
        _check(self.eval_size > 0, self, "eval_size", "a fraction in (0, 1) or a count >= 1")
        _check("{text}" in self.prompt, self, "prompt", "a template containing '{text}'")
        if self.labels is not None:
            _check(len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels), self, "labels",
                   "at least two distinct label names")


@dataclass
class TrainSection:
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit | paged_adamw | sgd (slimtune/optim.py)
    loraplus_ratio: float | None = None  # LoRA+: LoRA's B tensors learn at lr * ratio (the paper: 16)
    scheduler: str = "linear"  # constant | linear | cosine (all after linear warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; adapter math stays in its dtype)
    gradient_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0  # steps between evals; 0 = only at the end
    eval_before: bool = True  # evaluate the base (adapter disabled) before training
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    max_bad_steps: int = 5  # consecutive non-finite losses before aborting
    progress: bool = True  # progress bar (rank 0 only)
    calibration_batches: int = 8  # training batches shown to methods that pick what to train from gradients

    def __post_init__(self) -> None:
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            _check(getattr(self, name) >= 0, self, name, "an int >= 0")
        for name in ("batch_size", "grad_accum", "log_every", "keep_last", "max_bad_steps", "calibration_batches"):
            _check(getattr(self, name) >= 1, self, name, "an int >= 1")
        _check(self.max_steps > 0 or self.epochs > 0, self, "epochs", "> 0 when max_steps is 0")
        _check(self.lr > 0, self, "lr", "a float > 0, e.g. 1e-4")
        _check(self.weight_decay >= 0, self, "weight_decay", "a float >= 0")
        _check(self.grad_clip >= 0, self, "grad_clip", "a float >= 0 (0 disables clipping)")
        _check(self.scheduler in SCHEDULERS, self, "scheduler",
               f"one of {list(SCHEDULERS)}" + did_you_mean(self.scheduler, SCHEDULERS))
        _check(self.precision in PRECISIONS, self, "precision", f"one of {list(PRECISIONS)}")
        _check(self.loraplus_ratio is None or self.loraplus_ratio > 0, self, "loraplus_ratio",
               "null (off) or a float > 0, e.g. 16")
        from slimtune.optim import check_optimizer

        try:
            check_optimizer(self.optimizer, "train.optimizer")
        except ConfigError as e:
            raise TrainConfigError(str(e)) from None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_METHOD))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/run"

    def __post_init__(self) -> None:
        import slimtune as st

        if not isinstance(self.method, dict):
            raise TrainConfigError(f"method={self.method!r}: expected a mapping like {{method: lora, r: 8}}")
        try:
            st.config_from_dict(self.method)  # validates the method section with the engine's own rules
        except TrainConfigError:
            raise
        except ValueError as e:
            raise TrainConfigError(f"method: {e}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from plain data (e.g. parsed YAML)."""
        if not isinstance(data, dict):
            raise TrainConfigError(f"config: expected a mapping with sections {_names(cls)}, got {data!r}")
        _reject_unknown(data, cls, "config")
        kwargs: dict[str, Any] = {}
        for name, section in (("model", ModelSection), ("data", DataSection), ("train", TrainSection)):
            if name in data:
                kwargs[name] = _section(section, data[name] or {}, name)
        if "method" in data:
            method = dict(data["method"] or {}) if isinstance(data["method"], dict) else data["method"]
            if isinstance(method, dict) and "method" not in method:  # e.g. only --set method.r=4
                method = {**_DEFAULT_METHOD, **method}
            kwargs["method"] = method
        if "output_dir" in data:
            kwargs["output_dir"] = _coerce(data["output_dir"], str, "output_dir")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML/JSON training config and apply ``key.sub=value`` overrides (``--set``)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise TrainConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: invalid YAML ({e})") from None
    return TrainConfig.from_dict(apply_overrides(data, overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with each ``a.b=value`` applied; the value is parsed as YAML (``true``, ``[1,2]``)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data


# -- validation helpers -------------------------------------------------------------------------------
def _check(ok: bool, owner: Any, name: str, expected: str) -> None:
    if not ok:
        section = type(owner).__name__.removesuffix("Section").lower()
        raise TrainConfigError(f"{section}.{name}={getattr(owner, name)!r}: expected {expected}")


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _reject_unknown(data: dict[str, Any], cls: type, where: str) -> None:
    valid = _names(cls)
    for key in data:
        if key not in valid:
            prefix = f"{where}." if where != "config" else ""
            raise TrainConfigError(f"{prefix}{key}: unknown key; valid keys: {', '.join(valid)}."
                                   + did_you_mean(str(key), valid))


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}={data!r}: expected a mapping of {', '.join(_names(cls))}")
    _reject_unknown(data, cls, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert int->float and numeric strings (YAML's 1e-3)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[-1] + (" or null" if type(None) in options else ""))
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single name where a list is expected
        if not isinstance(value, list):
            raise TrainConfigError(f"{where}={value!r}: expected a list")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where}={value!r}: expected a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise TrainConfigError(f"{where}={value!r}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")
