"""QDyLoRA (Rajabzadeh et al. 2024, arXiv:2402.10462): DyLoRA's nested ranks trained on an NF4 base.

DyLoRA (slimtune/methods/dylora.py) needs nothing quantization-specific: the NF4 QuantLinear is one more base
kind. Checked here: the cut-rank formula on a quantized layer, gradients equal the float path on the
dequantized weights, one run trains every rank (each beats the base after a toy fit), `st.load(rank=k)` and
the in-memory eval rank agree and equal a plain rank-k LoRA on the same 4-bit base, merges round (and are
exact after `dequantize`), and the method contract on the proposed `dylora-nf4` row."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune as st
import slimtune.methods.dylora  # noqa: F401  (registers the method without the shared import)
from slimtune.layer import AdapterLayer
from slimtune.methods.dylora import DyLoraConfig
from slimtune.quant import QuantLinear, dequantize, merge_errors, quantize
from tests.conftest import VOCAB, fit, output, randomize, tiny_llama

LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]


def qdylora(r: int = 8, **extra) -> st.TunedModel:
    return st.attach(quantize(tiny_llama(), "nf4"), DyLoraConfig(r=r, targets=LLAMA, **extra))


def at_rank(model: st.TunedModel, k: int) -> st.TunedModel:
    model.shared["default"].eval_rank = k
    return model


def test_the_base_stays_4bit_and_starts_as_identity(ids):
    ref = output(quantize(tiny_llama(), "nf4"), ids)
    model = qdylora()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 8 and all(isinstance(m.base_layer, QuantLinear) for m in layers)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_cut_rank_formula_on_a_quantized_layer():
    torch.manual_seed(0)
    net = quantize(nn.Sequential(nn.Linear(64, 48)), "nf4")  # blocks of 64: one scale per input row
    model = st.attach(net.eval(), DyLoraConfig(r=4, alpha=6.0, targets=["0"]))
    randomize(model, scale=0.5)
    layer = model.model[0]
    adapter, W = layer.adapters["default"], layer.base_layer.dequantize()
    x = torch.randn(3, 64)
    for k in (1, 3, 4):
        at_rank(model, k)
        expected = x @ W.T + layer.base_layer.bias + (6.0 / k) * x @ adapter.A[:k].T @ adapter.B[:, :k].T
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_float_path_on_the_dequantized_weights(ids):
    model = qdylora(r=4)
    randomize(model, scale=0.1)
    twin = dequantize(copy.deepcopy(model))  # nn.Linear layers holding dequant(Q): the same function
    for m in (model, twin):
        m.train()
        m.shared["default"].rank = 3  # the same sampled rank in both
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in twin.trainable_parameters()}
    for n, p in model.trainable_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
        rows = p.grad[3:] if n.endswith(".A") else p.grad[:, 3:]
        assert torch.count_nonzero(rows) == 0, n  # ranks above the step's b get no gradient


def test_one_run_trains_every_nested_rank_on_the_4bit_base():
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model = qdylora(r=8, r_min=2, alpha=8.0)
    model.eval()
    with model.disabled():
        base_loss = model(input_ids=data, labels=data).loss.item()
    fit(model, data, steps=20, lr=2e-2)
    model.eval()
    losses = {}
    for k in (2, 4, 8):
        losses[k] = at_rank(model, k)(input_ids=data, labels=data).loss.item()
    assert all(loss < base_loss - 0.25 for loss in losses.values()), (base_loss, losses)
    assert losses[8] < losses[2], losses  # the higher ranks add to what the lower ones learned


@pytest.mark.parametrize("k", [3, 8])
def test_load_at_rank_k_equals_eval_rank_k_and_a_plain_rank_k_lora(tmp_path, ids, k):
    model = qdylora(r=8, r_min=2)
    randomize(model, scale=0.1)
    model.save(tmp_path / "a")
    in_memory = output(at_rank(model, k), ids)
    loaded = st.load(quantize(tiny_llama(), "nf4"), tmp_path / "a", rank=k)
    assert loaded.configs["default"].r == k
    torch.testing.assert_close(output(loaded, ids), in_memory, atol=0, rtol=0)  # the same tensors, the same ops

    cut = {n: m.adapters["default"] for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    lora = st.attach(quantize(tiny_llama(), "nf4"), st.LoraConfig(r=k, alpha=model.configs["default"].alpha,
                                                                    targets=LLAMA))
    with torch.no_grad():
        for n, m in lora.named_modules():
            if isinstance(m, AdapterLayer):
                m.adapters["default"].A.copy_(cut[n].A[:k])
                m.adapters["default"].B.copy_(cut[n].B[:, :k])
    torch.testing.assert_close(output(lora, ids), in_memory, atol=1e-5, rtol=1e-5)
    with pytest.raises(st.errors.ConfigError, match="r_min=2..r=8"):
        st.load(quantize(tiny_llama(), "nf4"), tmp_path / "a", rank=1)


def test_merge_at_a_cut_rank_rounds_into_the_4bit_base_and_is_exact_after_dequantize(ids):
    model = at_rank(qdylora(r=8), 4)
    randomize(model, scale=0.1)
    adapted = output(model, ids)
    exact = at_rank(dequantize(copy.deepcopy(model)), 4)
    exact.merge()
    torch.testing.assert_close(output(exact, ids), adapted, atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge()
    assert len(merge_errors(model)) == 8
    floats = dict(exact.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):  # the 4-bit merge is the exact rank-4 merge, re-quantized
            requantized = QuantLinear.from_linear(floats[name].base_layer).dequantize()
            assert torch.equal(layer.base_layer.dequantize(), requantized), name


def test_contract_row_dylora_nf4(ids, tmp_path, monkeypatch):
    """The row proposed for tests/test_contract.py, run through its own checks."""
    import tests.test_contract as contract

    row = contract.Example(contract.tiny_llama_nf4, lambda: st.DyLoraConfig(r=4, r_min=2,
                                                                            targets=contract.LINEARS["llama"]))
    monkeypatch.setitem(contract.EXAMPLES, "dylora-nf4", row)
    contract.test_contract("dylora-nf4", ids, tmp_path)
