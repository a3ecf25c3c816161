"""The adapter-file verbs of the CLI on a tiny saved base model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import slimtune as st
from slimtune.cli import main
from tests.conftest import output, randomize, tiny_llama


@pytest.fixture
def saved(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = st.attach(base, st.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    model.save(tmp_path / "adapter")
    return tmp_path, model


def test_methods_lists_registered_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "dora" in out and "arXiv:2402.09353" in out
    shapes = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}
    assert shapes["lora"] == "layer" and shapes["prompt_tuning"] == "input" and shapes["bitfit"] == "selective"


def test_inspect_reports_method_params_and_fingerprint(saved, capsys):
    tmp, model = saved
    assert main(["inspect", str(tmp / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["modules"] == 4
    assert info["parameters"] == sum(p.numel() for _, p in model.trainable_parameters())
    assert info["base_fingerprint"] and info["size_on_disk_bytes"] > 0


def test_merge_writes_a_plain_model_with_the_adapted_outputs(saved, ids):
    tmp, model = saved
    assert main(["merge", str(tmp / "adapter"), "--out", str(tmp / "merged"), "--base", str(tmp / "base")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp / "merged")
    assert (tmp / "merged" / "model.safetensors").exists()
    torch.testing.assert_close(output(merged, ids), output(model, ids), atol=1e-5, rtol=1e-4)


def test_export_peft_then_load_matches(saved, ids):
    tmp, model = saved
    assert main(["export", str(tmp / "adapter"), "--out", str(tmp / "peft"), "--base", str(tmp / "base")]) == 0
    assert json.loads((tmp / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp / "peft"), ids), output(model, ids), atol=0, rtol=0)


def test_bad_adapter_path_is_a_clean_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err
