"""AdaLoRA: SVD-form update, importance-driven rank budget, orthogonality regulariser, pruned saving,
and HF PEFT 0.21 interop both ways (the rank allocator itself is checked against PEFT's)."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.adapter_files import read_adapter
from slimtune.errors import ConfigError
from slimtune.methods.adalora import AdaLora, AdaLoraConfig, budget
from tests.conftest import output, randomize, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32 logits ~ O(1): merged vs unmerged, PEFT vs ours
SCHEDULE = dict(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3)


def config(**kw) -> AdaLoraConfig:
    return AdaLoraConfig(**{"targets": ["q_proj", "v_proj"], **SCHEDULE, **kw})


def adalora_layers(model) -> dict[str, AdaLora]:
    return model.view(model.active[0]).layers


def train(model, data: torch.Tensor, steps: int, lr: float = 0.05, sgd: bool = True) -> list[float]:
    """A plain loop as README shows it: loss + regulariser, step(), then model.step() before zero_grad()."""
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.SGD(params, lr=lr) if sgd else torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=data, labels=data).loss
        losses.append(loss.item())
        (loss + model.regularization_loss()).backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
    return losses


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(5))


def test_identity_at_init_and_svd_shapes(ids):
    ref = output(tiny_llama(), ids)
    model = st.attach(tiny_llama(), config())
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    m = adalora_layers(model)["model.layers.0.self_attn.v_proj"]
    assert (m.A.shape, m.E.shape, m.B.shape) == ((4, 64), (4, 1), (32, 4))
    assert torch.count_nonzero(m.E) == 0 and 0.01 < m.A.std() < 0.03


def test_parameter_count_is_the_formula():
    model = st.attach(tiny_llama(), config())
    # q_proj 64 -> 64, v_proj 64 -> 32 (2 KV heads of 16), two layers: init_r * (d_in + d_out + 1) each
    expected = 2 * (4 * (64 + 64 + 1) + 4 * (64 + 32 + 1))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merged_equals_unmerged(make, ids):
    targets = ["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"]
    model = st.attach(make(), config(targets=targets))
    randomize(model)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=0)
    model.unmerge()
    with model.disabled():
        torch.testing.assert_close(output(model, ids), output(make(), ids), atol=1e-6, rtol=0)


def test_total_rank_follows_the_cubic_budget_schedule(data):
    model = st.attach(tiny_llama(), config())
    layers = list(adalora_layers(model).values())
    initial, target = 4 * len(layers), 2 * len(layers)
    totals = []
    model.train()
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.05)
    for step in range(1, 13):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
        totals.append(sum(int(m.kept.sum()) for m in layers))
        assert all(torch.count_nonzero(m.E[~m.kept]) == 0 for m in layers)  # pruned triplets are zero
    expected = [budget(t, initial, target, model.configs["default"])[0] for t in range(1, 13)]
    assert totals == expected
    assert totals[:2] == [initial] * 2 and totals[-3:] == [target] * 3 and totals == sorted(totals, reverse=True)
    assert initial > totals[4] > target  # the cubic phase in between


def test_budget_formula_by_hand():
    cfg = AdaLoraConfig(init_r=12, target_r=8, total_step=100, tinit=10, tfinal=20)
    assert budget(10, 120, 80, cfg) == (120, False)
    assert budget(50, 120, 80, cfg) == (int(40 * (1 - 40 / 70) ** 3 + 80), True)
    assert budget(81, 120, 80, cfg) == (80, True)


def test_orthogonality_regulariser_is_the_formula_and_differentiable():
    model = st.attach(tiny_llama(), config(orth_reg_weight=0.3))
    layers = list(adalora_layers(model).values())
    reg = model.regularization_loss()
    eye = torch.eye(4)
    by_hand = torch.stack([torch.linalg.matrix_norm(t) for m in layers
                           for t in (m.A @ m.A.T - eye, m.B.T @ m.B - eye)]).mean() * 0.3
    torch.testing.assert_close(reg, by_hand)
    reg.backward()
    assert all(m.A.grad.abs().sum() > 0 and m.B.grad.abs().sum() > 0 for m in layers)
    assert st.attach(tiny_llama(), config(orth_reg_weight=0.0)).regularization_loss() is None


def test_pruned_adapter_saves_only_kept_ranks_loads_exactly_and_summary_shows_them(data, ids, tmp_path):
    model = st.attach(tiny_llama(), config())
    train(model, data, 12)
    model.eval()
    adapted = output(model, ids)
    assert "ranks kept: 8/16 (target 8)" in model.summary(show=False)
    model.save(tmp_path / "a")
    cfg, _, tensors = read_adapter(tmp_path / "a")
    kept = {name: int(m.kept.sum()) for name, m in adalora_layers(model).items()}
    assert {k: sum(v) for k, v in cfg.rank_pattern.items()} == {k: v for k, v in kept.items() if v < 4}
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == 8
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
    assert sum(p.numel() for _, p in loaded.trainable_parameters()) < sum(
        p.numel() for _, p in model.trainable_parameters())


def test_short_fit_lowers_the_loss(data):
    model = st.attach(tiny_llama(), config(targets="all-linear", total_step=30, tinit=5, tfinal=5))
    losses = train(model, data, 30, lr=5e-2, sgd=False)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="total_step=None.*budget schedule"):
        AdaLoraConfig(targets=["q_proj"])
    with pytest.raises(ConfigError, match="target_r=16: expected an int <= init_r=12"):
        AdaLoraConfig(target_r=16, total_step=10)
    with pytest.raises(ConfigError, match="tinit=8"):
        AdaLoraConfig(total_step=10, tinit=8, tfinal=2)
    with pytest.raises(ConfigError, match="Did you mean 'delta_t'"):
        st.config_from_dict({"method": "adalora", "deltaT": 2, "total_step": 4})


# -- HF PEFT interop ------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning",
                                        "ignore:.*is_gradient_checkpointing:FutureWarning")


def peft_config(**kw):
    return peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], lora_alpha=8,
                              **{**SCHEDULE, **kw})


def peft_train(model, data: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        model(input_ids=data, labels=data).loss.backward()  # PEFT adds the regulariser inside forward
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()


def test_the_rank_allocator_matches_peft_step_for_step(data, tmp_path):
    """Same start (PEFT's init loaded into ours), same data, SGD: the same ranks are kept, and the
    final adapters give the same outputs."""
    theirs = peft.get_peft_model(tiny_llama(), peft_config())
    theirs.save_pretrained(tmp_path / "start")
    ours = st.load(tiny_llama(), tmp_path / "start")
    peft_train(theirs, data, 12)
    train(ours, data, 12)
    pattern = theirs.peft_config["default"].rank_pattern
    for name, m in adalora_layers(ours).items():
        key = next(k for k in pattern if k.startswith(name + ".lora_E"))
        assert m.kept.tolist() == list(pattern[key]), name
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(output(ours, data), output(theirs, data), atol=1e-4, rtol=0)


def test_peft_files_load_in_ours_with_peft_outputs(data, ids, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft_config(target_r=1))
    peft_train(theirs, data, 12)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "p")
    pattern = json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"]
    assert min(sum(v) for v in pattern.values()) == 0  # a module lost every rank: empty tensors in the file
    ours = st.load(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(output(ours, ids), output(theirs, ids), atol=TOL, rtol=0)


def test_our_peft_export_loads_in_peft_with_our_outputs(data, ids, tmp_path):
    ours = st.attach(tiny_llama(), config())
    train(ours, data, 12)
    ours.eval()
    ours.save(tmp_path / "e", format="peft")
    raw = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and all(k.endswith(".lora_E") for k in raw["rank_pattern"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "e").eval()
    torch.testing.assert_close(output(theirs, ids), output(ours, ids), atol=TOL, rtol=0)
