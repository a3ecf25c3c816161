"""The main job: fine-tune a real packaged model on real packaged data, and report before vs after.

``topic`` (default): SmolLM2-135M-Instruct (converted from the packaged GGUF on first use) learns
BBC News topic classification posed as generation: the article's start, then a question, and the
answer is the topic word. Accuracy is measured on held-out articles by first-token scoring (the
logits of the five topic words' first tokens right after the prompt), before and after LoRA.

``sentiment``: all-MiniLM-L6-v2 with a fresh classification head learns Rotten Tomatoes sentence
polarity (LoRA on query/value + the head); accuracy on held-out sentences.

Both write ``report.md``, ``report.json``, plots, metrics and the adapter to the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from slimtune.train.config import TrainConfig

log = logging.getLogger(__name__)

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
TOPIC_PROMPT = ("{text}\n\nWhich topic is this news article about? "
                "Answer with one word: business, entertainment, politics, sports or tech.")


def topic_config(output_dir: str, steps: int = 36, eval_per_label: int = 40) -> TrainConfig:
    """BBC News topic classification as generation, on SmolLM2-135M-Instruct."""
    return TrainConfig.from_dict({
        "model": {"name": "smollm2"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "data": {"task": "generative_classification", "train": "packaged:bbc_news", "labels": TOPICS,
                 "prompt": TOPIC_PROMPT, "max_text_tokens": 64, "max_length": 256,
                 "per_label_eval": eval_per_label, "seed": 0},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 3, "scheduler": "linear",
                  "grad_clip": 1.0, "seed": 0, "eval_every": steps // 2, "save_every": 0, "keep_last": 1},
        "output_dir": output_dir,
    })


def sentiment_config(output_dir: str, steps: int = 150, eval_per_label: int = 100) -> TrainConfig:
    """Rotten Tomatoes sentence polarity, on all-MiniLM-L6-v2 with a classification head."""
    return TrainConfig.from_dict({
        "model": {"name": "minilm"},
        "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]},
        "data": {"task": "classification", "train": "packaged:rotten_tomatoes", "labels": ["negative", "positive"],
                 "max_length": 64, "per_label_eval": eval_per_label, "seed": 0},
        "train": {"max_steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "scheduler": "linear",
                  "seed": 0, "eval_every": max(1, steps // 6), "keep_last": 1},
        "output_dir": output_dir,
    })


TASKS = {
    "topic": ("BBC News topic classification as generation (5 topics)", topic_config),
    "sentiment": ("Rotten Tomatoes sentence polarity (sequence classification)", sentiment_config),
}


@torch.no_grad()
def sample_generations(trainer, n: int = 5, max_new_tokens: int = 6) -> list[dict[str, Any]]:
    """Greedy answers of the base and the adapted model to the first eval article of each label."""
    from slimtune.train.setup import pad_id

    data, tok, model = trainer.data, trainer.tokenizer, trainer.model
    picked, seen = [], set()
    for ex, rec in zip(data.eval, data.eval_records, strict=True):
        if ex["label"] not in seen:
            seen.add(ex["label"])
            picked.append((ex, rec))
        if len(picked) == n:
            break
    model.eval()
    out = []
    for ex, rec in picked:
        ids = torch.tensor([ex["prompt_ids"]], device=trainer.device)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id(tok)}
        with model.disabled():
            before = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        after = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        title = rec["text"].strip().splitlines()[0][:80]
        out.append({"title": title, "label": data.labels[ex["label"]],
                    "before": tok.decode(before[0, ids.shape[1]:], skip_special_tokens=True).strip(),
                    "after": tok.decode(after[0, ids.shape[1]:], skip_special_tokens=True).strip()})
    return out


def run_demo(task: str = "topic", output_dir: str | None = None, steps: int | None = None,
             eval_per_label: int | None = None) -> dict[str, Any]:
    """Run one demo task end to end and write its report; returns the report dict."""
    from slimtune.train.models import smollm2_path
    from slimtune.train.trainer import Trainer

    wall0 = time.perf_counter()
    description, make_config = TASKS[task]
    output_dir = output_dir or ("runs/demo" if task == "topic" else f"runs/demo-{task}")
    kwargs = {k: v for k, v in (("steps", steps), ("eval_per_label", eval_per_label)) if v is not None}
    cfg = make_config(output_dir, **kwargs)
    convert_seconds = 0.0
    if task == "topic":
        t = time.perf_counter()
        smollm2_path()  # converts the packaged GGUF once; cached afterwards
        convert_seconds = time.perf_counter() - t
    trainer = Trainer(cfg)
    summary = trainer.train()
    samples = sample_generations(trainer) if task == "topic" else []
    before, after = summary["eval"]["base"], summary["eval"]["adapted"]
    report = {
        "task": description,
        "metric": "accuracy" + (" (first-token scoring of the 5 topic words after the prompt)" if task == "topic"
                                else " (argmax of the classification head)"),
        "before": round(before["accuracy"], 4),
        "after": round(after["accuracy"], 4),
        "n_eval": after["n"],
        "trainable_params": summary["trainable_params"],
        "train_seconds": summary["train_seconds"],
        "macro_f1_before": round(before["macro_f1"], 4),
        "macro_f1_after": round(after["macro_f1"], 4),
        "model": cfg.model.name,
        "method": cfg.method,
        "steps": summary["steps"],
        "batch_size": cfg.train.batch_size,
        "convert_seconds": round(convert_seconds, 2),
        "wall_seconds": round(time.perf_counter() - wall0, 2),
        "torch_threads": torch.get_num_threads(),
        "samples": samples,
        "adapter": str(Path(output_dir) / "adapter"),
    }
    write_report(Path(output_dir), report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# slimtune demo: {report['task']}", "",
        f"- model: `{report['model']}`, method: `{json.dumps(report['method'])}`",
        f"- metric: {report['metric']}, on {report['n_eval']} held-out examples",
        "", "| | accuracy | macro-F1 |", "|---|---|---|",
        f"| before (base) | {report['before']:.1%} | {report['macro_f1_before']:.3f} |",
        f"| after (LoRA) | {report['after']:.1%} | {report['macro_f1_after']:.3f} |", "",
        f"- trainable parameters: {report['trainable_params']:,}",
        f"- training: {report['steps']} steps x batch {report['batch_size']}, {report['train_seconds']:.0f} s "
        f"on {report['torch_threads']} CPU threads",
        f"- wall time: {report['wall_seconds']:.0f} s"
        + (f" (first-use model conversion {report['convert_seconds']:.0f} s)" if report["convert_seconds"] > 1 else ""),
        f"- adapter: `{report['adapter']}`; plots: `plots/loss.png`, `plots/lr.png`, `plots/eval.png`",
    ]
    if report["samples"]:
        lines += ["", "## Sample generations (greedy, held-out articles)", "",
                  "| article | topic | before | after |", "|---|---|---|---|"]
        for s in report["samples"]:
            cells = [s["title"], s["label"], s["before"], s["after"]]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
