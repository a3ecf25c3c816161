"""`slimtune merge` for adapters trained on a 4-bit base: the merge goes into the dequantized NF4 base (so the
merged model computes what the trained QLoRA model computed), saved in fp32 / bf16, or re-quantized to a
transformers 4-bit checkpoint with the added error measured, printed and written beside it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import slimtune as st
from slimtune.cli import main
from slimtune.merge_cli import trained_quantization
from slimtune.quant import QuantLinear, quantize
from tests.conftest import output, randomize, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
needs_bnb = pytest.mark.skipif(not st.optim.bitsandbytes_available(), reason="bitsandbytes not installed")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A float checkpoint, and a LoRA 'trained' on its NF4 quantization, saved in a run dir with config.yaml."""
    d = tmp_path_factory.mktemp("qmerge")
    tiny_llama().save_pretrained(d / "base")
    model = st.attach(quantize(tiny_llama(), "nf4"), st.LoraConfig(r=4, targets=TARGETS))
    randomize(model, scale=0.05)  # ||delta W|| about half of ||W||
    model.save(d / "run" / "adapter")
    (d / "run" / "config.yaml").write_text(f"model:\n  name: {d / 'base'}\n  quantize: nf4\n")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    return d, ids, output(model.eval(), ids)


def load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_run_config_says_what_the_adapter_was_trained_on(qlora_run, tmp_path):
    d, _, _ = qlora_run
    assert trained_quantization(d / "run" / "adapter") == ("nf4", f"model.quantize in {d / 'run' / 'config.yaml'}")
    assert trained_quantization(d / "run" / "adapter", "none") == (None, "--base-quant")
    assert trained_quantization(tmp_path / "lone" / "adapter") == (None, None)


def test_merge_into_the_dequantized_nf4_base_computes_what_the_qlora_model_did(qlora_run, tmp_path, capsys):
    d, ids, adapted = qlora_run
    assert main(["merge", str(d / "run" / "adapter"), "--base", str(d / "base"), "--out", str(tmp_path / "m")]) == 0
    assert "dequantized nf4 base (model.quantize in" in capsys.readouterr().out
    merged = load(tmp_path / "m")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(output(merged, ids), adapted, atol=1e-4, rtol=1e-4)
    # what `slimtune merge` did before: into the float W the adapter never saw (off by the quantization error)
    assert main(["merge", str(d / "run" / "adapter"), "--base", str(d / "base"), "--out", str(tmp_path / "w"),
                 "--base-quant", "none"]) == 0
    assert rel(output(load(tmp_path / "w"), ids), adapted) > 100 * rel(output(merged, ids), adapted)


def test_merge_saves_bf16(qlora_run, tmp_path):
    d, ids, adapted = qlora_run
    assert main(["merge", str(d / "run" / "adapter"), "--out", str(tmp_path / "b"), "--dtype", "bf16",
                 "--base", str(d / "base")]) == 0
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert rel(output(load(tmp_path / "b", dtype=torch.float32), ids), adapted) < 0.02


@needs_bnb
def test_requantized_merge_is_a_4bit_checkpoint_and_its_reported_error_is_the_measured_one(qlora_run, tmp_path,
                                                                                           capsys):
    d, ids, adapted = qlora_run
    adapter, base = str(d / "run" / "adapter"), str(d / "base")
    assert main(["merge", adapter, "--base", base, "--out", str(tmp_path / "f")]) == 0
    assert main(["merge", adapter, "--base", base, "--out", str(tmp_path / "q"), "--requantize", "nf4"]) == 0
    printed = capsys.readouterr().out
    assert "re-quantized to nf4: over the 6 adapted layers" in printed and "survives re-quantization" in printed
    report = json.loads((tmp_path / "q" / "requantization_error.json").read_text())
    assert set(report["layers"]) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                                     ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}

    q = load(tmp_path / "q", device_map="cpu")  # a plain transformers 4-bit checkpoint
    layer = q.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "nf4"
    float_merge = load(tmp_path / "f")
    W = float_merge.model.layers[1].mlp.down_proj.weight.detach()
    dense = st.bases.base_kind(layer).weight(layer).float()
    row = report["layers"]["model.layers.1.mlp.down_proj"]
    assert row["weight"] == pytest.approx(rel(dense, W), rel=1e-4)
    assert 0.05 < row["weight"] < 0.15  # nf4's own error on roughly Gaussian weights
    base_W = quantize(tiny_llama(), "nf4").model.layers[1].mlp.down_proj.dequantize()
    assert row["update"] == pytest.approx(((dense - W).norm() / (W - base_W).norm()).item(), rel=1e-4)
    assert row["update"] < 0.5 and rel(output(q, ids), adapted) < 0.15  # near, not equal


@needs_bnb
def test_requantizing_a_small_update_warns_that_it_is_mostly_rounded_away(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = st.attach(quantize(tiny_llama(), "nf4"), st.LoraConfig(r=4, targets=TARGETS))
    randomize(model, scale=0.01)  # ||delta W|| a few % of ||W||: below half an nf4 step
    model.save(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "q"),
                 "--requantize", "nf4", "--base-quant", "nf4"]) == 0
    printed = capsys.readouterr().out
    assert "warning: in 6 of 6 layers the rounding is as large as the update" in printed
    assert json.loads((tmp_path / "q" / "requantization_error.json").read_text())["update_mean"] > 1


@needs_bnb
def test_a_4bit_checkpoint_base_is_merged_into_as_it_stands(tmp_path, ids):
    tiny_llama().save_pretrained(tmp_path / "float")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    load(tmp_path / "float", quantization_config=cfg, device_map="cpu").save_pretrained(tmp_path / "bnb")
    model = st.attach(load(tmp_path / "bnb", device_map="cpu"), st.LoraConfig(r=4, targets=TARGETS))
    randomize(model, scale=0.05)
    model.save(tmp_path / "adapter")
    adapted = output(model.train(), ids)  # train mode: bitsandbytes' bf16-scale CPU eval kernel stays off
    assert main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "bnb"), "--out", str(tmp_path / "m")
                 ]) == 0
    merged = load(tmp_path / "m")
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear and "quantization_config" not in merged.config
    torch.testing.assert_close(output(merged, ids), adapted, atol=1e-4, rtol=1e-4)


def test_requantize_refuses_int8_and_a_missing_bitsandbytes(qlora_run, tmp_path, monkeypatch, capsys):
    d, _, _ = qlora_run
    with pytest.raises(SystemExit):  # argparse: not a choice
        main(["merge", str(d / "run" / "adapter"), "--out", str(tmp_path / "x"), "--requantize", "int8"])
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["merge", str(d / "run" / "adapter"), "--base", str(d / "base"), "--out", str(tmp_path / "x"),
                 "--requantize", "nf4"]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err


def test_python_path_detach_merge_on_the_quantized_base_rounds_and_dequantize_first_is_exact(ids):
    """What st.dequantize / TunedModel.detach(merge=True) do for a QLoRA adapter in memory."""
    from slimtune.quant import dequantize, merge_errors

    def qlora():
        model = st.attach(quantize(tiny_llama(), "nf4"), st.LoraConfig(r=4, targets=TARGETS))
        randomize(model, scale=0.05)
        return model.eval()

    model = qlora()
    adapted = output(model, ids)
    with pytest.warns(UserWarning, match="re-quantizes"):
        rounded = model.detach(merge=True)  # stays 4-bit: W' re-quantized in place
    assert isinstance(rounded.model.layers[0].self_attn.q_proj, QuantLinear) and len(merge_errors(rounded)) == 6
    assert 0.01 < rel(output(rounded, ids), adapted) < 0.15
    exact = dequantize(qlora()).detach(merge=True)  # float Linear layers holding dequant(q(W)) + delta W
    torch.testing.assert_close(output(exact, ids), adapted, atol=1e-4, rtol=1e-4)
