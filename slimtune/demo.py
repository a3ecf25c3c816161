"""The main job: fine-tune a real packaged model on real packaged data, and report before vs after.

``topic`` (default): SmolLM2-135M-Instruct (converted from the packaged GGUF on first use) learns
BBC News topic classification posed as generation: the article's start, then a question, and the
answer is the topic word. Accuracy is measured on held-out articles by first-token scoring (the
logits of the five topic words' first tokens right after the prompt), before and after LoRA.

``sentiment``: all-MiniLM-L6-v2 with a fresh classification head learns Rotten Tomatoes sentence
polarity (LoRA on query/value + the head); accuracy on held-out sentences.

Both write ``report.md``, ``report.json``, plots, metrics and the adapter to the output folder.

``--method`` picks how the task is tuned (``METHODS``): ``lora`` (default) on the float base, or ``qlora``:
the same LoRA on the base quantized to NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314; blocks of 64
with double-quantised scales, ~4.13 bits per weight; embeddings, norms and the head stay float). The report
adds the base's weight memory either way.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    "multitask": ("BBC topic + Rotten Tomatoes sentiment as generation: a LoRA per task, merges, LoRAHub, a mixture "
                  "LoRA, one mixed batch (slimtune/multitask/demo.py)", None),
}

# --method: name -> (label in the report, overrides applied to the task's config sections)
METHODS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "lora": ("LoRA", {}),
    "qlora": ("QLoRA", {"model": {"quantize": "nf4"}}),  # the same LoRA on an NF4 base
}


def with_method(cfg: TrainConfig, method: str) -> TrainConfig:
    """`cfg` with the `--method` variant's overrides applied (validated again)."""
    from slimtune.errors import ConfigError, did_you_mean

    if method not in METHODS:
        raise ConfigError(f"demo --method {method!r}: expected one of {list(METHODS)}." + did_you_mean(method, METHODS))
    data = cfg.to_dict()
    for section, values in METHODS[method][1].items():
        data[section] = {**data[section], **values}
    return TrainConfig.from_dict(data)


def default_output_dir(task: str, method: str = "lora") -> str:
    """runs/demo for the topic task with LoRA; runs/demo-<task>[-<method>] otherwise."""
    parts = [p for p in (task if task != "topic" else "", method if method != "lora" else "") if p]
    return "runs/" + "-".join(["demo", *parts])


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the base's parameters and buffers as stored, bytes of the same base with every quantized
    weight in its compute dtype). Adapter tensors and modules_to_save copies are left out; a tied weight
    counts once. For a float base both numbers are equal."""
    from slimtune.quant import QuantLinear
    from slimtune.tuned import TunedModel

    base = model.model if isinstance(model, TunedModel) else model
    quant = {name: m for name, m in base.named_modules() if isinstance(m, QuantLinear)}
    stored = as_float = 0
    for name, t in [*base.named_parameters(), *base.named_buffers()]:
        if ".adapters." in name or ".modules_to_save." in name:
            continue
        size = t.numel() * t.element_size()
        stored += size
        owner, _, leaf = name.rpartition(".")
        if not (owner in quant and leaf in ("weight", "absmax", "absmax2", "offset")):
            as_float += size
    for m in quant.values():
        as_float += m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8
    return stored, as_float


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
             eval_per_label: int | None = None, method: str = "lora") -> dict[str, Any]:
    """Run one demo task end to end with `method` (a key of METHODS) and write its report; returns it."""
    if task == "multitask":  # several adapters and one table: its own pipeline
        from slimtune.errors import ConfigError
        from slimtune.multitask.demo import run_multitask_demo

        if method != "lora":
            raise ConfigError(f"demo --task multitask --method {method!r}: expected lora (it trains plain LoRAs)")
        return run_multitask_demo(output_dir or "runs/demo_multitask", steps=steps, eval_per_label=eval_per_label)

    from slimtune.train.models import smollm2_path
    from slimtune.train.trainer import Trainer

    wall0 = time.perf_counter()
    description, make_config = TASKS[task]
    output_dir = output_dir or default_output_dir(task, method)
    kwargs = {k: v for k, v in (("steps", steps), ("eval_per_label", eval_per_label)) if v is not None}
    cfg = with_method(make_config(output_dir, **kwargs), method)
    convert_seconds = 0.0
    if task == "topic":
        t = time.perf_counter()
        smollm2_path()  # converts the packaged GGUF once; cached afterwards
        convert_seconds = time.perf_counter() - t
    trainer = Trainer(cfg)
    weights, weights_float = base_weight_bytes(trainer.model)
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
        "demo_method": method,
        "method_label": METHODS[method][0],
        "method": cfg.method,
        "base_quantization": cfg.model.quantize,
        "weight_bytes": weights,
        "weight_bytes_float": weights_float,
        "weight_ratio": round(weights / weights_float, 4),
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
    """report.json and report.md (keys a task's report lacks, e.g. weight memory, are left out of the page)."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    quant = report.get("base_quantization")
    base, label = (f"{quant} base" if quant else "base"), report.get("method_label", "LoRA")
    lines = [
        f"# slimtune demo: {report['task']}", "",
        f"- model: `{report['model']}`" + (f", quantized to {quant}" if quant else "")
        + f", method: `{json.dumps(report['method'])}`",
        f"- metric: {report['metric']}, on {report['n_eval']} held-out examples",
        "", "| | accuracy | macro-F1 |", "|---|---|---|",
        f"| before ({base}) | {report['before']:.1%} | {report['macro_f1_before']:.3f} |",
        f"| after ({label}) | {report['after']:.1%} | {report['macro_f1_after']:.3f} |", "",
        f"- trainable parameters: {report['trainable_params']:,}",
        *_weight_line(report),
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


def _weight_line(report: dict[str, Any]) -> list[str]:
    if "weight_bytes" not in report:
        return []
    line = f"- base weights (parameters + buffers): {mib(report['weight_bytes'])}"
    if report.get("base_quantization"):
        line += (f" in {report['base_quantization']}, {mib(report['weight_bytes_float'])} unquantized: "
                 f"{report['weight_ratio']:.2f}x")
    return [line]


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
