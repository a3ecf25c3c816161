"""Freeze tuning: the chosen blocks train in full (dense copies), everything else stays bit for bit."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.methods.freeze import FreezeConfig
from tests.conftest import VOCAB, fit, output, tiny_gpt2, tiny_llama
from tests.selective_checks import assert_only_entries_changed, base_state, file_size, masks_of, saved, train


def chosen(model: st.TunedModel) -> set[str]:
    return set(model.view("default").selections)


def block(i: int, model=None) -> set[str]:
    return {n for n, _ in (model or tiny_llama()).named_parameters() if n.startswith(f"model.layers.{i}.")}


def test_last_first_explicit_blocks_modules_inside_and_extra_modules():
    assert chosen(st.attach(tiny_llama(), FreezeConfig(trainable_layers=1))) == block(1)
    assert chosen(st.attach(tiny_llama(), FreezeConfig(trainable_layers=-1))) == block(0)
    assert chosen(st.attach(tiny_llama(), FreezeConfig(trainable_layers=2))) == block(0) | block(1)
    assert chosen(st.attach(tiny_llama(), FreezeConfig(layers=[0]))) == block(0)
    mlp = chosen(st.attach(tiny_llama(), FreezeConfig(trainable_layers=1, targets=["mlp"])))
    assert mlp == {n for n in block(1) if ".mlp." in n}
    extra = chosen(st.attach(tiny_llama(), FreezeConfig(trainable_layers=1, extra=["norm"])))
    assert extra == block(1) | {"model.norm.weight"}
    gpt2 = chosen(st.attach(tiny_gpt2(), FreezeConfig(trainable_layers=1, exclude=["ln_1", "ln_2"])))
    assert gpt2 == {n for n, _ in tiny_gpt2().named_parameters() if n.startswith("transformer.h.1.")
                    and ".ln_" not in n}


def test_only_the_chosen_blocks_change_and_save_load_merge_disable_are_exact(ids, tmp_path):
    base = tiny_llama()
    before, ref = base_state(base), output(base, ids)
    model = st.attach(base, FreezeConfig(trainable_layers=1))
    opt = train(model, ids, weight_decay=0.5)
    n_block = sum(before[n].numel() for n in block(1))
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == n_block
    assert_only_entries_changed(model, before, masks_of(model))
    adapted = output(model, ids)
    assert not torch.allclose(adapted, ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.save(tmp_path / "a")
    assert {k.removeprefix("base_model.model.") for k in saved(tmp_path / "a")} == block(1)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_saved_size_scales_with_the_blocks_chosen(tmp_path):
    for n in (1, 2):
        st.attach(tiny_llama(), FreezeConfig(trainable_layers=n)).save(tmp_path / str(n))
    ratio = file_size(tmp_path / "2") / file_size(tmp_path / "1")
    assert 1.95 < ratio < 2.05


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    losses = fit(st.attach(tiny_llama(), FreezeConfig(trainable_layers=1)), data, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5, losses


def test_clear_errors():
    with pytest.raises(st.ConfigError, match=r"FreezeConfig.trainable_layers=0: expected a non-zero int"):
        FreezeConfig(trainable_layers=0)
    with pytest.raises(st.ConfigError, match=r"trainable_layers=3: the model has 2 blocks"):
        st.attach(tiny_llama(), FreezeConfig(trainable_layers=3))
    with pytest.raises(st.ConfigError, match=r"layers=\[5\]: the model has blocks 0-1"):
        st.attach(tiny_llama(), FreezeConfig(layers=[5]))
    with pytest.raises(st.TargetNotFoundError, match=r"no module named 'nrom'.*model.norm"):
        st.attach(tiny_llama(), FreezeConfig(extra=["nrom"]))
    with pytest.raises(st.ConfigError, match=r"\['transformer.wte.weight'\] are tied"):
        st.attach(tiny_gpt2(), FreezeConfig(extra=["wte"]))
    with pytest.raises(st.ConfigError, match="targets='all-linear': expected module names inside the blocks"):
        FreezeConfig(targets="all-linear")
    with pytest.raises(st.TargetNotFoundError, match=r"picks no tensor in blocks \[1\]"):
        st.attach(tiny_llama(), FreezeConfig(trainable_layers=1, targets=["q_projj"]))
