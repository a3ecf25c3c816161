"""Properties of the LoRA family on tiny Llama / GPT-2 / BERT models (see STYLE.md, 'Tests')."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer, SavedModule
from slimtune.methods import METHODS
from tests.conftest import MODELS, fit, output, randomize, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
VARIANTS = {
    "lora": dict(cls=st.LoraConfig),
    "rslora": dict(cls=st.LoraConfig, rslora=True),
    "gaussian": dict(cls=st.LoraConfig, init="gaussian"),
    "dora": dict(cls=st.DoraConfig),
    "pissa": dict(cls=st.LoraConfig, init="pissa"),
    "pissa_fast": dict(cls=st.LoraConfig, init="pissa_niter_4"),
    "olora": dict(cls=st.LoraConfig, init="olora"),
    "lora_fa": dict(cls=st.LoraConfig, freeze_A=True),
}
CASES = [(arch, v) for arch in MODELS for v in VARIANTS]
TOL = 1e-5  # fp32 tolerance for merged-vs-unmerged and identity checks (absolute, logits ~ O(1))


def make(arch: str, variant: str, r: int = 4, **extra):
    spec = dict(VARIANTS[variant])
    cls = spec.pop("cls")
    base = MODELS[arch]()
    cfg = cls(r=r, alpha=8, targets=TARGETS[arch], **spec, **extra)
    return base, cfg


@pytest.mark.parametrize("arch,variant", CASES)
def test_identity_at_init(arch, variant, ids):
    base, cfg = make(arch, variant)
    ref = output(base, ids)
    model = st.attach(base, cfg)
    torch.testing.assert_close(output(model, ids), ref, atol=TOL if variant.startswith(("pissa", "olora")) else 0,
                               rtol=1e-4 if variant.startswith(("pissa", "olora")) else 0)


@pytest.mark.parametrize("arch,variant", CASES)
def test_merge_matches_unmerged_forward_and_unmerge_restores(arch, variant, ids):
    base, cfg = make(arch, variant)
    model = st.attach(base, cfg)
    randomize(model)
    adapted = output(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    model.unmerge()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("arch,variant", CASES)
def test_detach_merged_is_plain_model_with_same_output(arch, variant, ids):
    base, cfg = make(arch, variant)
    model = st.attach(base, cfg)
    randomize(model)
    adapted = output(model, ids)
    plain = model.detach(merge=True)
    assert not any(isinstance(m, (AdapterLayer, SavedModule)) for m in plain.modules())
    assert all(".adapters." not in n and "base_layer" not in n for n in plain.state_dict())
    torch.testing.assert_close(output(plain, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("arch,variant", CASES)
def test_detach_unmerged_gives_back_the_untouched_base(arch, variant, ids):
    base, cfg = make(arch, variant)
    ref_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = st.attach(base, cfg)
    randomize(model)
    plain = model.detach()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,variant", CASES)
def test_disabled_equals_base_and_gradients_reach_adapters_only(arch, variant, ids):
    base, cfg = make(arch, variant)
    model = st.attach(base, cfg)
    randomize(model)
    with model.disabled():
        off = output(model, ids)
    plain_ref = output(MODELS[arch](), ids)
    if not variant.startswith(("pissa", "olora")):  # those bases hold the residual while attached
        torch.testing.assert_close(off, plain_ref, atol=0, rtol=0)
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        frozen_a = variant == "lora_fa" and name.endswith(".A")
        should_train = ".adapters." in name and not frozen_a
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name


@pytest.mark.parametrize("arch,variant", CASES)
def test_param_count_equals_formula(arch, variant):
    base, cfg = make(arch, variant)
    model = st.attach(base, cfg)
    formula = METHODS[cfg.method].params
    expected = 0
    for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
        d_in, d_out = features(layer.base_layer)
        expected += eval(formula, {}, {"r": cfg.r, "d_in": d_in, "d_out": d_out})
        if variant == "lora_fa":
            expected -= cfg.r * d_in
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected


@pytest.mark.parametrize("arch,variant", CASES)
def test_save_then_load_gives_identical_outputs(arch, variant, ids, tmp_path):
    base, cfg = make(arch, variant)
    model = st.attach(base, cfg)
    randomize(model)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    loaded = st.load(MODELS[arch](), tmp_path / "a")
    atol = 2e-5 if variant.startswith(("pissa", "olora")) else 0  # saved as the rank-2r LoRA of the same delta
    torch.testing.assert_close(output(loaded, ids), adapted, atol=atol, rtol=atol and 1e-4)


def test_rank_of_delta_is_at_most_r():
    model = st.attach(tiny_llama(), st.LoraConfig(r=3, targets=["q_proj"]))
    randomize(model)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert torch.linalg.matrix_rank(layer.adapters["default"].delta_weight(layer.base_layer)) == 3


def test_rslora_scale_and_lora_scale():
    assert st.LoraConfig(r=16, alpha=32).scale == 2.0
    assert st.LoraConfig(r=16, alpha=32, rslora=True).scale == 8.0


def test_pissa_takes_principal_components_into_the_adapter():
    base = tiny_llama()
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = st.attach(base, st.LoraConfig(r=4, alpha=4, targets=["q_proj"], init="pissa"))
    layer = model.model.model.layers[0].self_attn.q_proj
    residual = layer.base_layer.weight
    S0 = torch.linalg.svdvals(W0)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:4], S0[4:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(residual + layer.adapters["default"].delta_weight(layer.base_layer), W0, atol=1e-5,
                               rtol=1e-5)


def test_dora_magnitude_starts_at_column_norm_and_gets_gradient(ids):
    base = tiny_llama()
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = st.attach(base, st.DoraConfig(r=4, targets=["q_proj"]))
    dora = model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    torch.testing.assert_close(dora.m.detach(), W0.norm(dim=1))
    randomize(model)
    dense = (W0 + dora.scale * dora.B @ dora.A).norm(dim=1)  # the closed-form norm equals the dense one
    torch.testing.assert_close(dora._row_norm(model.model.model.layers[0].self_attn.q_proj.base_layer), dense,
                               atol=1e-5, rtol=1e-5)
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert dora.m.grad is not None and dora.m.grad.abs().sum() > 0


def test_lora_on_embedding_and_conv2d():
    emb = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Conv2d(1, 4, 3))
    model = st.attach(emb[:1], st.LoraConfig(r=2, targets=["0"]))
    x = torch.randint(0, 50, (2, 5))
    ref = model(x)
    randomize(model)
    adapted = model(x)
    assert not torch.allclose(adapted, ref)
    model.merge()
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    img = torch.randn(2, 3, 9, 9)
    ref = conv(img)
    cm = st.attach(conv, st.LoraConfig(r=2, targets=["0"]))
    torch.testing.assert_close(cm(img), ref)
    randomize(cm)
    adapted = cm(img)
    cm.merge()
    torch.testing.assert_close(cm(img), adapted, atol=1e-5, rtol=1e-5)


def test_training_50_steps_lowers_loss():
    torch.manual_seed(0)
    base = tiny_llama()
    model = st.attach(base, st.LoraConfig(r=8, alpha=16, targets="all-linear"))
    data = torch.randint(0, 1000, (4, 16))
    losses = fit(model, data, steps=50, lr=1e-2)
    assert losses[-1] < losses[0] - 1.0, losses[::10]  # at least one nat lower


def test_loraplus_groups_give_B_ratio_times_lr():
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"]))
    groups = st.optim.loraplus_groups(model, lr=1e-4)
    assert groups[1]["lr"] == pytest.approx(16e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".B") for p in groups[1]["params"])
    assert all(names[id(p)].endswith(".A") for p in groups[0]["params"])


def test_modules_to_save_trains_a_copy_and_round_trips(tmp_path):
    from tests.conftest import tiny_bert

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 7))
    base = tiny_bert()
    model = st.attach(base, st.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    trainable = [n for n, _ in model.trainable_parameters()]
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    randomize(model)
    with torch.no_grad():
        model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    torch.testing.assert_close(output(st.load(tiny_bert(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)


def test_bias_lora_only_trains_wrapped_biases():
    model = st.attach(tiny_gpt2(), st.LoraConfig(r=2, targets=["c_attn"], bias="lora_only"))
    keys = list(model.adapter_state_dict())
    assert sum(k.endswith("c_attn.base_layer.bias") for k in keys) == 2  # both layers' wrapped biases
    assert not any("c_fc" in k or "ln_" in k for k in keys)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == sum(
        model.adapter_state_dict()[k].numel() for k in keys)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_linear_gradients_match_autograd(bias):
    from slimtune.methods.lora import _LoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True) if bias else None
    A = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    inputs = (x, W, b, A, B, 0.7)
    assert torch.autograd.gradcheck(_LoraLinear.apply, inputs)
    reference = torch.nn.functional.linear(x, W, b) + 0.7 * (x @ A.T) @ B.T
    torch.testing.assert_close(_LoraLinear.apply(*inputs), reference)
