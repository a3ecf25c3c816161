"""The general MoE layer (any layer method as expert), MoLoRA and MoV on the tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune as st
import slimtune.methods.moe  # noqa: F401  (registers moe and mov without the shared import)
import tests.test_contract as contract
from slimtune.config import config_from_dict
from slimtune.errors import ConfigError
from slimtune.layer import AdapterLayer
from slimtune.methods.moe import Mixture, MoEConfig, MoV, MoVConfig
from tests.conftest import MODELS, VOCAB, assert_rows_match_alone, fit, output, randomize, tiny_gpt2, tiny_llama

LINEARS, FEEDFORWARD = contract.LINEARS, contract.FEEDFORWARD


def lora_moe(fam: str, **kw) -> MoEConfig:
    return MoEConfig(**{"expert": st.LoraConfig(r=2), "num_experts": 3, "top_k": 2, "targets": LINEARS[fam], **kw})


def ia3_moe(fam: str, **kw) -> MoEConfig:
    return MoEConfig(**{"expert": st.IA3Config(feedforward=FEEDFORWARD[fam]), "num_experts": 3, "top_k": None,
                        "targets": LINEARS[fam], **kw})


def mov(fam: str, **kw) -> MoVConfig:
    return MoVConfig(**{"num_experts": 3, "targets": LINEARS[fam], "feedforward": FEEDFORWARD[fam], **kw})


EXAMPLES = {
    **{f"moe-lora_top2-{k}": v for k, v in contract.per_family(lora_moe).items()},
    **{f"moe-ia3_soft-{k}": v for k, v in contract.per_family(ia3_moe, biases=True).items()},
    "moe-ia3_top1": contract.Example(tiny_llama, lambda: ia3_moe("llama", top_k=1)),
    "moe-molora": contract.Example(tiny_gpt2, lambda: MoEConfig.molora(num_experts=2, r=2, targets=LINEARS["gpt2"])),
    "moe-vera_shared": contract.Example(tiny_llama, lambda: MoEConfig(expert=st.VeraConfig(r=8), num_experts=2,
                                                                      top_k=None, targets=LINEARS["llama"])),
    "moe-oft_top2": contract.Example(tiny_gpt2, lambda: MoEConfig(expert=st.OftConfig(block_size=16), num_experts=3,
                                                                  targets=LINEARS["gpt2"])),  # input side, routed
    **{f"mov-{k}": v for k, v in contract.per_family(mov, biases=True).items()},
    "mov-input_top2": contract.Example(tiny_llama, lambda: mov("llama", top_k=2, router_input="input")),
}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    """The rows tests/test_contract.py gets for moe and mov pass its checks (save -> load exact, gradients only
    on adapter tensors, disabled() is the base, .to() reaches everything, detach gives the base back)."""
    monkeypatch.setitem(contract.EXAMPLES, example_id, EXAMPLES[example_id])
    contract.test_contract(example_id, ids, tmp_path)


def mixtures(model) -> list[tuple[nn.Module, nn.Module]]:
    """(adapter, base module) of every wrapped module."""
    out = [(m.adapters["default"], m.base_layer) for m in model.modules() if isinstance(m, AdapterLayer)]
    assert out and all(isinstance(a, (Mixture, MoV)) for a, _ in out)
    return out


# -- init ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lora_moe, ia3_moe, mov, lambda f: ia3_moe(f, top_k=2)])
@pytest.mark.parametrize("fam", MODELS)
def test_identity_at_init(make, fam, ids):
    ref = output(MODELS[fam](), ids)
    torch.testing.assert_close(output(st.attach(MODELS[fam](), make(fam)), ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("expert,atol", [(st.OftConfig(block_size=16), 0.0), (st.VeraConfig(r=8), 0.0),
                                         (st.LoraConfig(r=2, freeze_A=True), 0.0),
                                         (st.HRAConfig(r=2), 1e-6)])  # H u H u = I up to rounding, as HRA alone
def test_identity_at_init_with_other_experts(expert, atol, ids):
    ref = output(tiny_llama(), ids)
    model = st.attach(tiny_llama(), MoEConfig(expert=expert, targets=LINEARS["llama"]))
    torch.testing.assert_close(output(model, ids), ref, atol=atol, rtol=0)


def test_identity_at_init_in_bfloat16(ids):
    for cfg in (lora_moe("llama"), ia3_moe("llama"), mov("llama")):
        ref = output(tiny_llama().to(torch.bfloat16), ids)
        model = st.attach(tiny_llama().to(torch.bfloat16), cfg)
        assert {p.dtype for _, p in model.trainable_parameters()} == {torch.bfloat16}
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def router_inputs(model, ids) -> dict[str, torch.Tensor]:
    """The input each wrapped module saw (what its router reads), by module name."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: seen.__setitem__(n, args[0])))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("router_init,tol", [(0.0, 1e-7), (None, 0.025)])
def test_routing_is_balanced_at_init(router_init, tol):
    """Mean routing probabilities over 256 tokens: exactly uniform with a zero router, within 10% of uniform by
    default (per token they differ: about +-0.1 here, which is what tells identical experts apart)."""
    kw = {} if router_init is None else {"router_init": router_init}
    model = st.attach(tiny_llama(), lora_moe("llama", num_experts=4, **kw))
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(7))
    for name, x in router_inputs(model, ids).items():
        router = model.get_submodule(name).adapters["default"].router
        mean = router.probs(x).reshape(-1, 4).mean(0)
        torch.testing.assert_close(mean, torch.full((4,), 0.25), atol=tol, rtol=0)


# -- the formula against hand-written references ----------------------------------------------------------
def one_linear(d_in: int = 6, d_out: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out))


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_lora_experts_compute_the_mixture_formula(top_k):
    model = st.attach(one_linear(), MoEConfig(expert=st.LoraConfig(r=2, alpha=3.0), num_experts=3, top_k=top_k,
                                              targets=["0"]))
    randomize(model, scale=0.5)
    moe, base = mixtures(model)[0]
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(x @ moe.router.weight.T, -1)  # (2, 4, E)
    if top_k is not None:
        top, idx = p.topk(top_k, -1)
        p = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    want = base(x)
    for i, e in enumerate(moe.experts):
        want = want + p[..., i:i + 1] * (1.5 * x @ e.A.T @ e.B.T)  # s = alpha / r = 1.5
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)


def test_feedforward_ia3_experts_mix_their_inputs():
    """y = W (x * sum_i g_i l_i) + b: the mixture of the experts' outputs W (x * l_i) + b, as sum_i g_i = 1."""
    model = st.attach(one_linear(), MoEConfig(expert=st.IA3Config(feedforward=True), num_experts=3, top_k=None,
                                              targets=["0"]))
    randomize(model, scale=0.5)
    moe, base = mixtures(model)[0]
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    g = torch.softmax(x @ moe.router.weight.T, -1)
    outputs = torch.stack([base(x * e.l.view(-1)) for e in moe.experts], -1)  # (7, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(model(x), (outputs * g[:, None, :]).sum(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True])
def test_mov_equals_the_moe_layer_with_ia3_experts(feedforward, ids):
    """Soft-merging the vectors before applying them (MoV) = mixing the IA3 experts' outputs (MoE layer)."""
    targets = ["k_proj", "down_proj"]
    ff = ["down_proj"] if feedforward else None
    moe = st.attach(tiny_llama(), MoEConfig(expert=st.IA3Config(feedforward=ff), num_experts=4, top_k=None,
                                            targets=targets))
    randomize(moe, scale=0.3)
    vec = st.attach(tiny_llama(), MoVConfig(num_experts=4, targets=targets, feedforward=ff, router_input="input"))
    with torch.no_grad():
        for (mix, _), (mv, _) in zip(mixtures(moe), mixtures(vec), strict=True):
            mv.router.weight.copy_(mix.router.weight)
            mv.L.copy_(torch.stack([e.l.view(-1) for e in mix.experts]))
    torch.testing.assert_close(output(vec, ids), output(moe, ids), atol=1e-5, rtol=1e-5)


def test_mov_router_reads_the_scaled_activation_by_default():
    model = st.attach(one_linear(), MoVConfig(num_experts=3, targets=["0"], top_k=2))
    randomize(model, scale=0.5)
    mv, base = mixtures(model)[0]
    assert tuple(mv.router.weight.shape) == (3, 5)  # reads base(x): d_out
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    h = base(x)
    p = torch.softmax(h @ mv.router.weight.T, -1)
    top, idx = p.topk(2, -1)
    g = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), h * (g @ mv.L), atol=1e-6, rtol=1e-5)


# -- parameters and gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", [st.LoraConfig(r=2), st.IA3Config(feedforward=["down_proj"]),
                                    st.VeraConfig(r=8), st.OftConfig(block_size=16)])
def test_parameter_count_is_num_experts_times_the_expert_plus_the_routers(expert):
    """The outside reference: the expert method attached alone on the same modules. Shared state (VeRA's
    frozen projections) is counted once: the experts share it."""
    targets = ["q_proj", "down_proj"]
    alone = st.attach(tiny_llama(), expert.replace(targets=targets))
    trainable = sum(p.numel() for _, p in alone.trainable_parameters())
    shared = alone.adapter_parameter_count("default") - trainable
    model = st.attach(tiny_llama(), MoEConfig(expert=expert, num_experts=3, targets=targets))
    routers = sum(3 * base.in_features for _, base in mixtures(model))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == 3 * trainable + routers
    assert model.adapter_parameter_count("default") == 3 * trainable + routers + shared


def test_mov_parameter_count_is_the_formula():
    for reads in ("scaled", "input"):
        model = st.attach(tiny_llama(), mov("llama", num_experts=5, router_input=reads))
        want = 0
        for _, base in mixtures(model):
            ff = base.out_features == 64 and base.in_features == 128  # down_proj (128 -> 64)
            d, d_router = (base.in_features, base.in_features) if ff else \
                (base.out_features, base.out_features if reads == "scaled" else base.in_features)
            want += 5 * d + 5 * d_router
        assert model.adapter_parameter_count("default") == want


def test_top_k_sends_each_token_to_k_experts_and_unused_experts_get_zero_gradients():
    model = st.attach(one_linear(), MoEConfig(expert=st.LoraConfig(r=2), num_experts=4, top_k=1, targets=["0"]))
    randomize(model, scale=0.5)
    moe, _ = mixtures(model)[0]
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # every token with x_0 > 0 goes to expert 2, the others to expert 0
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4)).abs()
    model.train()
    model(x).pow(2).sum().backward()
    grads = [e.B.grad for e in moe.experts]
    assert all(g is not None for g in grads)
    assert [bool(g.abs().sum() > 0) for g in grads] == [False, False, True, False]
    assert moe.router.weight.grad is not None


def test_lora_fa_experts_keep_a_frozen(ids):
    model = st.attach(tiny_llama(), lora_moe("llama", expert=st.LoraConfig(r=2, freeze_A=True)))
    trainable = {n.split(".adapters.default.")[1] for n, _ in model.trainable_parameters()}
    assert trainable == {"router.weight"} | {f"experts.{i}.B" for i in range(3)}
    moe, _ = mixtures(model)[0]
    assert "experts.0.A" in dict(moe.named_buffers())


# -- load balancing -----------------------------------------------------------------------------------------
def test_load_balance_loss_equals_a_hand_computation(ids):
    model = st.attach(tiny_llama(), lora_moe("llama", num_experts=4, top_k=2, load_balance=0.3))
    randomize(model, scale=0.5)  # routers far from uniform
    model.train()
    inputs = router_inputs(model, ids)
    terms = []
    for name, x in inputs.items():
        W = model.get_submodule(name).adapters["default"].router.weight
        p = torch.softmax(x.reshape(-1, x.shape[-1]) @ W.T, -1)  # (tokens, E)
        f = F.one_hot(p.argmax(-1), 4).float().mean(0)
        terms.append(4 * (f * p.mean(0)).sum())
    want = 0.3 * torch.stack(terms).mean()
    got = model.regularization_loss()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got.item() > 0.3  # above the balanced value
    got.backward()
    assert all(moe.router.weight.grad is not None for moe, _ in mixtures(model))
    assert model.regularization_loss() is None  # read once per call


def test_load_balance_loss_is_its_weight_at_perfect_balance_and_none_without_gradients(ids):
    model = st.attach(tiny_llama(), lora_moe("llama", router_init=0.0, load_balance=0.05))
    model(input_ids=ids)
    torch.testing.assert_close(model.regularization_loss(), torch.tensor(0.05), atol=1e-7, rtol=0)
    output(model, ids)  # no gradients: nothing recorded, and the last call's term is gone
    assert model.regularization_loss() is None
    off = st.attach(tiny_llama(), lora_moe("llama", load_balance=0.0))
    off(input_ids=ids)
    assert off.regularization_loss() is None


# -- training, files, mixed batches --------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,lr", [(lora_moe("llama", load_balance=0.01), 2e-2),
                                    (MoEConfig.molora(num_experts=3, r=2, targets=LINEARS["llama"]), 2e-2),
                                    (mov("llama", targets=["k_proj", "v_proj", "down_proj"]), 2e-1)])
def test_toy_fit_lowers_the_loss(cfg, lr):
    model = st.attach(tiny_llama(), cfg)
    data = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=12, lr=lr)
    assert losses[-1] < losses[0] - 0.1, losses[::4]


def test_routers_learn_to_tell_identical_ia3_experts_apart():
    """MoV's vectors all start at 1; the random router breaks the symmetry, so they drift apart in training."""
    model = st.attach(tiny_llama(), mov("llama"))
    fit(model, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)), steps=5, lr=5e-2)
    for mv, _ in mixtures(model):
        assert (mv.L[0] - mv.L[1]).abs().max() > 1e-3


def test_config_round_trips_through_json_and_yaml_dicts(tmp_path):
    cfg = lora_moe("llama", expert=st.LoraConfig(r=2, rank_pattern={"q_proj": 3}))
    assert config_from_dict(cfg.to_dict()) == cfg
    yaml_like = {"method": "moe", "expert": {"method": "ia3", "feedforward": ["down_proj"]}, "top_k": 0,
                 "targets": ["q_proj", "down_proj"]}
    loaded = config_from_dict(yaml_like)
    assert isinstance(loaded.expert, st.IA3Config) and loaded.top_k is None
    assert config_from_dict(mov("gpt2").to_dict()) == mov("gpt2")


def test_save_and_load_keep_the_rank_pattern_and_feedforward_choices(ids, tmp_path):
    cfg = MoEConfig(expert=st.LoraConfig(r=2, rank_pattern={"down_proj": 3}), targets=["q_proj", "down_proj"])
    model = st.attach(tiny_llama(), cfg)
    randomize(model)
    ranks = {n.split(".")[-1]: m.experts[0].r for n, m in model.view("default").layers.items()}
    assert ranks == {"q_proj": 2, "down_proj": 3}
    model.save(tmp_path / "a")
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), output(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("make", [lora_moe, mov])
def test_mixed_batch_rows_equal_each_adapter_alone(make, ids):
    model = st.attach(tiny_llama(), make("llama"), name="a")
    model.add(make("llama"), name="b")
    randomize(model, scale=0.3)
    assert_rows_match_alone(model, torch.cat([ids, ids.flip(0)]), ["a", "b", None, "b", "a", None])


def test_not_mergeable(ids):
    for cfg in (lora_moe("llama"), mov("llama")):
        assert not st.METHODS[cfg.method].method.is_mergeable(cfg)
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            st.attach(tiny_llama(), cfg).merge()


def test_no_peft_format():
    import peft

    assert not {"MOE", "MOV", "MOLORA"} & {t.value for t in peft.PeftType}
    model = st.attach(tiny_llama(), mov("llama"))
    with pytest.raises(NotImplementedError, match="HF PEFT has no such method"):
        model.save("/nonexistent/never-written", format="peft")


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"expert": st.PromptTuningConfig(num_virtual_tokens=2)}, r"prompt_tuning\) is a input method"),
    ({"expert": st.AdaLoraConfig(total_step=10)}, "per-adapter hooks"),
    ({"expert": st.HybridConfig(parts=[st.LoraConfig(targets=["q_proj"])])}, "per-adapter hooks"),
    ({"expert": {"method": "lora", "rank": 2}}, r"MoEConfig.expert: LoraConfig has no field 'rank'.*'r'"),
    ({"expert": "lora"}, "expected a registered layer method's config"),
    ({"num_experts": 0}, r"num_experts=0: expected an int >= 1"),
    ({"top_k": 5}, r"top_k=5: expected None or 0 .* 1..num_experts=4"),
    ({"router": "task"}, "MOELoRA"),
    ({"load_balance": -1}, "load_balance=-1"),
    ({"targets": None}, "expected the modules to adapt"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**{"targets": ["q_proj"], **kwargs})


def test_experts_that_cannot_be_per_expert_are_refused_when_attached():
    with pytest.raises(NotImplementedError, match="changes the base weight"):
        st.attach(tiny_llama(), lora_moe("llama", expert=st.LoraConfig(r=2, init="pissa")))
    with pytest.raises(ConfigError, match="trains base tensors"):
        st.attach(tiny_gpt2(), lora_moe("gpt2", expert=st.LoraConfig(r=2, bias="all")))
    with pytest.raises(NotImplementedError, match="linear layers only"):
        st.attach(contract.conv_model(), MoEConfig(targets=["0"]))
    with pytest.raises(ConfigError, match="feedforward"):
        st.attach(tiny_llama(), MoEConfig(expert=st.IA3Config(feedforward="nothing_here"), targets=["q_proj"]))


def test_summary_describes_the_mixture():
    text = st.attach(tiny_llama(), lora_moe("llama", load_balance=0.01)).summary(show=False)
    assert "3 lora experts, top-2, load balance 0.01" in text


def test_a_mixture_can_be_a_hybrid_part_and_its_balance_loss_reaches_the_trainer_hook(ids):
    cfg = st.HybridConfig(parts=[st.PromptTuningConfig(num_virtual_tokens=2),
                                 lora_moe("llama", router_init=0.0, load_balance=0.1)])
    model = st.attach(tiny_llama(), cfg)
    model(input_ids=ids)
    torch.testing.assert_close(model.regularization_loss(), torch.tensor(0.1), atol=1e-7, rtol=0)


def test_expert_regularisers_are_summed_over_the_experts():
    """HRA's orthogonality term, for each expert as if it were an adapter of its own, plus the balance term."""
    cfg = MoEConfig(expert=st.HRAConfig(r=2, regularization=0.5), num_experts=3, load_balance=0.0,
                    targets=LINEARS["llama"])
    model = st.attach(tiny_llama(), cfg)
    randomize(model, scale=0.3)
    layers = [a for a, _ in mixtures(model)]
    want = sum(0.5 * sum(m.experts[i].orthogonality() for m in layers) for i in range(3))
    assert want > 0
    torch.testing.assert_close(model.regularization_loss(), want, atol=1e-6, rtol=1e-6)


def test_experts_with_step_hooks_or_task_ids_are_refused():
    for expert, match in [(st.BottleneckConfig.pfeiffer(), "per-adapter hooks"),
                          (st.DyLoraConfig(r=4), "per-adapter hooks"),
                          (MoVConfig(), "is a mixture itself")]:
        with pytest.raises(ConfigError, match=match):
            MoEConfig(expert=expert, targets=["q_proj"])
