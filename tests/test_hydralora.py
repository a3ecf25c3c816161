"""HydraLoRA (shared A, several B heads, a token router) on the tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune as st
import slimtune.methods.hydralora  # noqa: F401  (registers hydralora without the shared import)
import tests.test_contract as contract
from slimtune.config import config_from_dict
from slimtune.errors import ConfigError
from slimtune.layer import AdapterLayer
from slimtune.methods.hydralora import HydraLora, HydraLoraConfig
from tests.conftest import MODELS, VOCAB, assert_rows_match_alone, fit, output, randomize, tiny_llama

LINEARS = contract.LINEARS


def hydra(fam: str, **kw) -> HydraLoraConfig:
    return HydraLoraConfig(**{"r": 2, "num_heads": 3, "targets": LINEARS[fam], **kw})


EXAMPLES = {
    **{f"hydralora-{k}": v for k, v in contract.per_family(hydra).items()},
    "hydralora-top2_dropout": contract.Example(tiny_llama, lambda: hydra("llama", top_k=2, dropout=0.1)),
}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    monkeypatch.setitem(contract.EXAMPLES, example_id, EXAMPLES[example_id])
    contract.test_contract(example_id, ids, tmp_path)


def heads_of(model) -> list[tuple[HydraLora, nn.Module]]:
    out = [(m.adapters["default"], m.base_layer) for m in model.modules() if isinstance(m, AdapterLayer)]
    assert out and all(isinstance(a, HydraLora) for a, _ in out)
    return out


@pytest.mark.parametrize("fam", MODELS)
def test_identity_at_init(fam, ids):
    ref = output(MODELS[fam](), ids)
    model = st.attach(MODELS[fam](), hydra(fam))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    assert all(bool((a.B == 0).all()) for a, _ in heads_of(model))


@pytest.mark.parametrize("top_k", [None, 2])
def test_forward_is_the_formula(top_k):
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(6, 5)), HydraLoraConfig(r=3, alpha=6.0, num_heads=4, top_k=top_k,
                                                                       targets=["0"]))
    randomize(model, scale=0.5)
    a, base = heads_of(model)[0]
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(1))
    w = torch.softmax(x @ a.router.weight.T, -1)  # (2, 7, n)
    if top_k is not None:
        top, idx = w.topk(top_k, -1)
        w = torch.zeros_like(w).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    want = base(x) + sum(w[..., i:i + 1] * (2.0 * x @ a.A.T @ a.B[i].T) for i in range(4))  # s = 6 / 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)


def test_one_head_is_lora_with_the_same_a_and_b(ids):
    """The outside reference: with n = 1 the router weight is 1 and HydraLoRA is LoRA (A, B_1)."""
    model = st.attach(tiny_llama(), hydra("llama", num_heads=1, r=3, alpha=5.0))
    randomize(model, scale=0.2)
    lora = st.attach(tiny_llama(), st.LoraConfig(r=3, alpha=5.0, targets=LINEARS["llama"]))
    with torch.no_grad():
        for (h, _), layer in zip(heads_of(model), lora.view("default").layers.values(), strict=True):
            layer.A.copy_(h.A)
            layer.B.copy_(h.B[0])
    torch.testing.assert_close(output(model, ids), output(lora, ids), atol=1e-5, rtol=1e-5)


def test_parameter_count_is_the_formula():
    model = st.attach(tiny_llama(), hydra("llama", r=4, num_heads=5))
    want = sum(4 * b.in_features + 5 * 4 * b.out_features + 5 * b.in_features for _, b in heads_of(model))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == want
    assert model.adapter_parameter_count("default") == want


def test_gradients_reach_a_every_head_and_the_router(ids):
    model = st.attach(tiny_llama(), hydra("llama"))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for a, _ in heads_of(model):
        assert a.A.grad is not None and a.router.weight.grad is not None
        assert all(bool(a.B.grad[i].abs().sum() > 0) for i in range(3))  # heads are zero, their gradients not
        assert a.router.weight.grad.abs().sum() == 0  # the heads are zero: w does not matter yet
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_toy_fit_lowers_the_loss_and_the_heads_drift_apart():
    model = st.attach(tiny_llama(), hydra("llama"))
    losses = fit(model, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)), steps=12,
                 lr=2e-2)
    assert losses[-1] < losses[0] - 0.1, losses[::4]
    for a, _ in heads_of(model):  # one A, but the router makes each head see other tokens
        assert (a.B[0] - a.B[1]).abs().max() > 0.01 * a.B[0].abs().max()


def test_routing_is_balanced_at_init_and_the_load_balance_loss_is_switchs(ids):
    model = st.attach(tiny_llama(), hydra("llama", num_heads=4, load_balance=0.2, router_init=0.0))
    model(input_ids=ids)
    torch.testing.assert_close(model.regularization_loss(), torch.tensor(0.2), atol=1e-7, rtol=0)
    model = st.attach(tiny_llama(), hydra("llama", num_heads=4, load_balance=0.2))
    randomize(model, scale=0.5)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0]))
             for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    terms = []
    for name, x in seen.items():
        W = model.get_submodule(name).adapters["default"].router.weight  # (4, d_in)
        p = torch.softmax(x.reshape(-1, x.shape[-1]) @ W.T, -1)
        terms.append(4 * (F.one_hot(p.argmax(-1), 4).float().mean(0) * p.mean(0)).sum())
    torch.testing.assert_close(model.regularization_loss(), 0.2 * torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)


def test_mixed_batch_rows_equal_each_adapter_alone(ids):
    model = st.attach(tiny_llama(), hydra("llama"), name="a")
    model.add(hydra("llama", num_heads=2), name="b")
    randomize(model, scale=0.3)
    assert_rows_match_alone(model, torch.cat([ids, ids.flip(0)]), ["a", "b", None, "b", "a", None])


def test_bfloat16_identity_at_init(ids):
    ref = output(tiny_llama().to(torch.bfloat16), ids)
    model = st.attach(tiny_llama().to(torch.bfloat16), hydra("llama"))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_config_round_trip_not_mergeable_and_no_peft_format(tmp_path):
    cfg = hydra("gpt2", top_k=0)
    assert cfg.top_k is None and config_from_dict(cfg.to_dict()) == cfg
    assert not st.METHODS["hydralora"].method.is_mergeable(cfg)
    model = st.attach(tiny_llama(), hydra("llama"))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    with pytest.raises(NotImplementedError, match="HF PEFT has no such method"):
        model.save(tmp_path / "p", format="peft")


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r=0: expected an int >= 1"),
    ({"num_heads": 0}, "num_heads=0: expected an int >= 1"),
    ({"top_k": 4}, r"top_k=4: expected None or 0 .* 1..num_heads=3"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"router_init": -0.1}, "router_init=-0.1"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        hydra("llama", **kwargs)
    with pytest.raises(ConfigError, match="Did you mean 'num_heads'"):
        config_from_dict({"method": "hydralora", "lora_nums": 3, "targets": ["q_proj"]})
