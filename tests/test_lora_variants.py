"""Properties of three LoRA variants driven by the per-step hook or a mask: PeriodicLoRA (folds), LoRA-SP
(a fixed random half of A and B trains) and AFLoRA (vectors d, b; A and B frozen by a schedule)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import slimtune as st
from slimtune.adapter_files import read_adapter
from slimtune.bases import kind_of
from slimtune.bases import sizes as features
from slimtune.errors import AdapterLoadError
from slimtune.methods import METHODS
from slimtune.methods.aflora import Aflora, AfloraConfig
from slimtune.methods.lora_sp import LoraSPConfig, resume
from slimtune.methods.periodic_lora import PeriodicLoraConfig
from tests.conftest import assert_rows_match_alone, output, randomize, tiny_llama

TOL = 1e-5  # fp32, logits ~ O(1): results that differ only by float rounding (folds, merges, PEFT)
TARGETS = ["q_proj", "v_proj", "down_proj"]
DATA = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
EXAMPLES = {
    "periodic_lora": (tiny_llama, lambda: PeriodicLoraConfig(r=2, period=2, targets=["q_proj", "down_proj"])),
    "lora_sp": (tiny_llama, lambda: LoraSPConfig(r=2, targets=["q_proj", "down_proj"])),
    "aflora": (tiny_llama, lambda: AfloraConfig(r=2, total_step=10, targets=["q_proj", "down_proj"])),
}


def train(model, steps: int, lr: float = 1e-2, weight_decay: float = 0.0, opt=None, start: int = 0) -> list[float]:
    """AdamW steps on one fixed batch, calling model.step() between opt.step() and zero_grad() as trainers do."""
    model.train()
    opt = opt or torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(start + 1, start + steps + 1):
        loss = model(input_ids=DATA, labels=DATA).loss
        loss.backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def adapters(model) -> dict[str, torch.nn.Module]:
    return model.view("default").layers


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: kind_of(b).weight(b).detach().clone() for n, b in model.view("default").bases.items()}


@pytest.mark.parametrize("method", EXAMPLES)
def test_identity_at_init_and_merge_matches_unmerged(method, ids):
    make, config = EXAMPLES[method]
    ref = output(make(), ids)
    model = st.attach(make(), config())
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    randomize(model)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("method", EXAMPLES)
def test_param_count_is_the_registered_formula(method):
    make, config = EXAMPLES[method]
    cfg = config()
    model = st.attach(make(), cfg)
    f = getattr(cfg, "trainable_fraction", 1.0)
    expected = 0
    for base in model.view("default").bases.values():
        d_in, d_out = features(base)
        if method == "lora_sp":  # rounded per matrix
            expected += round(f * cfg.r * d_in) + round(f * d_out * cfg.r)
        else:
            expected += eval(METHODS[method].params, {}, {"r": cfg.r, "d_in": d_in, "d_out": d_out})
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected
    if method == "lora_sp":
        assert math.isclose(expected, 0.5 * sum(cfg.r * sum(features(b)) for b in model.view("default").bases.values()),
                            abs_tol=2)


@pytest.mark.parametrize("method", EXAMPLES)
def test_training_with_the_step_hook_lowers_the_loss(method):
    make, config = EXAMPLES[method]
    model = st.attach(make(), config().replace(targets=TARGETS))
    losses = train(model, steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("method", EXAMPLES)
def test_peft_export_loads_in_peft_with_the_same_outputs(method, ids, tmp_path):
    peft = pytest.importorskip("peft")
    make, config = EXAMPLES[method]
    model = st.attach(make(), config().replace(targets=TARGETS))
    train(model, steps=5, lr=2e-2)  # two folds for PeriodicLoRA, some frozen modules for AFLoRA
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("method", EXAMPLES)
def test_mixed_batch_rows_equal_each_adapter_alone(method, ids):
    make, config = EXAMPLES[method]
    model = st.attach(make(), config().replace(targets=TARGETS))
    train(model, steps=3, lr=2e-2)  # a fold for PeriodicLoRA (its base now holds the stage)
    model.add(st.LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="other")
    randomize(model, seed=3) if method != "periodic_lora" else None
    assert_rows_match_alone(model, ids, ["default", "other", None])


# -- PeriodicLoRA -----------------------------------------------------------------------------------------
def periodic(period: int = 3, r: int = 2, **extra):
    return st.attach(tiny_llama(), PeriodicLoraConfig(r=r, alpha=4, period=period, targets=TARGETS, **extra))


def test_folds_raise_the_rank_of_the_total_update_beyond_r():
    model = periodic(period=3)
    before = base_weights(model)
    train(model, steps=7, lr=2e-2)  # folds after steps 3 and 6, one step into stage 3
    for name, layer in adapters(model).items():
        base = model.view("default").bases[name]
        assert layer.folds == 2
        total = kind_of(base).weight(base) - before[name] + layer.delta_weight(base)
        exported = {k: t.detach().double() for k, t in layer.export_tensors().items()}  # [B | B_1 | B_2], [A; A_1; A_2]
        low_rank = layer.scale * exported["B"] @ exported["A"]
        torch.testing.assert_close(total.double(), low_rank, atol=1e-6, rtol=1e-4)
        assert torch.linalg.matrix_rank(low_rank) == 3 * layer.r > layer.r, name


def test_a_fold_changes_nothing_in_the_forward_and_restarts_A_B_and_their_optimizer_state(ids):
    model = periodic(period=4)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=2e-2)
    train(model, steps=3, opt=opt)
    layers = adapters(model)
    assert all(layer.A in opt.state and layer.B in opt.state for layer in layers.values())
    A_before = {n: layer.A.detach().clone() for n, layer in layers.items()}
    model.train()
    model(input_ids=DATA, labels=DATA).loss.backward()
    opt.step()
    model.eval()
    just_before = output(model, ids)
    model.step(4, opt)  # the fold
    opt.zero_grad()
    torch.testing.assert_close(output(model, ids), just_before, atol=TOL, rtol=1e-4)
    for name, layer in layers.items():
        assert layer.A not in opt.state and layer.B not in opt.state, name
        assert torch.equal(layer.B, torch.zeros_like(layer.B)) and not torch.equal(layer.A, A_before[name]), name
        assert layer.A.abs().max() <= 1 / math.sqrt(layer.A.shape[1])  # kaiming-uniform bound, as at init
    train(model, steps=1, opt=opt, start=4)
    assert all(opt.state[layer.A]["step"] == 1 for layer in layers.values())  # Adam restarted


def test_the_restarted_A_does_not_depend_on_the_global_rng():
    first, second = periodic(period=2), periodic(period=2)
    train(first, steps=2)
    train(second, steps=1)
    torch.manual_seed(12345)  # another global RNG state (as another DDP process may have) before the fold
    train(second, steps=1, start=1)
    for name, layer in adapters(first).items():
        assert layer.folds == 1 and torch.equal(layer.A, adapters(second)[name].A), name


def test_after_folds_disabled_inactive_and_detach_give_the_original_base(ids):
    ref = output(tiny_llama(), ids)
    model = periodic(period=2)
    train(model, steps=5, lr=2e-2)
    assert not torch.allclose(output(model, ids), ref, atol=1e-3)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=TOL, rtol=1e-4)
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="other")
    model.use("other")  # the PeriodicLoRA adapter is attached but inactive
    torch.testing.assert_close(output(model, ids), ref, atol=TOL, rtol=1e-4)
    torch.testing.assert_close(output(model, ids, adapter_names=[None, "other", None]), ref, atol=TOL, rtol=1e-4)
    original = tiny_llama().state_dict()
    plain = model.detach()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(output(plain, ids), ref, atol=TOL, rtol=1e-4)


def test_after_folds_it_saves_as_a_plain_lora_of_rank_folds_plus_one_that_loads_with_the_same_outputs(ids, tmp_path):
    model = periodic(period=2, rslora=True, rank_pattern={"down_proj": 3})
    train(model, steps=4, lr=2e-2)
    assert "stages folded into the base: 2 (saved as a rank-6 LoRA)" in model.summary(show=False)
    ours = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), ours, atol=TOL, rtol=1e-4)
    model.unmerge()
    model.save(tmp_path)
    cfg, _, tensors = read_adapter(tmp_path)
    assert (cfg.method, cfg.r, cfg.rank_pattern) == ("lora", 6, {"down_proj": 9})
    assert math.isclose(cfg.scale, model.configs["default"].scale)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (9, 128)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), ours, atol=TOL, rtol=1e-4)
    plain = model.detach(merge=True)
    torch.testing.assert_close(output(plain, ids), ours, atol=TOL, rtol=1e-4)


def test_periodic_config_refuses_bad_values():
    for field, bad in (("period", 0), ("period", 2.0), ("period", True), ("init", "pissa")):
        with pytest.raises(st.ConfigError, match=re.escape(f"PeriodicLoraConfig.{field}={bad!r}: expected")):
            PeriodicLoraConfig(targets=["q_proj"], **{field: bad})


# -- LoRA-SP ---------------------------------------------------------------------------------------------
def lora_sp(seed: int = 0, **extra):
    return st.attach(tiny_llama(), LoraSPConfig(r=4, mask_seed=seed, targets=TARGETS, **extra))


def composed(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: tuple(t.detach().clone() for t in layer.factors()[:2]) for n, layer in adapters(model).items()}


def test_only_masked_entries_change_under_adamw_with_weight_decay():
    model = lora_sp()
    before = composed(model)
    train(model, steps=3, lr=2e-2, weight_decay=0.5)
    for name, (A, B) in composed(model).items():
        layer = adapters(model)[name]
        for new, old, mask in ((A, before[name][0], layer.A_mask), (B, before[name][1], layer.B_mask)):
            assert torch.equal(new[~mask], old[~mask]), name  # bit for bit
            assert (new[mask] != old[mask]).float().mean() > 0.9, name
            assert mask.sum() == round(0.5 * mask.numel())
        assert torch.equal(B[~layer.B_mask], torch.zeros_like(B[~layer.B_mask]))
    assert {n.rsplit(".", 1)[-1] for n, _ in model.trainable_parameters()} == {"A_train", "B_train"}


def test_masks_and_frozen_values_come_from_the_seed_and_differ_per_module():
    one, again, other = adapters(lora_sp(seed=1)), adapters(lora_sp(seed=1)), adapters(lora_sp(seed=2))
    for name, layer in one.items():
        assert torch.equal(layer.A_mask, again[name].A_mask) and torch.equal(layer.A, again[name].A)
        assert torch.equal(layer.B_mask, again[name].B_mask)
        assert not torch.equal(layer.A_mask, other[name].A_mask)
    q0, q1 = one["model.layers.0.self_attn.q_proj"], one["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0.A_mask, q1.A_mask) and not torch.equal(q0.A, q1.A)
    assert q0.A.abs().max() <= 1 / math.sqrt(64)  # kaiming-uniform bound of A


def test_lora_sp_saves_a_plain_lora_and_resume_restores_the_packed_values(ids, tmp_path):
    model = lora_sp(trainable_fraction=0.25)
    train(model, steps=3, lr=2e-2)
    ours = output(model, ids)
    model.save(tmp_path)
    cfg = read_adapter(tmp_path)[0]
    assert (cfg.method, cfg.r) == ("lora", 4)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), ours, atol=0, rtol=0)
    again = lora_sp(trainable_fraction=0.25)
    resume(again, tmp_path)
    torch.testing.assert_close(output(again, ids), ours, atol=0, rtol=0)
    for name, layer in adapters(again).items():
        assert torch.equal(layer.A_train, adapters(model)[name].A_train), name
    with pytest.raises(AdapterLoadError, match="frozen entries of A differ"):
        resume(lora_sp(seed=5, trainable_fraction=0.25), tmp_path)


def test_lora_sp_config_refuses_bad_values():
    for field, bad in (("trainable_fraction", 0), ("trainable_fraction", 1.5), ("mask_seed", -1),
                       ("mask_seed", 1.0), ("freeze_A", True), ("init", "olora")):
        with pytest.raises(st.ConfigError, match=re.escape(f"LoraSPConfig.{field}={bad!r}: expected")):
            LoraSPConfig(targets=["q_proj"], **{field: bad})


# -- AFLoRA ----------------------------------------------------------------------------------------------
def aflora(total_step: int = 20, **extra):
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]  # 8 modules
    return st.attach(tiny_llama(), AfloraConfig(r=4, total_step=total_step, targets=targets, **extra))


def test_delta_is_diag_b_B_diag_d_A_and_b_gets_a_gradient_at_init(ids):
    model = aflora()
    layer = next(iter(adapters(model).values()))
    assert torch.equal(layer.b, torch.zeros_like(layer.b)) and torch.equal(layer.d, torch.ones_like(layer.d))
    assert layer.B.abs().min() > 0  # kaiming, not zero: the identity comes from b = 0
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.b.grad.abs().sum() > 0
    randomize(model)
    expected = torch.diag(layer.b) @ layer.B @ torch.diag(layer.d) @ layer.A
    base = model.view("default").bases[next(iter(adapters(model)))]
    torch.testing.assert_close(layer.delta_weight(base), expected, atol=1e-6, rtol=1e-5)


def test_the_cubic_schedule():
    cfg = AfloraConfig(targets=["q_proj"], tinit=2, tfinal=3, total_step=15)
    fractions = [cfg.frozen_fraction(t) for t in range(16)]
    assert fractions[:3] == [0.0] * 3 and fractions[12:] == [1.0] * 4
    assert all(a < b for a, b in zip(fractions[2:13], fractions[3:13], strict=False))
    assert math.isclose(cfg.frozen_fraction(7), 1 - 0.5**3)


def test_modules_freeze_as_scheduled_lowest_score_first_and_stay_frozen_while_d_b_train():
    model = aflora(total_step=12, tinit=2, tfinal=2)
    cfg, layers = model.configs["default"], adapters(model)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=2e-2, weight_decay=0.5)
    snapshots = {}
    for step in range(1, 13):
        train(model, steps=1, opt=opt, start=step - 1)
        frozen = {n for n, m in layers.items() if m.frozen}
        assert len(frozen) == math.floor(cfg.frozen_fraction(step) * 8), step
        for name in frozen - set(snapshots):
            m = layers[name]
            snapshots[name] = (m.A.detach().clone(), m.B.detach().clone(), m.b.detach().clone())
            assert m.A not in opt.state and m.B not in opt.state and not m.A.requires_grad
        if step == 3:
            assert len(frozen) == 2 and "A/B frozen in 2/8 modules" in model.summary(show=False)
    assert len(snapshots) == 8
    train(model, steps=2, opt=opt, start=12)
    model.use("default")  # the engine keeps them frozen
    for name, (A, B, b) in snapshots.items():
        m = layers[name]
        assert torch.equal(m.A, A) and torch.equal(m.B, B) and not m.A.requires_grad, name
        assert not torch.equal(m.b, b) and m.b.requires_grad, name


def test_the_modules_frozen_are_those_with_the_lowest_scores(monkeypatch):
    at_freeze: list[float] = []
    original = Aflora.freeze
    monkeypatch.setattr(Aflora, "freeze", lambda self, opt: (at_freeze.append(self.score()), original(self, opt)))
    model = aflora(total_step=10, tinit=2)  # b = 0 at init: A and B get gradients from step 2 on
    train(model, steps=3, lr=2e-2)  # step 3 freezes floor(8 * (1 - (7/8)^3)) = 2 modules
    layers = adapters(model)
    live = [m.score() for m in layers.values() if not m.frozen]
    assert len(at_freeze) == 2 and len(live) == 6 and min(at_freeze) > 0
    assert max(at_freeze) <= min(live)
    assert all(m.A_ipt.numel() == 0 for m in layers.values() if m.frozen)  # the EMA memory is freed


def test_aflora_saves_a_plain_lora_with_bit_identical_outputs(ids, tmp_path):
    model = aflora(total_step=6)
    train(model, steps=4, lr=2e-2)
    ours = output(model, ids)
    model.save(tmp_path)
    cfg, _, tensors = read_adapter(tmp_path)
    assert (cfg.method, cfg.r, cfg.scale) == ("lora", 4, 1.0)
    assert not any("aflora" in k for k in tensors)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), ours, atol=0, rtol=0)


def test_aflora_config_refuses_bad_values():
    for field, bad in (("total_step", None), ("total_step", 5), ("r", 0), ("d_initial", 0), ("beta1", 1.0),
                       ("tinit", -1), ("bias", "vera_only")):
        with pytest.raises(st.ConfigError, match=re.escape(f"AfloraConfig.{field}={bad!r}: expected")):
            AfloraConfig(targets=["q_proj"], tfinal=5, **{"total_step": 10, field: bad})
