"""The training pipeline is method-generic: each shape's exemplar trains, evaluates and saves through it."""

from __future__ import annotations

import pytest
import torch
from test_train_fixtures import labelled_rows, text_rows, tiny_bert_dir, tiny_llama_dir, write_jsonl

from slimtune.adapter_files import read_adapter
from slimtune.train import train

METHODS = {
    "ia3": {"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "bitfit": {"method": "bitfit"},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_methods")
    tiny_llama_dir(d / "llama")
    tiny_bert_dir(d / "bert")
    write_jsonl(d / "lm.jsonl", text_rows(40))
    write_jsonl(d / "cls.jsonl", labelled_rows(48))
    return d


@pytest.mark.parametrize("method, task, model, data", [
    ("ia3", "causal_lm", "llama", "lm.jsonl"),
    ("prompt_tuning", "causal_lm", "llama", "lm.jsonl"),
    ("prompt_tuning", "generative_classification", "llama", "cls.jsonl"),
    ("prompt_tuning", "classification", "bert", "cls.jsonl"),
    ("bitfit", "classification", "bert", "cls.jsonl"),
])
def test_exemplar_trains_through_the_pipeline_and_reloads(files, tmp_path, method, task, model, data):
    extra = {"prompt": "Colour? {text}", "max_length": 96} if task == "generative_classification" else {}
    cfg = {"model": {"name": str(files / model)}, "method": METHODS[method],
           "data": {"task": task, "train": str(files / data), "max_length": 32, "eval_size": 6} | extra,
           "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-2, "progress": False, "eval_before": True,
                     "warmup_steps": 1},
           "output_dir": str(tmp_path / "run")}
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 6
    base, adapted = summary["eval"]["base"], summary["eval"]["adapted"]
    if "loss" in base:  # the language-model tasks learn visibly in 6 steps
        assert adapted["loss"] < base["loss"]
    else:  # 6 held-out rows: accuracy may not move, the numbers must be there
        assert 0 <= adapted["accuracy"] <= 1 and adapted["n"] == 6
    config, _, tensors = read_adapter(tmp_path / "run" / "adapter")
    assert config.method == method and tensors
    assert all(torch.isfinite(t).all() for t in tensors.values())
