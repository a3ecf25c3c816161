"""`slimtune bench qlora` on a tiny Llama (its functions, in process), and the demo's `--method qlora` pieces:
the config variant, the output folder, the base's weight bytes, the report page."""

from __future__ import annotations

import json

import pytest

import slimtune as st
import slimtune.bench.qlora as bench
from slimtune.demo import base_weight_bytes, default_output_dir, topic_config, with_method, write_report
from slimtune.errors import ConfigError
from slimtune.quant import quantize
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return bench.tiny_llama_dir(tmp_path_factory.mktemp("qbench") / "tiny")


def test_weight_row_counts_parameters_and_buffers_and_nf4_is_under_0_4x(tiny):
    row = bench.weight_row(tiny)
    c = bench.QUICK_SHAPE
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    linear = layers * (4 * d * d + 3 * d * c["intermediate_size"])  # q, k, v, o (kv heads = heads), MLP
    floats = 2 * c["vocab_size"] * d + (2 * layers + 1) * d  # embedding, head, RMSNorms
    rotary = 2 * 4 * (d // c["num_attention_heads"] // 2)  # inv_freq and original_inv_freq, float32 buffers
    assert row["fp32_bytes"] == 4 * (linear + floats) + rotary
    assert row["nf4_as_float_bytes"] == row["fp32_bytes"]  # what the same base takes unquantized
    assert row["bits_per_weight"] == pytest.approx(4.127, abs=0.002)
    nf4 = linear * row["bits_per_weight"] / 8 + 4 * floats + rotary
    assert row["nf4_bytes"] == pytest.approx(nf4, rel=1e-6) and row["ratio"] < 0.4


def test_quick_bench_writes_every_field_and_the_table(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "tiny_llama_dir", lambda path: tiny)
    monkeypatch.setattr(bench, "_run_child", lambda case, path, shape, steps: bench.child(case, path, shape, steps))
    out = tmp_path / "qlora.json"
    bench.main(quick=True, out=str(out), repeats=1)
    r = json.loads(out.read_text())
    assert {"weights", "peak_rss", "step_time", "heldout_loss", "demo", "model", "lora"} <= set(r)
    assert r["weights"]["ratio"] < 0.4
    assert {"rest_mb", "peak_train_mb", "step_s"} <= set(r["peak_rss"]["qlora"]) and r["peak_rss"]["peak_ratio"] > 0
    s = r["step_time"]
    assert s["qlora_s"] > 0 and s["ratio"] == pytest.approx(s["qlora_s"] / s["lora_s"])
    assert s["quantized_layers"] == 14 and s["dequantize_all_layers_s"] > 0
    h = r["heldout_loss"]
    assert 0 < h["fp32"] < 10 and abs(h["nf4_minus_fp32"]) < 0.5  # a random model: nf4 barely moves the loss
    table = out.with_suffix(".md").read_text()
    assert "| base weights (params + buffers) |" in table and "held-out LM loss" in table


def test_child_resets_the_peak_after_building_the_model(tiny):
    row = bench.child("qlora", tiny, (2, 16), steps=1)
    assert row["peak_reset"] and row["peak_train_mb"] >= row["rest_mb"] > 0


def test_heldout_blocks_are_the_same_tokens_for_both_bases(tiny):
    a, _ = bench.heldout_blocks(tiny, 3, 16)
    b, _ = bench.heldout_blocks(tiny, 3, 16)
    assert a == b and len(a) == 3 and len(a[0]["input_ids"]) == 16


# -- the demo's --method qlora ------------------------------------------------------------------------------
def test_demo_method_variants():
    cfg = with_method(topic_config("runs/x"), "qlora")
    assert cfg.model.quantize == "nf4" and cfg.method == topic_config("runs/x").method  # only the base changes
    assert with_method(topic_config("runs/x"), "lora").to_dict() == topic_config("runs/x").to_dict()
    with pytest.raises(ConfigError, match="'lora', 'qlora'.*Did you mean 'qlora'"):
        with_method(topic_config("runs/x"), "qlor")
    assert default_output_dir("topic") == "runs/demo" and default_output_dir("topic", "qlora") == "runs/demo-qlora"
    assert default_output_dir("sentiment") == "runs/demo-sentiment"
    assert default_output_dir("sentiment", "qlora") == "runs/demo-sentiment-qlora"


def test_base_weight_bytes_leaves_out_the_adapter_and_counts_a_tied_weight_once():
    plain = tiny_llama(tie_word_embeddings=True)
    stored, as_float = base_weight_bytes(plain)
    expected = sum(p.numel() * 4 for p in plain.parameters()) + sum(b.numel() * 4 for b in plain.buffers())
    assert stored == as_float == expected
    tuned = st.attach(quantize(tiny_llama(tie_word_embeddings=True), "nf4"), st.LoraConfig(r=4, targets=["q_proj"]))
    q_stored, q_float = base_weight_bytes(tuned)
    assert q_float == expected and q_stored < 0.6 * expected


def test_demo_report_page_shows_the_quantized_base_and_its_weight_memory(tmp_path):
    report = {"task": "t", "metric": "accuracy", "before": 0.3, "after": 0.8, "n_eval": 10, "trainable_params": 5,
              "train_seconds": 3.0, "macro_f1_before": 0.1, "macro_f1_after": 0.7, "model": "smollm2",
              "method_label": "QLoRA", "method": {"method": "lora"}, "base_quantization": "nf4",
              "weight_bytes": 160 * 2**20, "weight_bytes_float": 512 * 2**20, "weight_ratio": 0.3125, "steps": 36,
              "batch_size": 8, "convert_seconds": 0.0, "wall_seconds": 100, "torch_threads": 2, "samples": [],
              "adapter": "x/adapter"}
    write_report(tmp_path, report)
    page = (tmp_path / "report.md").read_text()
    assert "| before (nf4 base) | 30.0%" in page and "| after (QLoRA) | 80.0%" in page
    assert "160.0 MiB in nf4, 512.0 MiB unquantized: 0.31x" in page
    assert json.loads((tmp_path / "report.json").read_text())["weight_ratio"] == 0.3125
    for key in ("method_label", "base_quantization", "weight_bytes"):  # a task's report without them still renders
        report.pop(key)
    write_report(tmp_path, report)
    assert "| after (LoRA) |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_quick_bench_end_to_end_with_its_fresh_processes(tmp_path):
    result = bench.main(quick=True, out=str(tmp_path / "q.json"), repeats=1)
    for case in ("lora", "qlora"):
        row = result["peak_rss"][case]
        assert row["peak_reset"] and row["peak_train_mb"] >= row["rest_mb"] > 0
    assert result["weights"]["ratio"] < 0.4 and (tmp_path / "q.md").exists()
