"""`slimtune bench quality`: what each method gives for a fixed budget on a real task.

Every registered exemplar fine-tunes the packaged all-MiniLM-L6-v2 encoder (a real BERT, 22.7M
parameters) with a fresh head on Rotten Tomatoes polarity, same data, steps, batch and seed, through
the normal training pipeline; we report held-out accuracy before and after, trainable parameters
and wall time. Learning rates follow each method's usual range (prompt tuning needs a high one).
Results go to bench/results/quality.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FFN_OUT = r".*\.layer\.\d+\.output\.dense"  # BERT's feed-forward output (not attention.output.dense)
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]}, 1e-3),
    "ia3": ({"method": "ia3", "targets": r".*\.(key|value|layer\.\d+\.output\.dense)",  # k, v, FFN out
             "feedforward": r".*layer\.\d+\.output\.dense"}, 1e-2),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 20}, 1e-2),  # one lr for prompt and head
    "bitfit": ({"method": "bitfit"}, 3e-3),
    "vera": ({"method": "vera", "r": 256, "targets": ["query", "value"]}, 1e-2),
    "loha": ({"method": "loha", "r": 8, "alpha": 8, "targets": ["query", "value"]}, 1e-3),
    "lokr": ({"method": "lokr", "r": 8, "alpha": 8, "targets": ["query", "value"]}, 1e-3),
    "oft": ({"method": "oft", "block_size": 32, "targets": ["query", "value"]}, 1e-3),
    "boft": ({"method": "boft", "block_size": 4, "targets": ["query", "value"]}, 1e-3),
    "fourierft": ({"method": "fourierft", "n_frequency": 1000, "targets": ["query", "value"]}, 1e-2),
    "hra": ({"method": "hra", "r": 8, "targets": ["query", "value"]}, 1e-3),
    "adalora": ({"method": "adalora", "init_r": 12, "target_r": 8, "alpha": 16, "total_step": 150, "tinit": 15,
                 "tfinal": 30, "targets": ["query", "value"]}, 1e-2),  # E starts at 0: small early gradients
    "dylora": ({"method": "dylora", "r": 8, "alpha": 16, "targets": ["query", "value"]}, 1e-3),
    "sora": ({"method": "sora", "r": 8, "alpha": 16, "sparsity": 0.4, "targets": ["query", "value"]}, 1e-3),
    "periodic_lora": ({"method": "periodic_lora", "r": 8, "alpha": 16, "period": 50, "targets": ["query", "value"]},
                      1e-3),
    "lora_sp": ({"method": "lora_sp", "r": 8, "alpha": 16, "targets": ["query", "value"]}, 1e-3),
    "aflora": ({"method": "aflora", "r": 4, "total_step": 150, "tinit": 15, "tfinal": 30,
                "targets": ["query", "value"]}, 1e-3),
    "bottleneck": ({"method": "bottleneck", "targets": FFN_OUT}, 1e-3),  # Pfeiffer: after each FFN
    "compacter": ({"method": "compacter", "variant": "compacter++", "targets": FFN_OUT}, 3e-3),
    "ssf": ({"method": "ssf", "targets": ["query", "key", "value", "dense"]}, 1e-2),
    "p_tuning": ({"method": "p_tuning", "num_virtual_tokens": 20}, 1e-3),
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 20}, 1e-2),
    "ln_tuning": ({"method": "ln_tuning"}, 1e-2),
    "freeze": ({"method": "freeze", "trainable_layers": 2}, 1e-4),
    "fishmask": ({"method": "fishmask", "density": 0.005}, 1e-3),  # slimtune train passes calibration batches
    "child_tuning_d": ({"method": "child_tuning_d", "density": 0.3, "layers": "0-5"}, 1e-4),
    "child_tuning_f": ({"method": "child_tuning_f", "p": 0.3}, 1e-4),
    "diff_pruning": ({"method": "diff_pruning", "density": 0.005}, 1e-4),  # the L0 phase only (1e-3: collapsed)
    "unipelt": ({"method": "hybrid", "gates": True, "parts": [
        {"method": "prefix_tuning", "num_virtual_tokens": 10},
        {"method": "bottleneck", "targets": FFN_OUT},
        {"method": "lora", "r": 8, "alpha": 2, "targets": ["query", "value"]}]}, 3e-3),
    "mam": ({"method": "hybrid", "parts": [  # BERT has no FFN module: beside output.dense, reading the FFN input
        {"method": "prefix_tuning", "num_virtual_tokens": 30},
        {"method": "bottleneck", "placement": "parallel", "targets": FFN_OUT, "reads": "residual",
         "reduction_factor": 2, "scaling": 4.0, "init": "mam"}]}, 3e-4),  # 3e-3, 1e-3: collapsed to one class
    "adamix": ({"method": "adamix", "targets": FFN_OUT}, 1e-3),
    "pasta": ({"method": "pasta", "token_ids": [101, 102]}, 1e-2),  # MiniLM [CLS], [SEP]
    "lt_sft": ({"method": "lt_sft", "density": 0.05}, 1e-4),  # phase 1 only (full fine-tuning), as diff_pruning
    "spt": ({"method": "spt", "density": 0.01, "r": 8}, 1e-3),
    # task-conditioned methods with one task (multi-task quality: `slimtune demo --task multitask`)
    "moelora": ({"method": "moelora", "num_experts": 4, "r": 8, "alpha": 16, "num_tasks": 1,
                 "targets": ["query", "value"]}, 1e-3),
    "poly": ({"method": "poly", "r": 8, "n_tasks": 1, "n_skills": 4, "targets": ["query", "value"]}, 1e-3),
    "mpt": ({"method": "mpt", "num_virtual_tokens": 20}, 1e-2),
    "moe": ({"method": "moe", "expert": {"method": "lora", "r": 4, "alpha": 8}, "num_experts": 4, "top_k": 2,
             "targets": ["query", "value"]}, 1e-3),
    "mov": ({"method": "mov", "num_experts": 4, "targets": r".*\.(key|value|layer\.\d+\.output\.dense)",
             "feedforward": r".*layer\.\d+\.output\.dense"}, 1e-2),
    "hydralora": ({"method": "hydralora", "r": 8, "alpha": 16, "num_heads": 4, "targets": ["query", "value"]}, 1e-3),
}


def run_one(method: dict[str, Any], lr: float, steps: int, out_dir: Path) -> dict[str, Any]:
    from slimtune.train import train

    cfg = {"model": {"name": "minilm"}, "method": method,
           "data": {"task": "classification", "train": "packaged:rotten_tomatoes",
                    "labels": ["negative", "positive"], "max_length": 64, "per_label_eval": 100},
           "train": {"max_steps": steps, "batch_size": 16, "lr": lr, "warmup_steps": 10, "progress": False,
                     "seed": 0},
           "output_dir": str(out_dir)}
    t0 = time.perf_counter()
    summary = train(cfg)
    return {"before": summary["eval"]["base"]["accuracy"], "after": summary["eval"]["adapted"]["accuracy"],
            "trainable_params": summary.get("trainable_params"), "seconds": time.perf_counter() - t0, "lr": lr}


def main(quick: bool = False, out: str = "bench/results/quality.json", repeats: int | None = None,
         only: list[str] | None = None) -> dict:
    """Run every method (or those in `only`, keeping the other rows of an existing `out`)."""
    from slimtune.errors import ConfigError, did_you_mean

    torch.set_num_threads(int(os.environ.get("SLIMTUNE_BENCH_THREADS", "2")))
    steps = repeats or (10 if quick else 150)
    for name in only or []:
        if name not in METHODS:
            raise ConfigError(f"bench quality --only {name!r}: no such row; rows: {', '.join(METHODS)}."
                              + did_you_mean(name, METHODS))
    print(f"bench quality: MiniLM + Rotten Tomatoes, {steps} steps x batch 16 per method")
    rows = json.loads(Path(out).read_text())["rows"] if only and Path(out).exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, lr) in METHODS.items():
            if only and name not in only:
                continue
            rows[name] = run_one(method, lr, steps, Path(tmp) / name)
            r = rows[name]
            print(f"  {name:<14} accuracy {r['before']:.3f} -> {r['after']:.3f}  ({r['seconds']:.0f} s)")
    rows = {name: rows[name] for name in METHODS if name in rows}  # table order
    result = {"task": "rotten_tomatoes (200 held-out)", "model": "all-MiniLM-L6-v2 + fresh head",
              "steps": steps, "batch": 16, "rows": rows}
    from slimtune.io import atomic_write_bytes

    atomic_write_bytes(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    return result
