"""Evaluation: LM loss/perplexity, classification accuracy and macro-F1, generative classification.

Generative classification is scored without sampling: after the prompt, the model's logits for
each label's first answer token are compared and the largest wins ("first-token scoring"). When
two labels share a first token, each label's whole answer is scored by its summed log-probability
instead. Both read the same forward pass a greedy decoder would, so they agree with greedy
decoding whenever greedy decoding outputs one of the labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.train.data import IGNORE, collate


def accuracy(preds: list[int], golds: list[int]) -> float:
    """Fraction of positions where ``preds`` equals ``golds``."""
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / max(len(golds), 1)


def macro_f1(preds: list[int], golds: list[int], n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); a class absent from both counts 0."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_classes


def _batches(examples: list[dict], size: int):
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def lm_loss(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token loss over the labelled positions, and its perplexity."""
    total, count = 0.0, 0
    dev = _device(model)
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()  # (B, T-1, V): position t predicts t+1
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def classify(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 16) -> list[int]:
    """Predicted class per example of a sequence-classification model."""
    preds: list[int] = []
    dev = _device(model)
    for chunk in _batches(examples, batch_size):
        batch = collate([{"input_ids": e["input_ids"]} for e in chunk], pad_id)
        preds += model(**{k: v.to(dev) for k, v in batch.items()}).logits.argmax(-1).tolist()
    return preds


def answer_ids(example: dict) -> list[int]:
    """The answer tokens of a generative example: what follows its prompt in ``input_ids``."""
    return example["input_ids"][len(example["prompt_ids"]) :]


@torch.no_grad()
def classify_generative(model: nn.Module, examples: list[dict], candidates: list[list[int]], pad_id: int,
                        batch_size: int = 16) -> list[int]:
    """Predicted label per example, from the logits after its prompt (see the module docstring).

    Args:
        candidates: per label, the answer token ids (as rendered after the generation prompt).
    """
    firsts = [c[0] for c in candidates]
    dev = _device(model)
    preds: list[int] = []
    if len(set(firsts)) == len(firsts):
        for chunk in _batches(examples, batch_size):
            batch = collate([{"input_ids": e["prompt_ids"]} for e in chunk], pad_id, side="left")
            logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits[:, -1]  # (B, V) next token
            preds += logits[:, firsts].argmax(-1).tolist()
        return preds
    for e in examples:  # shared first tokens: score each whole answer
        rows = [{"input_ids": e["prompt_ids"] + c, "labels": [IGNORE] * len(e["prompt_ids"]) + c}
                for c in candidates]
        batch = {k: v.to(dev) for k, v in collate(rows, pad_id).items()}
        labels = batch.pop("labels")[:, 1:]
        logp = model(**batch).logits[:, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        preds.append(int((picked * (labels != IGNORE)).sum(-1).argmax()))
    return preds


def evaluate(model: nn.Module, examples: list[dict], task: str, pad_id: int, n_classes: int = 0,
             candidates: list[list[int]] | None = None, batch_size: int = 8) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` for ``task`` (loss/perplexity or accuracy/macro-F1)."""
    was_training = model.training
    model.eval()
    try:
        if task in ("causal_lm", "instruction"):
            return lm_loss(model, examples, pad_id, batch_size)
        if task == "classification":
            preds = classify(model, examples, pad_id, batch_size)
        else:
            preds = classify_generative(model, examples, candidates or [], pad_id, batch_size)
        golds = [e["label"] for e in examples]
        return {"accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds, n_classes), "n": len(golds)}
    finally:
        model.train(was_training)


def label_candidates(examples_for: Callable[[int], dict], n_classes: int) -> list[list[int]]:
    """Answer token ids of each label, taken from a generative example built with that label."""
    return [answer_ids(examples_for(k)) for k in range(n_classes)]


def base_vs_adapted(model, evaluate_fn: Callable[[nn.Module], dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{"base": ..., "adapted": ...}``: ``evaluate_fn`` with the adapters disabled, then enabled."""
    with model.disabled():
        base = evaluate_fn(model)
    return {"base": base, "adapted": evaluate_fn(model)}

