"""SSF: gamma * base(x) + beta after linear ops; exact identity at init, merge folds into W and b."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import slimtune as st
import tests.test_contract as contract
from slimtune.bases import sizes
from slimtune.layer import AdapterLayer
from slimtune.methods.ssf import SsfConfig
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, randomize, tiny_gpt2, tiny_llama

TOL = 1e-5  # merged vs unmerged logits
W_TOL = 1e-6  # weights after merge + unmerge (divided back by gamma)
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}


def make(arch: str, **kw) -> tuple[nn.Module, SsfConfig]:
    return contract.with_biases(MODELS[arch])(), SsfConfig(targets=TARGETS[arch], **kw)


def scramble(model, seed: int = 2) -> None:
    """gamma ~ 1 + N(0, 0.1), beta ~ N(0, 0.1): non-trivial, so merge checks cannot pass at the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".beta"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.model.named_parameters() if ".adapters." not in n}


def layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("targets", ["given", "all-linear"])
def test_outputs_at_init_are_exactly_the_base(arch, targets, ids):
    ref = output(MODELS[arch](), ids)
    cfg = SsfConfig(targets=TARGETS[arch]) if targets == "given" else SsfConfig()
    model = st.attach(MODELS[arch](), cfg)
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_forward_is_the_formula_and_init_std_draws_around_the_identity():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(5, 4)), SsfConfig(targets=["0"], init_std=0.02))
    a = model.model[0].adapters["default"]
    assert not torch.equal(a.gamma, torch.ones(4)) and (a.gamma - 1).abs().max() < 0.2 and a.beta.abs().max() < 0.2
    x = torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), a.gamma * model.model[0].base_layer(x) + a.beta, atol=0, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_param_count_is_two_d_out_per_target(arch):
    model = st.attach(MODELS[arch](), SsfConfig())
    expected = sum(2 * sizes(m.base_layer)[1] for m in layers(model).values())
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected
    one = st.attach(nn.Sequential(nn.Linear(7, 9)), SsfConfig(targets=["0"]))
    assert one.adapter_parameter_count("default") == 2 * 9


# -- merging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_merge_math_on_one_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, bias=bias)
    W0, b0 = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    model = st.attach(nn.Sequential(lin), SsfConfig(targets=["0"]))
    scramble(model)
    a = model.model[0].adapters["default"]
    gamma, beta = a.gamma.detach(), a.beta.detach()
    model.merge()
    torch.testing.assert_close(lin.weight, gamma[:, None] * W0, atol=1e-7, rtol=0)
    torch.testing.assert_close(lin.bias, beta if b0 is None else gamma * b0 + beta, atol=1e-7, rtol=0)
    model.unmerge()
    torch.testing.assert_close(lin.weight, W0, atol=W_TOL, rtol=W_TOL)
    if bias:
        assert torch.equal(lin.bias, b0)  # from a copy: bit for bit
    else:  # the bias added for the merge is gone: the module is as before
        assert lin.bias is None and "bias" in lin._parameters and set(lin.state_dict()) == {"weight"}


@pytest.mark.parametrize("arch", MODELS)
def test_merged_equals_unmerged_and_unmerge_restores_the_weights(arch, ids):
    model = st.attach(*make(arch))
    scramble(model)
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    after = base_tensors(model)
    assert set(after) == set(before)
    for n, p in after.items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL, msg=n)
        if n.endswith(".bias"):
            assert torch.equal(p, before[n]), n
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


def test_unmerge_restores_rows_whose_gamma_is_zero(ids):
    model = st.attach(tiny_gpt2(), SsfConfig(targets=["c_attn", "mlp.c_proj"]))
    scramble(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p[:3] = 0
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL, msg=n)


def test_detach_merged_on_a_bias_free_model_carries_the_shift_in_new_biases(ids):
    model = st.attach(tiny_llama(), SsfConfig(targets=["q_proj"]))
    scramble(model)
    adapted = output(model, ids)
    plain = model.detach(merge=True)
    assert plain.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(output(plain, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("order", [["default", "lora"], ["lora", "default"]])
def test_with_lora_on_the_same_layers_merged_equals_unmerged(order, ids):
    model = st.attach(tiny_llama(), SsfConfig(targets=["q_proj", "v_proj"]))
    model.add(st.LoraConfig(r=4, targets=["v_proj"]), name="lora")
    randomize(model)  # LoRA's A and B
    scramble(model)
    model.use(order)
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL, msg=n)


# -- files, gradients, batches, training ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", MODELS)
def test_save_then_load_gives_identical_outputs_and_disabled_is_the_base(arch, ids, tmp_path):
    model = st.attach(*make(arch, init_std=0.02))
    ref = output(contract.with_biases(MODELS[arch])(), ids)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    loaded = st.load(make(arch)[0], tmp_path / "a")
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_gradients_reach_gamma_and_beta_only(arch, ids):
    model = st.attach(*make(arch))
    scramble(model)
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        should_train = name.endswith((".gamma", ".beta"))
        assert p.requires_grad == should_train, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == should_train, name


@pytest.mark.parametrize("arch", MODELS)
def test_mixed_batch_rows_equal_each_adapter_alone(arch, ids):
    base, cfg = make(arch)
    model = st.attach(base, cfg, name="a")
    model.add(cfg, name="b")
    model.add(st.LoraConfig(r=2, targets=TARGETS[arch][:1]), name="c")
    scramble(model, seed=5)
    batch = torch.cat([ids, ids.flip(0)])
    assert_rows_match_alone(model, batch, ["a", "b", None, "c", "a", "b"])


def test_training_lowers_the_loss():
    model = st.attach(tiny_llama(), SsfConfig())
    data = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=25, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses[::5]


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, "0.02", True, float("inf")])
def test_bad_init_std_names_the_value(bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"SsfConfig.init_std={bad!r}: expected a standard deviation")):
        SsfConfig(init_std=bad)


def test_non_linear_targets_are_refused():
    with pytest.raises(NotImplementedError, match=r"ssf on model\.embed_tokens \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), SsfConfig(targets=["embed_tokens"]))
