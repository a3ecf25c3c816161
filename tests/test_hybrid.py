"""Hybrids by composition (HybridConfig), UniPELT and MAM on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
import tests.test_contract as contract
from slimtune.config import config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.hybrid import HybridConfig, part_view
from slimtune.methods.hybrid_parts import Chain, GatedPrefix
from tests.conftest import MODELS, VOCAB, assert_rows_match_alone, fit, output, randomize, tiny_gpt2, tiny_llama

LINEARS, FEEDFORWARD = contract.LINEARS, contract.FEEDFORWARD
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def lora_ia3(fam: str) -> HybridConfig:
    return HybridConfig(parts=[st.LoraConfig(r=2, targets=LINEARS[fam]),
                               st.IA3Config(targets=LINEARS[fam], feedforward=FEEDFORWARD[fam])])


def small_unipelt(**kw) -> HybridConfig:
    return HybridConfig.unipelt(prefix=st.PrefixTuningConfig(num_virtual_tokens=3), **kw)


def small_mam(**kw) -> HybridConfig:
    return HybridConfig.mam(prefix=st.PrefixTuningConfig(num_virtual_tokens=3), **kw)


EXAMPLES = {
    **{f"hybrid-lora_ia3-{k}": v for k, v in contract.per_family(lora_ia3, biases=True).items()},
    **{f"hybrid-unipelt-{k}": v for k, v in contract.per_family(lambda f: small_unipelt()).items()},
    **{f"hybrid-mam-{k}": v for k, v in contract.per_family(lambda f: small_mam(), ("llama", "gpt2")).items()},
    "hybrid-vera_bitfit": contract.Example(contract.with_biases(tiny_gpt2), lambda: HybridConfig(
        parts=[st.VeraConfig(r=8, targets=["c_attn"]), st.BitFitConfig()])),  # shared tensors + selections
    "hybrid-prompt_lora": contract.Example(tiny_llama, lambda: HybridConfig(
        parts=[st.PromptTuningConfig(num_virtual_tokens=3), st.LoraConfig(r=2, targets=["q_proj"])])),
}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    """The rows tests/test_contract.py gets for hybrids pass its checks."""
    monkeypatch.setitem(contract.EXAMPLES, example_id, EXAMPLES[example_id])
    contract.test_contract(example_id, ids, tmp_path)


# -- composition ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", MODELS)
def test_lora_ia3_hybrid_equals_the_two_adapters_active_together(fam, ids):
    """The outside reference: the plain engine with two adapters (LoRA, then IA3) active at once."""
    hybrid = st.attach(contract.with_biases(MODELS[fam])(), lora_ia3(fam))
    randomize(hybrid)
    pair = st.attach(contract.with_biases(MODELS[fam])(), lora_ia3(fam).parts[0], name="a")
    pair.add(lora_ia3(fam).parts[1], name="b").use(["a", "b"])
    tensors = hybrid.adapter_state_dict()
    for i, name in enumerate(("a", "b")):
        prefix = f".parts.{i}."
        theirs = pair.adapter_state_dict(name)
        mine = {k.replace(prefix, "."): v for k, v in tensors.items() if prefix in k}
        assert set(mine) == set(theirs)
        pair.load_adapter_state_dict(mine, name)
    torch.testing.assert_close(output(hybrid, ids), output(pair, ids), atol=0, rtol=0)
    hybrid.merge()
    torch.testing.assert_close(output(hybrid, ids), output(pair, ids), atol=1e-5, rtol=1e-5)


def test_mergeable_only_when_every_part_is_and_no_gates():
    method = st.METHODS["hybrid"].method
    assert method.is_mergeable(lora_ia3("llama"))
    assert not method.is_mergeable(lora_ia3("llama").replace(gates=True))
    assert not method.is_mergeable(small_mam())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        st.attach(tiny_llama(), small_mam()).merge()


def test_a_yaml_hybrid_round_trips(tmp_path):
    (tmp_path / "h.yaml").write_text(
        "method: hybrid\nmodules_to_save: [classifier]\nparts:\n"
        "  - {method: lora, r: 4, targets: [query, value]}\n"
        "  - {method: bottleneck, placement: pfeiffer, reduction_factor: 8}\n")
    cfg = st.load_config(tmp_path / "h.yaml")
    assert isinstance(cfg, HybridConfig) and [p.method for p in cfg.parts] == ["lora", "bottleneck"]
    assert cfg.parts[0].r == 4 and cfg.modules_to_save == ["classifier"]
    data = json.loads(cfg.to_json())
    assert data["parts"][1]["method"] == "bottleneck" and config_from_dict(data) == cfg
    assert config_from_dict(HybridConfig.unipelt().to_dict()) == HybridConfig.unipelt()


def test_saved_file_names_each_part(tmp_path, ids):
    model = st.attach(tiny_llama(), small_unipelt())
    model.save(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert [p["method"] for p in raw["config"]["parts"]] == ["prefix_tuning", "bottleneck", "lora"]
    keys = set(model.adapter_state_dict())
    assert "parts.0.prompt_embeddings" in keys and "parts.0.gates.0.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.parts.2.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.gates.2.weight" in keys
    with pytest.raises(NotImplementedError, match="format='slimtune'"):
        model.save(tmp_path / "peft", format="peft")


def test_projected_prefix_part_saves_the_computed_prefix(tmp_path, ids):
    prefix = st.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    model = st.attach(tiny_llama(), HybridConfig.mam(prefix=prefix))
    randomize(model)
    model.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]["parts"][0]
    assert saved["prefix_projection"] is False
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), output(model, ids), atol=0, rtol=0)


# -- UniPELT ------------------------------------------------------------------------------------------------
def test_unipelt_gates_at_init(ids):
    model = st.attach(tiny_llama(), small_unipelt())
    gates = [g for n, g in model.named_modules() if isinstance(g, torch.nn.Linear) and ".gates." in n]
    assert len(gates) == 2 + 2 + 4  # a prefix gate per layer; a gate per adapter position and LoRA module
    weights = torch.cat([g.weight.flatten() for g in gates])
    assert all((g.bias == 0).all() for g in gates) and 0.015 < weights.std() < 0.025  # N(0, 0.02), 0
    seen = []
    hooks = [chain.register_forward_hook(lambda m, a, o: seen.extend(m.gate(k, a[0]) for k in m.gates))
             for chain in model.view("default").layers.values()]
    output(model, ids)
    for hook in hooks:
        hook.remove()
    prefix = model.inputs["default"].parts["0"]
    hidden = torch.randn(3, 10, 64)
    seen += [prefix.gate_values(i, hidden) for i in range(2)]
    values = torch.cat([s.flatten() for s in seen])
    assert 0.35 < values.min() and values.max() < 0.65  # sigmoid of small numbers: every part half on


@pytest.mark.parametrize("init, tol", [("mam", 0.0), ("bert", 1e-2)])
def test_unipelt_at_init_is_its_gated_prefix_alone(init, tol, ids):
    """LoRA (B = 0) adds exactly nothing, the adapter nothing (mam init) or nearly nothing (bert init)."""
    model = st.attach(tiny_llama(), small_unipelt(adapter=st.BottleneckConfig.pfeiffer(init=init)))
    alone = st.attach(tiny_llama(), HybridConfig(parts=[st.PrefixTuningConfig(num_virtual_tokens=3)], gates=True))
    alone.load_adapter_state_dict({k: v for k, v in model.adapter_state_dict().items() if k.startswith("parts.0.")})
    got, want = output(model, ids), output(alone, ids)
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert tol == 0 or not torch.equal(got, want)


def test_prefix_gates_scale_the_prefix_keys_and_values(ids):
    """Gates forced to 1 give plain prefix tuning; forced to 0 zero the prefix keys and values."""
    model = st.attach(tiny_llama(), HybridConfig(parts=[st.PrefixTuningConfig(num_virtual_tokens=3)], gates=True))
    plain = st.attach(tiny_llama(), st.PrefixTuningConfig(num_virtual_tokens=3))
    gated = model.inputs["default"].parts["0"]
    plain.inputs["default"].embedding.data.copy_(gated.prefix.embedding)
    for bias, reference in ((40.0, plain), (-40.0, None)):
        with torch.no_grad():
            for g in gated.gates:
                g.weight.zero_()
                g.bias.fill_(bias)
        if reference is None:
            plain.inputs["default"].embedding.data.zero_()
        torch.testing.assert_close(output(model, ids), output(plain, ids), atol=1e-5, rtol=1e-5)


def test_parameter_count_is_the_parts_plus_gates():
    cfg = small_unipelt()
    model = st.attach(tiny_llama(), cfg)
    alone = sum(st.attach(tiny_llama(), p).adapter_parameter_count("default") for p in cfg.parts)
    d, d_ff, layers = 64, 128, 2
    gates = layers * 2 * (d + 1) + layers * (d_ff + 1) + 2 * layers * (d + 1)  # prefix, down_proj, q and v
    assert model.adapter_parameter_count("default") == alone + gates
    assert sum(p.numel() for _, p in model.trainable_parameters()) == alone + gates


@pytest.mark.parametrize("make, fam", [(small_unipelt, f) for f in MODELS] + [(small_mam, f) for f in DECODERS])
def test_right_padded_rows_equal_unpadded(make, fam):
    torch.manual_seed(0)
    long, short = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (1, 6))
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    model = st.attach(MODELS[fam](), make())
    randomize(model)
    batch, alone = output(model, padded, attention_mask=mask), output(model, short)
    got = batch[1] if fam == "bert" else batch[1, :6]
    torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_mam_at_init_is_its_prefix_alone_and_generates_with_cache(ids):
    model = st.attach(tiny_llama(), small_mam())
    plain = st.attach(tiny_llama(), st.PrefixTuningConfig(num_virtual_tokens=3))
    plain.inputs["default"].embedding.data.copy_(model.inputs["default"].parts["0"].embedding)
    torch.testing.assert_close(output(model, ids), output(plain, ids), atol=0, rtol=0)  # parallel: up = 0
    randomize(model)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, **kw), model.generate(input_ids=ids, use_cache=False, **kw))


@pytest.mark.parametrize("make", [small_unipelt, small_mam])
def test_toy_fit_lowers_the_loss(make):
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    losses = fit(st.attach(tiny_llama(), make()), data, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.25, losses[::5]


# -- parts keep their own hooks -------------------------------------------------------------------------------
def test_parts_keep_their_step_regularizer_and_description(ids):
    ada = st.AdaLoraConfig(init_r=4, target_r=2, total_step=10, targets=["q_proj"])
    model = st.attach(tiny_llama(), HybridConfig(parts=[ada, st.IA3Config(targets=["k_proj"])]))
    alone = st.attach(tiny_llama(), ada)
    randomize(model)
    alone.load_adapter_state_dict({k.replace(".parts.0.", "."): v for k, v in model.adapter_state_dict().items()
                                   if ".parts.0." in k})
    torch.testing.assert_close(model.regularization_loss(), alone.regularization_loss())
    assert "adalora" in model.summary(show=False)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.step(1)  # AdaLoRA's importance update on the part's own modules


def test_parts_keep_the_hooks_they_attach(ids):
    """Child-tuning F masks its gradients through `attached`: it does so inside a hybrid too."""
    cfg = HybridConfig(parts=[st.ChildTuningFConfig(p=0.3, targets=["q_proj"]), st.LoraConfig(r=2, targets=["v_proj"])])
    model = st.attach(tiny_llama(), cfg)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [e.values.grad for e in model.view("default").selections.values()]
    kept = sum(int((g != 0).sum()) for g in grads) / sum(g.numel() for g in grads)
    assert 0.2 < kept < 0.4


def test_a_part_sees_only_its_own_modules_and_selections():
    cfg = HybridConfig(parts=[st.BitFitConfig(), st.LoraConfig(r=2, targets=["c_attn"])])
    view = st.attach(tiny_gpt2(), cfg).view("default")
    bitfit, lora = part_view(view, 0), part_view(view, 1)
    assert bitfit.selections and not bitfit.layers
    assert not lora.selections and set(lora.layers) == set(view.layers)


def test_a_frozen_part_tensor_stays_frozen_and_is_saved(ids, tmp_path):
    model = st.attach(tiny_llama(), HybridConfig(parts=[st.LoraConfig(r=2, freeze_A=True, targets=["q_proj"])]))
    assert {n.split(".")[-1] for n, _ in model.trainable_parameters()} == {"B"}
    chain = next(iter(model.view("default").layers.values()))
    assert isinstance(chain, Chain) and "A" in dict(chain.parts["0"].named_buffers())
    model.use("default")  # the engine's refresh of what trains leaves it frozen
    assert {n.split(".")[-1] for n, _ in model.trainable_parameters()} == {"B"}
    randomize(model)
    model.save(tmp_path)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), output(model, ids), atol=0, rtol=0)


def test_mixed_batch_rows_see_their_own_adapter(ids):
    model = st.attach(tiny_llama(), lora_ia3("llama"), name="h")
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="other")
    randomize(model)
    assert_rows_match_alone(model, ids, ["h", "other", None])


# -- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"parts": [st.LoraConfig(targets=["q_proj"])], "targets": ["q_proj"]}, "each part names its own"),
    ({"parts": []}, "non-empty list"),
    ({"parts": [{"method": "lorra", "r": 2}]}, "parts\\[0\\].*lora"),
    ({"parts": [{"method": "lora", "rank_x": 2}]}, "parts\\[0\\].*no field"),
    ({"parts": ["lora"]}, "expected a method config"),
    ({"parts": [st.LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"])]}, "on the HybridConfig itself"),
    ({"parts": [st.PrefixTuningConfig(), st.PrefixTuningConfig()]}, "both prefix_tuning"),
    ({"parts": [HybridConfig(parts=[st.LoraConfig(targets=["q_proj"])], gates=True)]}, "gates=True"),
    ({"parts": [st.AfloraConfig(r=2, total_step=10, targets=["q_proj"])]}, "changes what trains"),
    ({"parts": [st.MethodConfig()]}, "not a registered method config"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HybridConfig(**kwargs)


def test_nested_hybrids_with_the_same_gates_are_flattened():
    inner = HybridConfig(parts=[st.LoraConfig(targets=["q_proj"]), st.IA3Config(targets=["k_proj"])])
    outer = HybridConfig(parts=[inner, st.BitFitConfig()])
    assert [p.method for p in outer.parts] == ["lora", "ia3", "bitfit"]


@pytest.mark.parametrize("cfg, error, match", [
    (HybridConfig(parts=[st.PromptTuningConfig(num_virtual_tokens=3)], gates=True), ConfigError, "only layer parts"),
    (HybridConfig(parts=[st.BitFitConfig(), st.IA3Config(targets=["q_proj"])], gates=True), ConfigError,
     "cannot be gated"),
    (HybridConfig(parts=[st.BottleneckConfig.parallel(), st.LoraConfig(targets=["down_proj"])]), ConfigError,
     "inside it"),
    (HybridConfig(parts=[st.LoraConfig(targets=["q_proj"]), st.BitFitConfig(), st.BitFitConfig()]), ConfigError,
     "both train base tensor"),
])
def test_bad_combinations_are_refused_at_attach(cfg, error, match):
    base = tiny_llama(attention_bias=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error, match=match):
        st.attach(base, cfg)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_gated_prefix_finds_every_layer_of_each_family():
    for make in MODELS.values():
        model = st.attach(make(), HybridConfig(parts=[st.PrefixTuningConfig(num_virtual_tokens=2)], gates=True))
        assert isinstance(model.inputs["default"].parts["0"], GatedPrefix)
