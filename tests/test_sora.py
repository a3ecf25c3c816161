"""Properties of SoRA: the gated LoRA, the proximal L1 step on the gates, and saving as a pruned plain LoRA
that st.load and HF PEFT read with the same outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.bases import sizes
from slimtune.layer import AdapterLayer
from slimtune.methods.sora import SoraConfig, proximal_l1_
from tests.conftest import VOCAB, fit, output, randomize, tiny_gpt2, tiny_llama

TOL = 1e-5
LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj"]
WEIGHTS = "adapter_model.safetensors"


def make(r: int = 8, **extra):
    return st.attach(tiny_llama(), SoraConfig(r=r, targets=LLAMA, **extra))


def layers(model) -> dict[str, AdapterLayer]:
    """Wrapped modules by their name in the base model."""
    return {n: m for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)}


def gates(model) -> dict[str, torch.Tensor]:
    return {n: m.adapters["default"].g for n, m in layers(model).items()}


def prune(model, seed: int = 0, keep: float = 0.5) -> None:
    """Zero a random part of every gate, and all of the first module's (a module with nothing left)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, gate in enumerate(gates(model).values()):
            gate.mul_((torch.rand(gate.shape, generator=g) < keep) if i else 0)


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_identity_at_init(make_base, targets, ids):
    ref = output(make_base(), ids)
    model = st.attach(make_base(), SoraConfig(r=8, targets=targets))
    assert all(torch.equal(g, torch.ones(8)) for g in gates(model).values())
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_forward_and_delta_weight_are_the_gated_formula_on_one_layer():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(6, 5)).eval(), SoraConfig(r=4, alpha=6.0, targets=["0"]))
    randomize(model, scale=0.5)
    a, base = model.model[0].adapters["default"], model.model[0].base_layer
    x = torch.randn(3, 6)
    expected = base(x) + 1.5 * ((a.g * (x @ a.A.T)) @ a.B.T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.delta_weight(base), 1.5 * a.B @ torch.diag(a.g) @ a.A, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_merge_matches_unmerged(make_base, targets, ids):
    model = st.attach(make_base(), SoraConfig(r=8, targets=targets))
    randomize(model)
    prune(model)
    unmerged = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=TOL, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=TOL, rtol=1e-4)


def test_param_count_is_r_times_d_in_plus_d_out_plus_r():
    for d_in, d_out, r in ((7, 5, 3), (5, 9, 16)):
        model = st.attach(nn.Sequential(nn.Linear(d_in, d_out)), SoraConfig(r=r, targets=["0"]))
        assert sum(p.numel() for _, p in model.trainable_parameters()) == r * (d_in + d_out) + r
    model = make(r=4)
    expected = sum(4 * sum(sizes(m.base_layer)) + 4 for m in layers(model).values())
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected


def test_gradients_reach_A_B_and_the_gate(ids):
    model = make()
    randomize(model)  # at init B = 0: A and g would get no gradient yet
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".adapters." in name), name
        if p.grad is not None:
            assert name.endswith((".A", ".B", ".g")) and p.grad.abs().sum() > 0, name


# -- the proximal step ------------------------------------------------------------------------------------------
def test_proximal_step_is_soft_thresholding_with_the_lr_of_the_gates_group():
    model = st.attach(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), SoraConfig(r=4, targets=["0", "1"],
                                                                                  sparsity=0.2))
    g0, g1 = gates(model).values()
    with torch.no_grad():
        g0.copy_(torch.tensor([0.5, -0.05, 0.08, -0.3]))
        g1.copy_(torch.tensor([0.5, -0.05, 0.08, -0.3]))
    others = [p for n, p in model.trainable_parameters() if not n.endswith(".g")]
    opt = torch.optim.SGD([{"params": others, "lr": 9.0}, {"params": [g0], "lr": 0.5}, {"params": [g1], "lr": 0.1}])
    model.step(1, opt)
    torch.testing.assert_close(g0, torch.tensor([0.4, 0.0, 0.0, -0.2]))  # threshold 0.5 * 0.2 = 0.1
    torch.testing.assert_close(g1, torch.tensor([0.48, -0.03, 0.06, -0.28]))  # threshold 0.1 * 0.2 = 0.02
    assert "ranks kept: 6/8 (0 2/4, 1 4/4)" in model.summary(show=False)


def test_soft_thresholding_by_hand():
    g = torch.tensor([1.0, -1.0, 0.3, -0.3, 0.0, 0.29])
    proximal_l1_(g, 0.3)
    assert g.tolist() == pytest.approx([0.7, -0.7, 0.0, 0.0, 0.0, 0.0])


def test_without_an_optimizer_the_gate_lr_is_used_and_required():
    model = st.attach(nn.Sequential(nn.Linear(4, 3)), SoraConfig(r=2, targets=["0"], sparsity=0.5, gate_lr=0.2))
    model.step(1)
    torch.testing.assert_close(gates(model)["0"], torch.full((2,), 0.9))
    unrelated = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5.0)  # the gates are not in it: gate_lr
    model.step(2, unrelated)
    torch.testing.assert_close(gates(model)["0"], torch.full((2,), 0.8))
    model = st.attach(nn.Sequential(nn.Linear(4, 3)), SoraConfig(r=2, targets=["0"]))
    with pytest.raises(st.ConfigError, match=r"gate_lr=None: model.step\(\) got no optimizer for the gate of 0"):
        model.step(1)


def test_sparsity_warms_up_linearly():
    cfg = SoraConfig(r=2, targets=["0"], sparsity=1.0, sparsity_warmup=4, gate_lr=0.1)
    assert [cfg.lambda_at(t) for t in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    model = st.attach(nn.Sequential(nn.Linear(4, 3)), cfg)
    for step in (1, 2, 3, 4):
        model.step(step)
    torch.testing.assert_close(gates(model)["0"], torch.full((2,), 1 - 0.1 * (0.25 + 0.5 + 0.75 + 1.0)))


def _train(model, data: torch.Tensor, steps: int, lr: float) -> list[float]:
    losses = fit(model, data, steps, lr, weight_decay=0.0)
    model.eval()
    return losses


def test_training_with_a_large_sparsity_zeroes_gates_and_a_small_one_keeps_them():
    data = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    strong, weak = make(sparsity=10.0), make(sparsity=1e-3)
    _train(strong, data, steps=12, lr=1e-2)  # threshold lr * lambda = 0.1 per step beats AdamW's ~lr moves
    _train(weak, data, steps=12, lr=1e-2)
    zeroed = sum(int((g == 0).sum()) for g in gates(strong).values())
    assert zeroed >= 16, zeroed
    assert all((g != 0).all() for g in gates(weak).values())
    assert re.search(r"ranks kept: \d+/64 \(q_proj \d+/16", strong.summary(show=False))


def test_proximal_gradient_on_the_gates_prunes_some_ranks_keeps_others_and_learns(ids, tmp_path):
    """The paper's update: AdamW for A and B, a plain gradient step then the proximal step for g (its own
    optimizer, found by identity); then the saved pruned LoRA gives the same outputs."""
    data = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = make(sparsity=0.05)
    params = dict(model.trainable_parameters())
    adam = torch.optim.AdamW([p for n, p in params.items() if not n.endswith(".g")], lr=1e-2, weight_decay=0.0)
    sgd = torch.optim.SGD([p for n, p in params.items() if n.endswith(".g")], lr=1.0)
    with model.disabled():
        base_loss = model(input_ids=data, labels=data).loss.item()
    model.train()
    for step in range(1, 31):
        model(input_ids=data, labels=data).loss.backward()
        adam.step()
        sgd.step()
        model.step(step, sgd)
        adam.zero_grad()
        sgd.zero_grad()
    model.eval()
    kept = sum(int((g != 0).sum()) for g in gates(model).values())
    assert 8 <= kept <= 56, kept
    with torch.no_grad():
        assert model(input_ids=data, labels=data).loss.item() < base_loss - 0.5
    adapted = output(model, ids)
    model.save(tmp_path)
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), adapted, atol=TOL, rtol=1e-5)


def test_toy_fit_lowers_the_loss():
    data = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = _train(make(r=8), data, steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3, losses
    assert fit(make(r=8), data, steps=10, lr=1e-2)[-1] < losses[0] - 0.3  # without model.step: a gated LoRA


def test_st_trainer_runs_the_proximal_step_and_writes_the_pruned_lora(tmp_path):
    from slimtune.train import train
    from tests.test_train_fixtures import text_rows, tiny_llama_dir, write_jsonl

    tiny_llama_dir(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", text_rows(24))
    cfg = {"model": {"name": str(tmp_path / "llama")},
           "method": {"method": "sora", "r": 4, "targets": ["q_proj", "v_proj"], "sparsity": 50.0},
           "data": {"task": "causal_lm", "train": str(tmp_path / "lm.jsonl"), "max_length": 32, "eval_size": 4},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "progress": False,
                     "eval_before": False},
           "output_dir": str(tmp_path / "run")}
    train(cfg)  # threshold lr * lambda = 0.5 per step: every gate is zero after two steps
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["config"]
    assert (saved["method"], saved["r"], saved["rank_pattern"]) == ("lora", 1, None)


# -- saving: the pruned plain LoRA --------------------------------------------------------------------------------
PATTERNS = {"alpha_pattern": {"v_proj": 4.0}, "rank_pattern": {"up_proj": 6}}


@pytest.mark.parametrize("extra", [{}, {"rslora": True}, PATTERNS], ids=["plain", "rslora", "patterns"])
def test_saved_file_is_a_smaller_plain_lora_with_the_same_outputs(extra, ids, tmp_path):
    model = make(**extra)
    randomize(model)
    model.save(tmp_path / "unpruned")
    prune(model)
    adapted = output(model, ids)
    model.save(tmp_path / "pruned")
    assert (tmp_path / "pruned" / WEIGHTS).stat().st_size < 0.7 * (tmp_path / "unpruned" / WEIGHTS).stat().st_size
    loaded = st.load(tiny_llama(), tmp_path / "pruned")
    cfg = loaded.configs["default"]
    assert type(cfg) is st.LoraConfig and cfg.method == "lora" and cfg.rslora == bool(extra.get("rslora"))
    first, *_ = layers(model)
    for name, layer in layers(loaded).items():
        kept = int((gates(model)[name] != 0).sum())
        assert layer.adapters["default"].r == max(kept, 1), name
        sora = model.model.get_submodule(name).adapters["default"]
        assert layer.adapters["default"].scale == pytest.approx(sora.scale), name
    assert not loaded.model.get_submodule(first).adapters["default"].B.any()  # nothing kept: rank 1, B = 0
    torch.testing.assert_close(output(loaded, ids), adapted, atol=TOL, rtol=1e-5)


def test_unpruned_save_loads_exactly_with_the_same_config_fields(ids, tmp_path):
    model = make(r=4, alpha=8.0, dropout=0.1)
    randomize(model)
    adapted = output(model, ids)
    model.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert saved["method"] == "lora" and saved["r"] == 4 and saved["alpha"] == 8.0 and saved["dropout"] == 0.1
    assert saved["rank_pattern"] is None and saved["alpha_pattern"] is None
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path), ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_pruned_file_loads_in_peft_with_the_same_outputs(make_base, targets, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = st.attach(make_base(), SoraConfig(r=8, alpha=12.0, targets=targets))
    randomize(model)
    prune(model, seed=3)
    adapted = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["rank_pattern"] and written["alpha_pattern"]
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    for name, gate in gates(model).items():
        assert pm.base_model.model.get_submodule(name).r["default"] == max(int((gate != 0).sum()), 1), name
    torch.testing.assert_close(output(pm, ids), adapted, atol=TOL, rtol=1e-4)
    torch.testing.assert_close(output(st.load(make_base(), tmp_path), ids), adapted, atol=TOL, rtol=1e-5)


def test_sora_files_cannot_be_cut_to_a_rank(tmp_path):
    make().save(tmp_path)
    with pytest.raises(NotImplementedError, match="method 'lora' has no nested ranks"):
        st.load(tiny_llama(), tmp_path, rank=2)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, bad", [("sparsity", -1.0), ("sparsity", float("nan")), ("sparsity", "1e-3"),
                                        ("sparsity_warmup", -1), ("sparsity_warmup", 1.5), ("gate_lr", 0),
                                        ("gate_lr", True), ("init", "olora"), ("r", 0)])
def test_bad_field_names_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"SoraConfig.{field}={bad!r}: expected")):
        SoraConfig(targets=["q_proj"], **{field: bad})


def test_non_linear_targets_are_refused():
    with pytest.raises(NotImplementedError, match=r"sora on model.embed_tokens \(Embedding\)"):
        st.attach(tiny_llama(), SoraConfig(targets=["embed_tokens"]))
