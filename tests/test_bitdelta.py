"""BitDelta: sign packing, the formula, storage, calibration, save/load, several deltas on one base, the CLI."""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune as st
import slimtune.methods.bitdelta  # noqa: F401  (registers the method without the shared import)
from slimtune.delta import compress_delta, logit_gap, logit_mse
from slimtune.delta_cli import REPORT_NAME, add_parser
from slimtune.layer import AdapterLayer, SavedModule
from slimtune.methods.bitdelta import BitDelta, BitDeltaConfig, _SignLinear, pack_signs, unpack_signs
from tests.conftest import MODELS, assert_rows_match_alone, output, tiny_gpt2, tiny_llama

BATCH = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(7))
CALIBRATION = [{"input_ids": BATCH[:2], "attention_mask": torch.ones(2, 12, dtype=torch.long)},
               {"input_ids": BATCH[2:]}]


def finetuned(make=tiny_llama, seed: int = 1, scale: float = 0.01, norms: bool = False, only: str = ""
              ) -> torch.nn.Module:
    """`make()` plus a fine-tune-like update: Gaussian noise + a rank-2 part on every 2-D weight whose name
    contains `only` (embeddings and the output head excepted), biases shifted; `norms`: RMSNorm gains too."""
    model = make()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(k in name for k in ("embed", "wte", "wpe", "lm_head")) and only in name:
                u, v = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                p.add_(torch.randn(p.shape, generator=g) * scale + u @ v * scale / 2)
            elif name.endswith(".bias") and only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            elif norms and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@functools.cache
def finetuned_dir(family: str = "llama") -> str:
    """A fine-tuned tiny model of `family` (llama, gpt2, bert) saved once per session (safetensors), removed at
    exit: what BitDeltaConfig(finetuned=...) reads. The contract rows in tests/test_contract.py use it."""
    path = Path(tempfile.mkdtemp(prefix=f"bitdelta-{family}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    finetuned(MODELS[family]).save_pretrained(path)
    return str(path)


def signs_of(delta: torch.Tensor) -> torch.Tensor:
    return torch.where(delta >= 0, 1.0, -1.0)


def layers(model: st.TunedModel) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)}


def test_sign_packing_round_trips_exactly_and_matches_a_hand_written_bit_layout():
    row = torch.tensor([[1.0, -1, 2, 3, -4, -5, -6, -7, 0.0]])  # >= 0 -> bit 1, bit k of byte j is entry 8j + k
    packed = pack_signs(row)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[1 + 4 + 8, 1]]
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 13), (64, 64), (3, 8), (2, 1), (7, 129)]:
        delta = torch.randn(shape, generator=g)
        delta[0, 0] = 0.0
        packed = pack_signs(delta)
        assert packed.shape == (shape[0], -(-shape[1] // 8))
        assert torch.equal(unpack_signs(packed, shape[1], torch.float32), signs_of(delta))


def test_delta_weight_is_alpha_times_the_sign_of_the_delta_exactly():
    base, ft = tiny_llama(), finetuned()
    want = {n: (m.weight.detach().clone(), dict(ft.named_modules())[n].weight.detach()) for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    model = compress_delta(ft, base, progress=False)
    assert set(layers(model)) == set(want)
    for name, layer in layers(model).items():
        adapter, (W0, W1) = layer.adapters["default"], want[name]
        delta = W1 - W0
        torch.testing.assert_close(adapter.alpha.detach(), delta.abs().mean().reshape(1), atol=0, rtol=0)
        assert torch.equal(adapter.delta_weight(layer.base_layer), adapter.alpha.detach() * signs_of(delta))


def test_forward_is_the_formula_and_the_custom_backward_matches_autograd():
    ft = finetuned()
    model = compress_delta(ft, tiny_llama(), progress=False)
    layer = layers(model)["model.layers.0.mlp.down_proj"]
    adapter, base = layer.adapters["default"], layer.base_layer
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    S = adapter.sign_matrix()
    want = base(x) + adapter.alpha * (x @ S.T)
    torch.testing.assert_close(adapter(x, base(x), base), want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(adapter.fused_forward(x, base), want, atol=1e-5, rtol=1e-5)
    x64 = x.double().requires_grad_()
    alpha = adapter.alpha.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _SignLinear.apply(a, adapter.signs, b, 128), (x64, alpha))


def test_parameter_count_one_scale_per_matrix_and_one_bit_per_weight(tmp_path):
    model = compress_delta(finetuned(), tiny_llama(), progress=False)
    n = len(layers(model))
    assert [p.numel() for _, p in model.trainable_parameters()] == [1] * n
    model.save(tmp_path / "delta")
    saved = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    bits = {k: t for k, t in saved.items() if k.endswith(".signs")}
    assert len(bits) == n and len(saved) == 2 * n  # signs + alpha per matrix, nothing else
    for name, layer in layers(model).items():
        d_out, d_in = layer.base_layer.weight.shape
        t = bits[f"base_model.model.{name}.signs"]
        assert t.dtype == torch.uint8 and t.numel() == d_out * d_in // 8
    assert model.delta_reports["default"].sign_bytes == sum(t.numel() for t in bits.values())
    assert sum(t.numel() * t.element_size() for t in saved.values()) == sum(t.numel() for t in bits.values()) + 4 * n


def test_compressed_model_is_closer_to_the_finetuned_model_than_the_base_is():
    ft, base = finetuned(), tiny_llama()
    gap_base = logit_mse(output(base, BATCH), output(ft, BATCH)).item()
    model = compress_delta(ft, base, progress=False)
    gap = logit_mse(output(model, BATCH), output(ft, BATCH)).item()
    assert gap < 0.7 * gap_base, (gap, gap_base)


def test_calibration_lowers_the_logit_gap_and_trains_only_the_scales():
    torch.manual_seed(0)
    ft = finetuned(norms=True)
    model = compress_delta(ft, tiny_llama(), data=CALIBRATION, steps=6, lr=1e-3, progress=False)
    report = model.delta_reports["default"]
    assert report.gap_calibrated < report.gap_init < 0.7 * report.gap_base, report
    assert len(report.losses) == 6
    for m in report.matrices:
        adapter = model.model.get_submodule(m.name).adapters["default"]
        assert m.alpha_calibrated == adapter.alpha.item() != m.alpha
        assert torch.equal(adapter.signs, pack_signs(dict(ft.named_modules())[m.name].weight
                                                     - model.model.get_submodule(m.name).base_layer.weight))
    norm = model.model.get_submodule("model.norm").modules_to_save["default"]
    assert torch.equal(norm.weight, ft.model.norm.weight)  # stored exactly, not trained by calibration
    assert logit_gap(model, ft, CALIBRATION) == pytest.approx(report.gap_calibrated)


def test_other_differing_tensors_are_stored_exactly_or_refused():
    ft = finetuned(norms=True)
    with torch.no_grad():
        ft.model.embed_tokens.weight[:5] += 0.1
    with pytest.raises(st.ConfigError, match=r"others='error'.*model\.embed_tokens\.weight"):
        compress_delta(ft, tiny_llama(), others="error", progress=False)
    model = compress_delta(ft, tiny_llama(), progress=False)
    exact = model.delta_reports["default"].exact
    assert set(exact) == {"model.embed_tokens", "model.norm"} | {f"model.layers.{i}.{n}" for i in (0, 1) for n in
                                                                 ("input_layernorm", "post_attention_layernorm")}
    assert exact["model.embed_tokens"] == 1000 * 64
    saved = model.model.get_submodule("model.embed_tokens")
    assert isinstance(saved, SavedModule) and torch.equal(saved.modules_to_save["default"].weight,
                                                          ft.model.embed_tokens.weight)


def test_mismatched_architectures_are_refused_naming_the_tensor():
    with pytest.raises(st.ConfigError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\)"):
        compress_delta(tiny_llama(intermediate_size=96), tiny_llama(), progress=False)
    with pytest.raises(st.ConfigError, match=r"model\.embed_tokens\.weight.*\(1200, 64\).*\(1000, 64\)"):
        compress_delta(finetuned(lambda: tiny_llama(vocab_size=1200)), tiny_llama(), targets=["q_proj"],
                       progress=False)
    with pytest.raises(st.ConfigError, match="has tensor 'model.layers.2"):
        compress_delta(tiny_llama(num_hidden_layers=3), tiny_llama(), progress=False)
    with pytest.raises(st.ConfigError, match="no target weight differs"):
        compress_delta(tiny_llama(), tiny_llama(), progress=False)
    with pytest.raises(st.ConfigError, match="'input_ids' tensor"):
        compress_delta(finetuned(), tiny_llama(), data=[{"ids": BATCH}], progress=False)


def test_unchanged_targets_are_not_wrapped():
    model = compress_delta(finetuned(only="q_proj"), tiny_llama(), progress=False)
    assert sorted(layers(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert len(model.delta_reports["default"].unchanged) == 12


def test_save_then_load_reproduces_the_outputs_exactly(tmp_path, ids):
    model = compress_delta(finetuned(norms=True), tiny_llama(), data=CALIBRATION, steps=1, lr=1e-3, progress=False)
    want = output(model, ids)
    model.save(tmp_path / "delta")
    loaded = st.load(tiny_llama(), tmp_path / "delta")
    assert isinstance(loaded.configs["default"], BitDeltaConfig)
    torch.testing.assert_close(output(loaded, ids), want, atol=0, rtol=0)


def test_two_deltas_on_one_base_serve_one_mixed_batch_as_each_alone(ids):
    ft_a, ft_b = finetuned(seed=1), finetuned(seed=2, norms=True)
    model = compress_delta(ft_a, tiny_llama(), progress=False)
    model = compress_delta(ft_b, model, name="b", progress=False)
    assert model.active == ["default"] and set(model.configs) == {"default", "b"}
    batch = torch.cat([ids, ids[:1]])
    assert_rows_match_alone(model, batch, ["default", "b", None, "b"])
    mixed = output(model, batch, adapter_names=["default", "b", None, "b"])
    own = {"default": output(ft_a, batch), "b": output(ft_b, batch)}
    for i, name in enumerate(["default", "b"]):  # each row is closer to its own fine-tune than to the other
        assert logit_mse(mixed[i], own[name][i]) < logit_mse(mixed[i], own["b" if name == "default" else "default"][i])


def test_merge_equals_unmerged_and_unmerge_restores_the_weights_gpt2_with_biases(ids):
    ft = finetuned(tiny_gpt2)
    model = compress_delta(ft, tiny_gpt2(), progress=False)
    report = model.delta_reports["default"]
    assert len(report.matrices) == report.bias_deltas == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert set(report.exact) == {"transformer.ln_f"} | {f"transformer.h.{i}.ln_{k}" for i in (0, 1) for k in (1, 2)}
    layer = layers(model)["transformer.h.0.attn.c_attn"]  # Conv1D: weight stored (d_in, d_out)
    delta = (dict(ft.named_modules())["transformer.h.0.attn.c_attn"].weight - layer.base_layer.weight).T
    adapter = layer.adapters["default"]
    assert torch.equal(adapter.delta_weight(layer.base_layer), adapter.alpha.detach() * signs_of(delta))
    assert torch.equal(adapter.bias_delta, dict(ft.named_modules())["transformer.h.0.attn.c_attn"].bias
                       - layer.base_layer.bias)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    for n, p in model.model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-7, rtol=0, msg=n)
    assert logit_mse(adapted, output(ft, ids)) < 0.7 * logit_mse(output(tiny_gpt2(), ids), output(ft, ids))


def test_config_with_a_checkpoint_builds_what_compress_delta_builds(tmp_path):
    ft = finetuned(tiny_gpt2)
    ft.save_pretrained(tmp_path / "ft")  # GPT-2 ties lm_head to wte: the file holds wte only
    cfg = BitDeltaConfig(finetuned=str(tmp_path / "ft"), targets=["c_attn", "c_fc"], bias=True)
    from_file = st.attach(tiny_gpt2(), cfg)
    in_memory = compress_delta(ft, tiny_gpt2(), targets=["c_attn", "c_fc"], progress=False)
    assert set(layers(from_file)) == set(layers(in_memory))
    for name, layer in layers(from_file).items():
        a, b = layer.adapters["default"], layers(in_memory)[name].adapters["default"]
        assert torch.equal(a.signs, b.signs) and torch.equal(a.alpha, b.alpha) and torch.equal(a.bias_delta,
                                                                                                b.bias_delta)
    from_path = compress_delta(tmp_path / "ft", tiny_gpt2(), progress=False)  # a checkpoint folder as the source
    assert len(layers(from_path)) == 8
    with pytest.raises(st.ConfigError, match="finetuned is not set"):
        st.attach(tiny_llama(), BitDeltaConfig())
    with pytest.raises(st.ConfigError, match="no model.safetensors"):
        st.attach(tiny_llama(), BitDeltaConfig(finetuned=str(tmp_path)))
    with pytest.raises(st.ConfigError, match=r"BitDeltaConfig\.bias='yes'"):
        BitDeltaConfig(bias="yes")


def test_on_a_quantized_base_the_delta_is_taken_against_the_dequantized_weights(ids):
    ft = finetuned()
    base = st.quantize(tiny_llama(), "nf4")
    gap_base = logit_mse(output(base, ids), output(ft, ids)).item()
    model = compress_delta(ft, base, progress=False)
    assert logit_mse(output(model, ids), output(ft, ids)).item() < 0.7 * gap_base


def test_cli_compresses_calibrates_and_writes_a_loadable_adapter(tmp_path, ids, capsys):
    from tests.test_train_fixtures import byte_tokenizer, text_rows, write_jsonl

    ft = finetuned()
    ft.save_pretrained(tmp_path / "ft")
    byte_tokenizer().save_pretrained(tmp_path / "ft")
    tiny_llama().save_pretrained(tmp_path / "base")
    write_jsonl(tmp_path / "text.jsonl", text_rows(20))
    parser = argparse.ArgumentParser(prog="slimtune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compress-delta", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "--out",
                              str(tmp_path / "delta"), "--data", str(tmp_path / "text.jsonl"), "--steps", "3",
                              "--batches", "2", "--batch-size", "2", "--max-length", "16", "--lr", "1e-3"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "14 matrices compressed" in printed and "calibrated" in printed
    report = json.loads((tmp_path / "delta" / REPORT_NAME).read_text())
    assert len(report["losses"]) == 3 and report["gap_calibrated"] < report["gap_base"]
    loaded = st.load(tiny_llama(), tmp_path / "delta")
    assert logit_mse(output(loaded, ids), output(ft, ids)) < logit_mse(output(tiny_llama(), ids), output(ft, ids))
    assert isinstance(dict(loaded.named_modules())["model.model.layers.0.self_attn.q_proj.adapters.default"],
                      BitDelta)
    args = parser.parse_args(["compress-delta", str(tmp_path / "nope"), "--base", str(tmp_path / "base"), "--out",
                              str(tmp_path / "x")])
    with pytest.raises(st.ConfigError, match="cannot load a causal LM from"):
        args.func(args)
