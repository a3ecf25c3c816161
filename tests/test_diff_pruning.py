"""Diff pruning: the hard-concrete L0 phase, exact magnitude pruning to the budget, the sparse re-fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.methods.diff_pruning import DiffGate, DiffPruningConfig, prune
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_gpt2, tiny_llama
from tests.selective_checks import (
    assert_only_entries_changed,
    base_state,
    effective,
    file_size,
    masks_of,
    saved,
    train,
)

TARGETS = {"llama": (tiny_llama, ["q_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"])}


def randomize_gates(model: st.TunedModel, seed: int = 0) -> None:
    """w ~ N(0, 0.05); log_alpha ~ N(0, 3): some gates closed, some open, some in between."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.view("default").layers.values():
            gate.w.copy_(torch.randn(gate.w.shape, generator=g) * 0.05)
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)


def test_hard_concrete_gate_and_expected_l0_match_monte_carlo():
    cfg = DiffPruningConfig(lower=-0.1, upper=1.1, temperature=2 / 3)
    gate = DiffGate(nn.Linear(8, 8), cfg)
    log_alpha = torch.linspace(-3, 3, 64).view(8, 8)
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha)
    samples = []
    for step in range(4000):
        gate.step = step  # a new draw each optimizer step, the same one within a step
        samples.append(gate.gate(sample=True))
    assert torch.equal(gate.gate(sample=True), samples[-1])
    samples = torch.stack(samples)
    assert samples.min() == 0 and samples.max() == 1  # the stretch puts mass on exact 0 and 1
    p_open = torch.sigmoid(log_alpha - cfg.temperature * math.log(-cfg.lower / cfg.upper))
    assert (samples.gt(0).float().mean(0) - p_open).abs().max() < 0.03  # P(z != 0) is the L0 term
    torch.testing.assert_close(gate.expected_l0(), p_open.sum())
    deterministic = (torch.sigmoid(log_alpha) * (cfg.upper - cfg.lower) + cfg.lower).clamp(0, 1)
    assert torch.equal(gate.gate(sample=False), deterministic)


def test_regularizer_is_penalty_times_expected_density_and_pushes_gates_shut():
    cfg = DiffPruningConfig(targets=["q_proj"], penalty=2.0, init_log_alpha=1.0, lower=-0.1, upper=1.1)
    model = st.attach(tiny_llama(), cfg)
    reg = model.regularization_loss()
    torch.testing.assert_close(reg, 2.0 * torch.sigmoid(torch.tensor(1.0 - 2 / 3 * math.log(0.1 / 1.1))))
    reg.backward()
    assert all((g.log_alpha.grad > 0).all() for g in model.view("default").layers.values())
    assert st.attach(tiny_llama(), DiffPruningConfig(penalty=0.0)).regularization_loss() is None


@pytest.mark.parametrize("arch", TARGETS)
def test_l0_phase_computes_W0_plus_z_w_alone_and_beside_another_adapter(arch, ids):
    make, targets = TARGETS[arch]
    model = st.attach(make(), DiffPruningConfig(targets=targets))
    randomize_gates(model)
    merged = make()
    with torch.no_grad():
        for name, gate in model.view("default").layers.items():
            merged.get_submodule(name).weight.add_(gate.delta(sample=False))
    adapted = output(model, ids)
    torch.testing.assert_close(adapted, output(merged, ids), atol=1e-5, rtol=1e-5)
    model.add(st.LoraConfig(r=2, targets=targets), name="lora")  # B = 0: an identity on the same layers
    model.use(["default", "lora"])
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_l0_phase_merge_disable_save_load_are_exact(ids, tmp_path):
    base = tiny_gpt2()
    before, ref = base_state(base), output(base, ids)
    model = st.attach(base, DiffPruningConfig(targets=TARGETS["gpt2"][1]))
    randomize_gates(model)
    adapted = output(model, ids)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k.replace(".base_layer.", ".")]) for k, v in model.model.state_dict().items()
               if ".adapters." not in k)
    model.save(tmp_path / "a")
    torch.testing.assert_close(output(st.load(tiny_gpt2(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)


def reference_budget(deltas: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    k = round(density * flat.numel())
    values, order = flat.sort(descending=True)
    assert values[k - 1] > values[k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    out, start = {}, 0
    for n, d in deltas.items():
        out[f"{n}.weight"] = mask[start : start + d.numel()].view_as(d)
        start += d.numel()
    return out


def test_prune_reaches_the_target_sparsity_exactly_and_the_refit_changes_only_those_entries(ids, tmp_path):
    base = tiny_llama()
    before, ref = base_state(base), output(base, ids)
    model = st.attach(base, DiffPruningConfig(targets=TARGETS["llama"][1], density=0.01))
    randomize_gates(model)
    deltas = {n: g.delta(sample=False).detach() for n, g in model.view("default").layers.items()}
    want = reference_budget(deltas, 0.01)
    prune(model)
    assert isinstance(model.configs["default"], DiffPruningConfig) and model.configs["default"].pruned
    masks = masks_of(model)
    n_total = sum(d.numel() for d in deltas.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.01 * n_total)  # exactly the budget
    for name, mask in masks.items():
        assert torch.equal(mask, want[name]), name
        W0 = before[name]
        torch.testing.assert_close(effective(model, name)[mask], (W0 + deltas[name[: -len(".weight")]])[mask])
    opt = train(model, ids, weight_decay=0.5)  # the re-fit: a new optimizer over the k entries
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == round(0.01 * n_total)
    assert_only_entries_changed(model, before, masks)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    assert sum(v.numel() for k, v in saved(tmp_path / "a").items() if k.endswith("values")) == round(0.01 * n_total)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_pruned_file_size_scales_with_the_budget(tmp_path):
    sizes = {}
    for density in (0.005, 0.05):
        model = st.attach(tiny_llama(), DiffPruningConfig(targets=TARGETS["llama"][1], density=density))
        randomize_gates(model)
        prune(model).save(tmp_path / str(density))
        sizes[model.adapter_parameter_count("default")] = file_size(tmp_path / str(density))
    (k1, s1), (k2, s2) = sorted(sizes.items())
    assert abs((s2 - s1) - 8 * (k2 - k1)) < 64  # 8 bytes an entry (int32 index + fp32 value), a fixed header


def test_prune_keeps_the_trained_head_and_the_active_set(ids):
    labels = torch.tensor([0, 1, 2])
    model = st.attach(tiny_bert(), DiffPruningConfig(targets=["query"], modules_to_save=["classifier"]))
    model.add(st.LoraConfig(r=2, targets=["value"]), name="other")
    train(model, ids, steps=2, labels=labels)
    head = {k: v for k, v in model.adapter_state_dict("default").items() if "classifier" in k}
    prune(model)
    assert model.active == ["default"]
    after = model.adapter_state_dict("default")
    assert all(torch.equal(after[k], v) for k, v in head.items())


def test_toy_fit_lowers_the_loss_in_both_phases():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    model = st.attach(tiny_llama(), DiffPruningConfig(density=0.05, penalty=0.1))
    l0 = fit(model, data, steps=8, lr=1e-2)
    assert l0[-1] < l0[0] - 0.5, l0
    refit = fit(prune(model), data, steps=8, lr=1e-2)
    assert refit[-1] < refit[0] - 0.2, refit


def test_clear_errors(ids):
    for field, value, expected in [("density", 0.0, "a fraction in"), ("penalty", -1.0, "a float >= 0"),
                                   ("temperature", 0.0, "a float > 0"), ("lower", 0.1, "a float < 0"),
                                   ("upper", 1.0, "a float > 1")]:
        with pytest.raises(st.ConfigError, match=rf"DiffPruningConfig.{field}={value}: expected {expected}"):
            DiffPruningConfig(**{field: value})
    with pytest.raises(st.ConfigError, match=r"pruned=True\) is the re-fit phase"):
        st.attach(tiny_llama(), DiffPruningConfig(pruned=True))
    model = st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(st.ConfigError, match="expected a diff-pruning adapter in its L0 phase, got a LoraConfig"):
        prune(model)
    model = prune(st.attach(tiny_llama(), DiffPruningConfig(targets=["q_proj"])))
    with pytest.raises(st.ConfigError, match="already pruned"):
        prune(model)
