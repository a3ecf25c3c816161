"""LN-tuning: norm gains and biases as dense selections; HF PEFT's LN_TUNING format both ways."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.adapter_files import peft_context
from slimtune.io import CONFIG_NAME
from slimtune.methods import METHODS
from slimtune.methods.base import Method
from slimtune.methods.ln_tuning import LnTuningConfig
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_gpt2, tiny_llama
from tests.selective_checks import assert_only_entries_changed, base_state, masks_of, saved, train

NORMS = {
    "llama": (tiny_llama, {f"model.layers.{i}.{n}.weight" for i in (0, 1)
                           for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.weight"}),
    "gpt2": (tiny_gpt2, {f"transformer.{m}.{t}" for m in ("h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f")
                         for t in ("weight", "bias")}),
    "bert": (tiny_bert, {f"bert.{m}.LayerNorm.{t}" for t in ("weight", "bias")
                         for m in ("embeddings", *(f"encoder.layer.{i}.{p}" for i in (0, 1)
                                                   for p in ("attention.output", "output")))}),
}
needs_hook = pytest.mark.skipif(not hasattr(Method, "selection_key"),
                                reason="PEFT tensor names need the engine's Method.selection_key hook")


def perturb_norms(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", NORMS)
def test_selects_every_norm_gain_and_bias(arch):
    make, norms = NORMS[arch]
    model = st.attach(make(), LnTuningConfig())
    assert set(model.view("default").selections) == norms
    assert sum(p.numel() for _, p in model.trainable_parameters()) == sum(
        p.numel() for n, p in make().named_parameters() if n in norms)
    attention = st.attach(tiny_llama(), LnTuningConfig(targets=["input_layernorm"], layers=[1]))
    assert set(attention.view("default").selections) == {"model.layers.1.input_layernorm.weight"}


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_only_norms_change_and_save_load_merge_disable_are_exact(arch, ids, tmp_path):
    make, norms = NORMS[arch]
    base = make()
    before, ref = base_state(base), output(base, ids)
    model = st.attach(base, LnTuningConfig())
    train(model, ids, lr=5e-2, weight_decay=0.5, labels=None if arch == "gpt2" else torch.tensor([0, 1, 2]))
    assert_only_entries_changed(model, before, masks_of(model))
    adapted = output(model, ids)
    assert not torch.allclose(adapted, ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.save(tmp_path / "a")
    assert sum(v.numel() for v in saved(tmp_path / "a").values()) == sum(before[n].numel() for n in norms)
    torch.testing.assert_close(output(st.load(make(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def peft_kwargs(arch: str) -> dict:
    return {"target_modules": ["LayerNorm"]} if arch == "bert" else {}  # PEFT has no default mapping for BERT


@needs_hook
@pytest.mark.parametrize("arch", NORMS)
def test_our_peft_export_loads_in_peft_with_the_same_outputs_and_files(arch, ids, tmp_path):
    peft = pytest.importorskip("peft")
    make, _ = NORMS[arch]
    model = st.attach(make(), LnTuningConfig())
    perturb_norms(model)
    model.save(tmp_path / "ours", format="peft")
    theirs = peft.get_peft_model(make(), peft.LNTuningConfig(**peft_kwargs(arch)))
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(saved(tmp_path / "ours")) == set(saved(tmp_path / "theirs"))
    ours_cfg = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    their_cfg = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    assert ours_cfg["peft_type"] == "LN_TUNING" and set(ours_cfg) <= set(their_cfg)
    assert sorted(ours_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert not torch.allclose(output(model, ids), output(make(), ids))
    torch.testing.assert_close(output(loaded, ids), output(model, ids), atol=1e-6, rtol=1e-6)


@needs_hook
@pytest.mark.parametrize("arch", NORMS)
def test_peft_files_load_here_with_the_same_outputs(arch, ids, tmp_path):
    peft = pytest.importorskip("peft")
    make, norms = NORMS[arch]
    theirs = peft.get_peft_model(make(), peft.LNTuningConfig(**peft_kwargs(arch)))
    perturb_norms(theirs)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = st.load(make(), tmp_path / "theirs")
    assert isinstance(ours.configs["default"], LnTuningConfig)
    assert set(ours.view("default").selections) == norms
    assert not torch.allclose(output(ours, ids), output(make(), ids))
    torch.testing.assert_close(output(ours, ids), output(theirs, ids), atol=1e-6, rtol=1e-6)


def test_peft_config_names_full_modules_when_leaf_names_would_pick_more():
    model = st.attach(tiny_llama(), LnTuningConfig(layers=[1]))
    method = METHODS["ln_tuning"].method
    data = method.to_peft(model.configs["default"], peft_context(model, "default"))
    assert data["target_modules"] == ["model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]
    assert method.from_peft(data).targets == data["target_modules"]


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    losses = fit(st.attach(tiny_gpt2(), LnTuningConfig()), data, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.1, losses


def test_no_norm_matched_is_a_clear_error():
    with pytest.raises(st.TargetNotFoundError, match=r"selects no norm layer.*norm layers here: input_layernorm, "
                                                     r"norm, post_attention_layernorm"):
        st.attach(tiny_llama(), LnTuningConfig(targets=["ln_1"]))
