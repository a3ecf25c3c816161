"""LT-SFT: full fine-tuning, the top-k most-changed entries reset to theta_0, the sparse phase 2; sparse
differences compose. Also the per-tensor density line the sparse selective methods print in summary()."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.methods.fishmask import FishMaskConfig
from slimtune.methods.lt_sft import LtSftConfig, select_winners
from slimtune.selection import TunedEntries
from tests import test_contract
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_llama
from tests.selective_checks import (
    assert_only_entries_changed,
    base_state,
    effective,
    file_size,
    lm_batches,
    masks_of,
    saved,
    train,
)


@pytest.fixture
def tensor_shapes(monkeypatch):
    """TunedEntries recording its base tensor's shape: the one-line selection.py change summary densities need
    (`self.tensor_shape = tuple(original.shape)` in TunedEntries.__init__); harmless once it is there."""
    init = TunedEntries.__init__

    def recording(self, original, mask=None):
        init(self, original, mask)
        self.tensor_shape = tuple(original.shape)

    monkeypatch.setattr(TunedEntries, "__init__", recording)


def reference_winners(before: dict, after: dict, density: float) -> dict[str, torch.Tensor]:
    """Top-k of |theta_1 - theta_0| over all tensors by a full sort (no tie at the boundary)."""
    moved = {n: (after[n] - before[n]).abs() for n in after}
    flat = torch.cat([m.reshape(-1) for m in moved.values()])
    k = round(density * flat.numel())
    values, order = flat.sort(descending=True)
    assert values[k - 1] > values[k], "a tie at the budget boundary would make the reference ambiguous"
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, m in moved.items():
        out[n] = keep[start : start + m.numel()].view_as(m)
        start += m.numel()
    return out


def phase_one(ids: torch.Tensor, density: float = 0.01, **kw) -> tuple[st.TunedModel, dict, dict]:
    """A tiny Llama after 3 AdamW steps of phase 1: (model, theta_0, theta_1 of the chosen tensors)."""
    base = tiny_llama()
    before = base_state(base)
    model = st.attach(base, LtSftConfig(density=density, **kw))
    train(model, ids, steps=3)
    return model, before, {n: effective(model, n) for n in model.view("default").selections}


def test_phase_one_trains_the_chosen_tensors_in_full_and_the_winners_are_the_top_k_most_changed(ids):
    model, before, after = phase_one(ids, targets=["mlp"])
    assert {n for n in after} == {n for n, _ in model.model.named_parameters() if ".mlp." in n}
    assert all(not torch.equal(after[n], before[n]) for n in after)  # dense: every tensor moved
    want = reference_winners(before, after, 0.01)
    select_winners(model)
    assert model.configs["default"].phase == 2 and model.active == ["default"]
    masks = masks_of(model)
    assert masks.keys() == want.keys() and all(torch.equal(masks[n], want[n]) for n in want)
    for name, tensor in before.items():  # reset: theta_0 everywhere, bit for bit
        assert torch.equal(effective(model, name), tensor), name


def test_phase_two_changes_only_the_winners_and_saves_loads_disables_and_merges_exactly(ids, tmp_path):
    model, before, _ = phase_one(ids)
    select_winners(model, density=0.02)  # a density other than the config's
    ref = output(tiny_llama(), ids)
    masks = masks_of(model)
    k = sum(int(m.sum()) for m in masks.values())
    assert k == round(0.02 * sum(m.numel() for m in masks.values())) == model.adapter_parameter_count("default")
    opt = train(model, ids, weight_decay=0.5)  # a new optimizer over the k entries
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == k
    assert_only_entries_changed(model, before, masks)
    adapted = output(model, ids)
    assert not torch.allclose(adapted, ref)
    model.save(tmp_path / "a")
    assert sum(v.numel() for n, v in saved(tmp_path / "a").items() if n.endswith(".sparse_values")) == k
    loaded = st.load(tiny_llama(), tmp_path / "a")
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[n]) for n, v in model.model.state_dict().items())


def test_file_size_scales_with_k(ids, tmp_path):
    sizes = {}
    for density in (0.005, 0.05):
        model, _, _ = phase_one(ids, density=density)
        select_winners(model).save(tmp_path / str(density))
        sizes[model.adapter_parameter_count("default")] = file_size(tmp_path / str(density))
    (k1, s1), (k2, s2) = sorted(sizes.items())
    header = 16 * 2 * len(model.view("default").selections)
    assert abs((s2 - s1) - 8 * (k2 - k1)) < header  # 8 bytes an entry: int32 index + fp32 value


def test_two_sparse_differences_compose_to_theta0_plus_phi_a_plus_phi_b(ids, tmp_path):
    """A language SFT and a task SFT (the paper's pair) on overlapping tensors: active together, every
    tensor is theta_0 + phi_a + phi_b; the task SFT trains with the language SFT active and fixed."""
    base = tiny_llama()
    theta0 = base_state(base)
    model = st.attach(base, LtSftConfig(density=0.02, targets=["mlp"]), name="lang")
    model.add(LtSftConfig(density=0.02, targets=["mlp", "self_attn"]), name="task")
    lang, task = ids[:2], ids[2:]
    for name, data in (("lang", lang), ("task", task)):
        model.use(name)
        train(model, data, steps=2)
        select_winners(model, name=name)
    model.use("lang")
    train(model, lang, steps=2)
    model.use(["lang", "task"])  # the task SFT on top of the language SFT; only its entries in the optimizer
    opt = torch.optim.AdamW([p for n, p in model.trainable_parameters() if ".task." in n], lr=1e-2)
    model.train()
    model(input_ids=task, labels=task).loss.backward()
    opt.step()
    model.eval()
    phi = {}
    for name in ("lang", "task"):
        model.use(name)
        phi[name] = {n: effective(model, n) - theta0[n] for n in theta0}
    model.use(["lang", "task"])
    plain = tiny_llama()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(theta0[n] + phi["lang"][n] + phi["task"][n])
            torch.testing.assert_close(effective(model, n), p.detach(), atol=1e-7, rtol=1e-6, msg=n)
    both = output(model, ids)
    torch.testing.assert_close(both, output(plain, ids), atol=1e-6, rtol=1e-6)
    assert any(phi["lang"][n].ne(0).any() and phi["task"][n].ne(0).any() for n in theta0)  # shared tensors
    model.save(tmp_path / "both")  # lang at the folder, task in a subfolder
    loaded = st.load(tiny_llama(), tmp_path / "both").use(["default", "task"])
    torch.testing.assert_close(output(loaded, ids), both, atol=0, rtol=0)


def test_a_classifier_head_keeps_its_phase_one_training(ids):
    labels = torch.tensor([0, 2, 1])
    model = st.attach(tiny_bert(), LtSftConfig(density=0.01, modules_to_save=["classifier"]))
    assert not any("classifier" in n for n in model.view("default").selections)
    train(model, ids, steps=2, labels=labels)
    head = {n: p.detach().clone() for n, p in model.trainable_parameters() if "classifier" in n}
    select_winners(model)
    after = {n: p for n, p in model.trainable_parameters() if "classifier" in n}
    assert head.keys() == after.keys() and all(torch.equal(head[n], after[n]) for n in head)


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    model = st.attach(tiny_llama(), LtSftConfig(density=0.05))
    fit(model, data, steps=3, lr=1e-2)
    select_winners(model)
    losses = fit(model, data, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_summary_shows_the_overall_density_and_the_densest_tensors(ids, tensor_shapes):
    model, _, _ = phase_one(ids, density=0.01)
    assert "phase 1 (dense): 202,048 entries of 21 tensors; select_winners() keeps 2,020" in model.summary(show=False)
    select_winners(model)
    line = model.summary(show=False).splitlines()[2]
    assert "phase 2 (sparse winners): density 1.00% (2,020 of 202,048 entries, 21 tensors); densest: " in line
    counts = {n: (int(m.sum()), m.numel()) for n, m in masks_of(model).items()}
    top = max(counts, key=lambda n: counts[n][0] / counts[n][1])
    assert f"{top.removeprefix('model.')} {100 * counts[top][0] / counts[top][1]:.2f}%" in line
    assert line.count("%") == 4  # overall and three tensors
    fish = st.attach(tiny_llama(), FishMaskConfig(density=0.01), data=lm_batches(ids))
    assert "density 1.00% (2,020 of 202,048 entries, 21 tensors); densest: " in fish.summary(show=False)


def test_clear_errors(ids):
    with pytest.raises(st.ConfigError, match=r"LtSftConfig.density=0: expected a fraction"):
        LtSftConfig(density=0)
    with pytest.raises(st.ConfigError, match=r"LtSftConfig.phase=3: expected 1 .* or 2"):
        LtSftConfig(phase=3)
    with pytest.raises(st.ConfigError, match=r"phase=2\) is the sparse phase.*select_winners"):
        st.attach(tiny_llama(), LtSftConfig(phase=2))
    model = st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(st.ConfigError, match="expected an LT-SFT adapter in phase 1, got a LoraConfig adapter"):
        select_winners(model)
    model = st.attach(tiny_llama(), LtSftConfig(targets=["down_proj"]))
    with pytest.raises(st.ConfigError, match=r"LtSftConfig.density=1.5"):
        select_winners(model, density=1.5)
    train(model, ids, steps=1)
    model.merge()
    with pytest.raises(RuntimeError, match="merged"):
        select_winners(model)
    model.unmerge()
    assert model.configs["default"].phase == 1 and len(model.trainable_parameters()) == 2  # left as it was
    select_winners(model)
    with pytest.raises(st.ConfigError, match="got one in phase 2"):
        select_winners(model)
    with pytest.raises(st.TargetNotFoundError, match="picks no tensor"):
        st.attach(tiny_llama(), LtSftConfig(targets=["q_projj"]))


ROWS = {f"lt_sft-{k}": v for k, v in test_contract.per_family(lambda f: LtSftConfig(), biases=True).items()}
ROWS["lt_sft-mlp_layer1"] = test_contract.Example(tiny_llama, lambda: LtSftConfig(targets=["mlp"], layers=[1]))


@pytest.mark.parametrize("example_id", ROWS)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    """The rows to add to tests/test_contract.py's table pass its checks (phase 1; phase 2 is checked above)."""
    monkeypatch.setitem(test_contract.EXAMPLES, example_id, ROWS[example_id])
    test_contract.test_contract(example_id, ids, tmp_path)
