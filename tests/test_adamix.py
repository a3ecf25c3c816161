"""AdaMix: expert sets with stochastic routing, averaged for inference, consistency regularisation."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
import tests.test_contract as contract
from slimtune.errors import ConfigError
from slimtune.methods.adamix import AdaMixConfig, Experts, consistency_loss, merge_experts, two_pass_loss
from tests.conftest import MODELS, VOCAB, output, randomize, tiny_llama

D, M = 64, 4
LINEARS = contract.LINEARS
# one expert per set in the contract rows: with M > 1 a training forward leaves the experts it did not pick
# without gradient, which the contract's gradient check (every trainable tensor gets one) cannot allow
EXAMPLES = {
    **{f"adamix-{k}": v for k, v in contract.per_family(lambda f: AdaMixConfig(num_experts=1)).items()},
    **{f"adamix-lora-{k}": v for k, v in contract.per_family(
        lambda f: AdaMixConfig(num_experts=1, expert="lora", r=2, targets=LINEARS[f])).items()},
}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    monkeypatch.setitem(contract.EXAMPLES, example_id, EXAMPLES[example_id])
    contract.test_contract(example_id, ids, tmp_path)


def experts(model) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def averaged_reference(model, cfg: st.MethodConfig) -> st.TunedModel:
    """The outside reference: a plain bottleneck adapter (or LoRA) holding the experts' averaged weights."""
    ref = st.attach(tiny_llama(), cfg)
    mine = model.adapter_state_dict()
    theirs = {}
    for key in ref.adapter_state_dict():
        stem, leaf = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
        name = {"lora_A.weight": "A.weight", "lora_B.weight": "B.weight"}.get(leaf, leaf)
        theirs[key] = mine[f"{stem}.{name}"].mean(0)
    ref.load_adapter_state_dict(theirs)
    return ref


@pytest.mark.parametrize("cfg, ref_cfg", [
    (AdaMixConfig(), st.BottleneckConfig.pfeiffer()),
    (AdaMixConfig(expert="lora", r=2, alpha=4, targets=["q_proj", "v_proj"]),
     st.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"])),
])
def test_merge_experts_gives_one_module_equal_to_the_averaged_adapter(cfg, ref_cfg, ids, tmp_path):
    model = st.attach(tiny_llama(), cfg)
    randomize(model)
    ref = averaged_reference(model, ref_cfg)
    before = output(model, ids)  # eval: the averaged weights
    torch.testing.assert_close(before, output(ref, ids), atol=1e-5, rtol=1e-5)
    merge_experts(model)
    assert {e.n for e in experts(model)} == {1}
    assert model.adapter_parameter_count("default") == ref.adapter_parameter_count("default")
    torch.testing.assert_close(output(model, ids), before, atol=1e-6, rtol=1e-6)
    model.save(tmp_path)
    loaded = st.load(tiny_llama(), tmp_path)
    assert loaded.configs["default"].num_experts == 1
    torch.testing.assert_close(output(loaded, ids), output(model, ids), atol=0, rtol=0)


def test_training_routes_each_module_to_one_random_expert(ids):
    model = st.attach(tiny_llama(), AdaMixConfig())
    randomize(model)
    model.train()
    torch.manual_seed(0)
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, second)  # two stochastic passes
    second.pow(2).mean().backward()
    for e in experts(model):
        used = [i for i in range(M) if e.weight.grad[i].abs().sum() > 0]
        assert len(used) == 1  # one down and one up expert per module and forward
    model.eval()
    torch.testing.assert_close(output(model, ids), output(model, ids), atol=0, rtol=0)


def test_consistency_loss_is_a_differentiable_symmetric_kl(ids):
    a, b = torch.randn(3, 10, 7), torch.randn(3, 10, 7)
    assert consistency_loss(a, a) == 0
    torch.testing.assert_close(consistency_loss(a, b), consistency_loss(b, a))
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = ((pa * (pa / pb).log()).sum(-1) + (pb * (pb / pa).log()).sum(-1)) / 2
    mask = torch.ones(3, 10)
    mask[0, 5:] = 0
    torch.testing.assert_close(consistency_loss(a, b, mask), kl[mask.bool()].mean())
    model = st.attach(tiny_llama(), AdaMixConfig(init="mam"))
    randomize(model)
    model.train()
    loss = two_pass_loss(model, {"input_ids": ids, "labels": ids}, weight=1.0)
    loss.backward()
    assert any(e.weight.grad is not None and e.weight.grad.abs().sum() > 0 for e in experts(model))


def test_toy_fit_with_the_consistency_loss_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    model = st.attach(tiny_llama(), AdaMixConfig(expert="lora", r=4, alpha=8, targets="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = two_pass_loss(model, {"input_ids": data, "labels": data}, weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses[::4]


@pytest.mark.parametrize("arch", MODELS)
def test_parameter_count_is_the_formula(arch):
    m = D // 16
    adapters = st.attach(MODELS[arch](), AdaMixConfig())  # after each FFN output: 2 positions
    assert adapters.adapter_parameter_count("default") == 2 * M * (2 * D * m + D + m)
    shared = st.attach(MODELS[arch](), AdaMixConfig(share="up"))
    assert shared.adapter_parameter_count("default") == 2 * (M * (D * m + m) + (m * D + D))
    if arch == "llama":
        lora = st.attach(MODELS[arch](), AdaMixConfig(expert="lora", r=2, targets=["q_proj", "k_proj"]))
        assert lora.adapter_parameter_count("default") == 2 * M * 2 * ((D + 64) + (D + 32))  # k: 2 KV heads of 16


@pytest.mark.parametrize("init, tol", [("bert", 1e-2), ("mam", 0.0)])
def test_identity_at_init(init, tol, ids):
    ref = output(tiny_llama(), ids)
    torch.testing.assert_close(output(st.attach(tiny_llama(), AdaMixConfig(init=init)), ids), ref, atol=tol, rtol=0)
    lora = st.attach(tiny_llama(), AdaMixConfig(expert="lora", targets=["q_proj"]))
    torch.testing.assert_close(output(lora, ids), ref, atol=0, rtol=0)  # B = 0


def test_lora_experts_merge_into_the_base(ids):
    model = st.attach(tiny_llama(), AdaMixConfig(expert="lora", r=2, targets=LINEARS["llama"]))
    randomize(model)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        st.attach(tiny_llama(), AdaMixConfig()).merge()


@pytest.mark.parametrize("kwargs, match", [
    ({"expert": "lora"}, "targets=None"),
    ({"num_experts": 0}, "num_experts"),
    ({"share": "both"}, "share"),
    ({"expert": "prefix"}, "expert"),
    ({"placement": "parallel"}, "placement"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaMixConfig(**kwargs)


def test_non_linear_targets_are_refused():
    with pytest.raises(NotImplementedError, match="Linear and GPT-2 Conv1D only"):
        st.attach(tiny_llama(), AdaMixConfig(targets=r".*\.mlp"))
