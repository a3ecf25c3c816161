"""From a TrainConfig to ready parts: tokenizer, tokenized train/eval examples, base model, adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from slimtune.train.config import TrainConfig
from slimtune.train.data import build_examples, generative_example, label_names, load_splits
from slimtune.train.evaluate import answer_ids, evaluate
from slimtune.train.models import load_base_model, load_tokenizer

log = logging.getLogger(__name__)
CLASSIFIER_HEADS = ("classifier", "score")  # head module names of HF sequence-classification models


@dataclass
class TaskData:
    """Tokenized data of one run."""

    train: list[dict]
    eval: list[dict]
    labels: list[str] = field(default_factory=list)  # class names (classification tasks)
    candidates: list[list[int]] = field(default_factory=list)  # answer ids per label (generative)
    eval_records: list[dict] = field(default_factory=list)


def load_data(cfg: TrainConfig, tokenizer) -> TaskData:
    """Read, split and tokenize the data of ``cfg``."""
    d = cfg.data
    train_records, eval_records = load_splits(d)
    names = label_names(train_records + eval_records, d) if d.task.endswith("classification") else []
    train = build_examples(train_records, tokenizer, d, names)
    held = build_examples(eval_records, tokenizer, d, names)
    candidates: list[list[int]] = []
    if d.task == "generative_classification":
        probe = dict(eval_records[0])  # the answer renders the same after any prompt (it follows a newline)
        candidates = []
        for name in names:
            probe[d.label_field] = name
            candidates.append(answer_ids(generative_example(tokenizer, probe, names, d)))
    log.info("data: %d train / %d eval examples (%s)", len(train), len(held), d.task)
    return TaskData(train, held, names, candidates, eval_records)


def model_kind(cfg: TrainConfig) -> str:
    return "sequence_classification" if cfg.data.task == "classification" else "causal_lm"


def build_model(cfg: TrainConfig, data: TaskData, base: nn.Module | None = None, pad: int = 0):
    """Load the base model (unless given) and attach the configured method; returns the TunedModel.

    `pad`: the tokenizer's padding id, for the calibration batches of methods that need data."""
    import slimtune as st

    if base is None:
        n_labels = cfg.model.num_labels or (len(data.labels) if data.labels else None)
        base = load_base_model(cfg.model.name, model_kind(cfg), num_labels=n_labels, dtype=cfg.model.dtype,
                               quantize=cfg.model.quantize)
    if isinstance(base, st.TunedModel):
        return base
    if cfg.train.gradient_checkpointing:
        # transformers >= 5.x renamed it; 4.57 only has the old name. Non-reentrant: works with frozen inputs.
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method = dict(cfg.method)
    if cfg.data.task == "classification" and not method.get("modules_to_save"):
        heads = [n for n in CLASSIFIER_HEADS if isinstance(getattr(base, n, None), nn.Module)]
        method["modules_to_save"] = heads  # a fresh classification head must be trained too
    config = st.config_from_dict(method)
    needs_data = st.METHODS[config.method].method.needs_data
    return st.attach(base, config, data=calibration_batches(cfg, data, base, pad) if needs_data else None)


def calibration_batches(cfg: TrainConfig, data: TaskData, base: nn.Module, pad: int) -> list[dict]:
    """The first `train.calibration_batches` training batches (in data order), on the base's device."""
    from slimtune.train.data import collate

    device = next(base.parameters()).device
    size, count = cfg.train.batch_size, cfg.train.calibration_batches
    rows = data.train[: size * count]
    batches = [collate(rows[i : i + size], pad) for i in range(0, len(rows), size)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def eval_metrics(model: nn.Module, cfg: TrainConfig, data: TaskData, tokenizer) -> dict[str, float]:
    """Metrics of ``model`` on the eval examples of ``data``."""
    return evaluate(model, data.eval, cfg.data.task, pad_id(tokenizer), n_classes=len(data.labels),
                    candidates=data.candidates, batch_size=max(cfg.train.batch_size, 8))


__all__ = ["TaskData", "build_model", "eval_metrics", "load_data", "load_tokenizer", "model_kind", "pad_id"]
