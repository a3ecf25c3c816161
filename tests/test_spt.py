"""SPT: sensitivity sum_b g^2 over calibration batches; under a budget, LoRA on matrices with many sensitive
entries and a sparse mask on the rest; lora.py's Lora through the layer hooks; exact save / load."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.layer import base_name, is_adapter_tensor
from slimtune.methods import spt
from slimtune.methods.base import Method
from slimtune.methods.lora import Lora
from slimtune.methods.spt import SptConfig, choose_lora, lora_sizes
from tests import test_contract
from tests.conftest import VOCAB, fit, output, tiny_gpt2, tiny_llama
from tests.selective_checks import base_state, file_size, lm_batches, masks_of, saved, train
from tests.test_fishmask import reference_fisher
from tests.test_lt_sft import tensor_shapes  # noqa: F401  (fixture)

CFG = {"density": 0.02, "r": 2}  # on the tiny Llama: LoRA on a few matrices, sparse entries on the rest


def brute_force_lora(scores: dict, sizes: dict, budget: int, threshold: float) -> set[str]:
    """The rule by a sweep down the sorted scores: add entries one at a time (ties together), switching a
    matrix to LoRA once it holds threshold * its LoRA's size; the last tie group whose cost fits wins."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    values, order = flat.sort(descending=True, stable=True)
    values, owner = values.tolist(), owner[order].tolist()
    counts, lora, cost, best = [0] * len(names), set(), 0, set()
    for pos, i in enumerate(owner):
        counts[i] += 1
        n = names[i]
        if n in lora:
            pass
        elif n in sizes and counts[i] >= threshold * sizes[n]:
            lora.add(n)
            cost += sizes[n] - (counts[i] - 1)
        else:
            cost += 1
        if pos + 1 == len(values) or values[pos + 1] != values[pos]:
            if cost > budget:
                break
            best = set(lora)
    return best


def test_the_rule_on_a_constructed_example():
    """a: 12 of its entries are the most sensitive of all (>= 0.1 * its LoRA size 100): a LoRA; b: 3 sensitive
    entries, a sparse mask; v (a bias) never gets a LoRA; the budget allows the LoRA and the rest."""
    a, b, v = torch.zeros(40, 40), torch.zeros(40, 40), torch.zeros(40)
    a.view(-1)[:12] = torch.arange(12) + 100.0
    b.view(-1)[:3] = torch.tensor([50.0, 40.0, 30.0])
    v[:2] = torch.tensor([20.0, 10.0])
    scores, sizes = {"a": a, "b": b, "v": v}, {"a": 100, "b": 100}
    assert choose_lora(scores, sizes, 105, 0.1) == ["a"]  # LoRA a (100) + b's 3 + v's 2 = 105
    assert choose_lora(scores, sizes, 99, 0.1) == []  # a's LoRA does not fit: 9 of a's entries + b + v instead
    assert choose_lora(scores, sizes, 105, 0.5) == []  # 12 < 0.5 * 100: sparse everywhere
    assert choose_lora(scores, {"a": 100, "b": 20}, 130, 0.1) == ["a", "b"]  # b: 3 >= 0.1 * 20


def test_the_rule_equals_a_brute_force_sweep_on_random_scores():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = {f"m{i}": torch.rand(30, 20, generator=g) ** (1 + 6 * torch.rand(1, generator=g).item())
                  for i in range(4)}
        scores["bias"] = torch.rand(20, generator=g)
        sizes = {f"m{i}": 50 for i in range(4)}
        budget, threshold = int(torch.randint(20, 400, (1,), generator=g)), [0.1, 0.3, 1.0][trial % 3]
        assert set(choose_lora(scores, sizes, budget, threshold)) == brute_force_lora(scores, sizes, budget, threshold)


def test_plan_and_attach_follow_the_rule_on_the_paper_sensitivity_and_fill_the_budget_exactly(ids):
    batches = lm_batches(ids, 2)
    cfg = spt.plan(tiny_llama(), SptConfig(**CFG), iter(batches))  # one pass: a one-shot iterator is enough
    names = [n for n, p in tiny_llama().named_parameters() if n.endswith("_proj.weight")]
    ref = reference_fisher(tiny_llama(), names, batches, per_example=False)  # sum of squared batch gradients
    n_total = sum(s.numel() for s in ref.values())
    budget = round(CFG["density"] * n_total)
    sizes = lora_sizes(tiny_llama(), names, CFG["r"])
    want = brute_force_lora(ref, sizes, budget, cfg.threshold)
    assert {f"{m}.weight" for m in cfg.lora_modules} == want and 0 < len(want) < len(names)
    model = st.attach(tiny_llama(), cfg, data=batches)
    layers = model.view("default").layers
    assert set(layers) == set(cfg.lora_modules) and all(type(m) is Lora and m.r == 2 for m in layers.values())
    lora_params = sum(sizes[f"{m}.weight"] for m in layers)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == budget  # LoRAs + sparse entries
    rest = {n: s for n, s in ref.items() if n not in want}
    flat = torch.cat([s.reshape(-1) for s in rest.values()])
    k = budget - lora_params
    values, _ = flat.sort(descending=True)
    assert values[k - 1] > values[k]
    masks = masks_of(model)
    assert masks.keys() == rest.keys()
    for n, m in masks.items():  # the top-k of the other tensors, by the reference scores
        torch.testing.assert_close(m, rest[n] >= values[k - 1], atol=0, rtol=0)


def effective_base(model: st.TunedModel) -> dict[str, torch.Tensor]:
    """Base name -> each base tensor as its owner module computes with it now (through LoRA wrappers)."""
    out = {}
    for name, _ in model.model.named_parameters():
        if not is_adapter_tensor(name):
            module, _, attr = name.rpartition(".")
            out[base_name(name)] = getattr(model.model.get_submodule(module), attr).detach().clone()
    return out


def test_only_lora_and_selected_entries_change_under_adamw_weight_decay(ids):
    base = tiny_llama()
    before = base_state(base)
    cfg = spt.plan(base, SptConfig(**CFG), lm_batches(ids))
    model = st.attach(base, cfg, data=lm_batches(ids))
    lora0 = {n: p.detach().clone() for n, p in model.trainable_parameters() if ".adapters." in n}
    opt = train(model, ids, weight_decay=0.5)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == trainable
    assert all(not torch.equal(p, lora0[n]) for n, p in model.trainable_parameters() if n in lora0)
    masks = masks_of(model)
    masks = {base_name(n): m for n, m in masks.items()}
    for name, W in effective_base(model).items():
        if name in masks:
            assert torch.equal(W[~masks[name]], before[name][~masks[name]]), name
            assert masks[name].sum() == 0 or not torch.equal(W[masks[name]], before[name][masks[name]]), name
        else:  # the LoRA matrices' own weights too
            assert torch.equal(W, before[name]), name


def test_save_load_is_exact_and_the_saved_config_records_the_lora_modules(ids, tmp_path):
    base = tiny_gpt2()
    before, ref = base_state(base), output(base, ids)
    cfg = spt.plan(base, SptConfig(**CFG), lm_batches(ids))
    model = st.attach(base, cfg, data=lm_batches(ids))
    train(model, ids, steps=3)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]
    assert written["lora_modules"] == cfg.lora_modules and cfg.lora_modules
    files = saved(tmp_path / "a")
    assert any(k.endswith(".lora_A.weight") for k in files) and any(k.endswith(".sparse_index") for k in files)
    loaded = st.load(tiny_gpt2(), tmp_path / "a")  # no data: the masks and the modules come from the file
    assert set(loaded.view("default").layers) == set(cfg.lora_modules)
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()  # the stored base: selected tensors bit for bit; a LoRA's W + delta - delta within rounding
    for name, W in model.model.state_dict().items():
        if not is_adapter_tensor(name):
            torch.testing.assert_close(W, before[base_name(name)], atol=1e-7, rtol=0, msg=name)
    assert all(torch.equal(v, before[k]) for k, v in loaded.detach().state_dict().items())


def test_file_size_scales_with_k(ids, tmp_path):
    sizes = {}
    for density in (0.005, 0.05):  # lora_modules=[]: sparse only, whatever the sensitivity
        model = st.attach(tiny_llama(), SptConfig(density=density, lora_modules=[]), data=lm_batches(ids))
        model.save(tmp_path / str(density))
        sizes[model.adapter_parameter_count("default")] = file_size(tmp_path / str(density))
    (k1, s1), (k2, s2) = sorted(sizes.items())
    header = 16 * 2 * len(model.view("default").selections)
    assert abs((s2 - s1) - 8 * (k2 - k1)) < header  # 8 bytes an entry: int32 index + fp32 value


def test_lora_modules_given_by_hand_take_their_share_of_the_budget(ids):
    cfg = SptConfig(density=0.05, r=2, targets=["self_attn"], lora_modules=["model.layers.1.self_attn.q_proj"])
    model = st.attach(tiny_llama(), cfg, data=lm_batches(ids))
    n_total = 2 * (4096 + 2048 + 2048 + 4096)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == round(0.05 * n_total)
    assert list(model.view("default").layers) == cfg.lora_modules
    assert "model.layers.1.self_attn.q_proj.weight" not in masks_of(model)


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    cfg = spt.plan(tiny_llama(), SptConfig(**CFG, targets=None), lm_batches(data))  # embeddings and head too
    losses = fit(st.attach(tiny_llama(), cfg, data=lm_batches(data)), data, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_summary_names_the_lora_matrices_and_the_sparse_density(ids, tensor_shapes):  # noqa: F811
    cfg = spt.plan(tiny_llama(), SptConfig(**CFG), lm_batches(ids))
    text = st.attach(tiny_llama(), cfg, data=lm_batches(ids)).summary(show=False)
    assert f"LoRA r=2 on {len(cfg.lora_modules)} matrices (" in text
    assert "; sparse: density " in text and "densest: layers." in text


@pytest.mark.skipif("plan" not in Method.__dict__, reason="needs the engine hook Method.plan (see the report)")
def test_one_call_attach_plans_through_the_engine_hook(ids, tmp_path):
    want = spt.plan(tiny_llama(), SptConfig(**CFG), lm_batches(ids))
    model = st.attach(tiny_llama(), SptConfig(**CFG), data=lm_batches(ids))
    assert model.configs["default"] == want and set(model.view("default").layers) == set(want.lora_modules)


def test_clear_errors(ids):
    with pytest.raises(st.ConfigError, match=r"SptConfig.density=0: expected a fraction"):
        SptConfig(density=0)
    with pytest.raises(st.ConfigError, match=r"SptConfig.r=0: expected an int >= 1"):
        SptConfig(r=0)
    with pytest.raises(st.ConfigError, match=r"SptConfig.threshold=1.5: expected a fraction"):
        SptConfig(threshold=1.5)
    with pytest.raises(st.ConfigError, match=r"SptConfig.lora_modules='q_proj': expected a list of module names"):
        SptConfig(lora_modules="q_proj")
    with pytest.raises(st.ConfigError, match=r"calibration batches"):
        st.attach(tiny_llama(), SptConfig(lora_modules=[]))
    with pytest.raises(st.ConfigError, match=r"calibration batches"):
        spt.plan(tiny_llama(), SptConfig(), None)
    with pytest.raises(st.ConfigError, match="no loss: expected labels"):
        spt.plan(tiny_llama(), SptConfig(), [{"input_ids": ids}])
    if "plan" not in Method.__dict__:
        with pytest.raises(st.ConfigError, match=r"lora_modules=None.*spt.plan\(model, cfg, batches\)"):
            st.attach(tiny_llama(), SptConfig(), data=lm_batches(ids))
    with pytest.raises(st.TargetNotFoundError, match="'model.layers.0.input_layernorm' is not a linear module"):
        st.attach(tiny_llama(), SptConfig(lora_modules=["model.layers.0.input_layernorm"]), data=lm_batches(ids))
    with pytest.raises(st.ConfigError, match=r"over the budget of 737 \(density=0.01\)"):
        st.attach(tiny_llama(), SptConfig(density=0.01, lora_modules=["model.layers.0.mlp.up_proj"]),
                  data=lm_batches(ids))
    with pytest.raises(st.TargetNotFoundError, match="picks no tensor"):
        spt.plan(tiny_llama(), SptConfig(targets=["q_projj"]), lm_batches(ids))


def _row(family: str) -> test_contract.Example:
    """A planned config (the contract table calls config() without data); with the engine hook, plain SptConfig."""
    make = test_contract.FAMILIES[family]
    return test_contract.Example(make, lambda: spt.plan(make(), SptConfig(**CFG), test_contract.calibration(family)),
                                 data=lambda: test_contract.calibration(family))


ROWS = {f"spt-{f}": _row(f) for f in test_contract.FAMILIES}


@pytest.mark.parametrize("example_id", ROWS)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    """The rows to add to tests/test_contract.py's table pass its checks."""
    monkeypatch.setitem(test_contract.EXAMPLES, example_id, ROWS[example_id])
    test_contract.test_contract(example_id, ids, tmp_path)
