"""Properties of DyLoRA: nested ranks trained in one run, any rank k <= r chosen after training (in memory,
at load, in a PEFT export), the per-step rank sampler, and clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.bases import sizes
from slimtune.cli import main
from slimtune.layer import AdapterLayer
from slimtune.methods.dylora import DyLoraConfig, sample_rank
from tests.conftest import VOCAB, fit, output, randomize, tiny_gpt2, tiny_llama

TOL = 1e-5
LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj"]


def make(r: int = 8, **extra):
    return st.attach(tiny_llama(), DyLoraConfig(r=r, targets=LLAMA, **extra))


def layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def at_rank(model, k: int, name: str = "default"):
    model.shared[name].eval_rank = k
    return model


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_identity_at_init_in_eval_and_training(make_base, targets, ids):
    ref = output(make_base(), ids)
    model = st.attach(make_base(), DyLoraConfig(r=8, targets=targets))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    plain = make_base().train()
    torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout) in both
    ref = output(plain, ids)
    torch.manual_seed(0)
    torch.testing.assert_close(output(model.train(), ids), ref, atol=0, rtol=0)


def test_forward_and_delta_weight_are_the_cut_formula_on_one_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    model = st.attach(net.eval(), DyLoraConfig(r=4, alpha=6.0, targets=["0"]))
    randomize(model, scale=0.5)
    adapter, base = model.model[0].adapters["default"], model.model[0].base_layer
    x = torch.randn(3, 6)
    for k in (1, 3, 4):
        at_rank(model, k)
        expected = base(x) + (6.0 / k) * x @ adapter.A[:k].T @ adapter.B[:, :k].T
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
        delta = (6.0 / k) * adapter.B[:, :k] @ adapter.A[:k]
        torch.testing.assert_close(adapter.delta_weight(base), delta, atol=1e-7, rtol=1e-6)
    model.train()
    b = model.shared["default"].rank
    expected = base(x) + (6.0 / b) * x @ adapter.A[:b].T @ adapter.B[:, :b].T  # training: the sampled rank
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [8, 3])
def test_merge_matches_unmerged_at_full_and_cut_rank(k, ids):
    model = make()
    randomize(model)
    at_rank(model, k)
    unmerged = output(model, ids)
    with model.disabled():
        assert not torch.allclose(output(model, ids), unmerged, atol=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=TOL, rtol=1e-4)
    at_rank(model, 2)  # changing the eval rank while merged: unmerge still takes out what merge put in
    model.unmerge()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)
    at_rank(model, k)
    torch.testing.assert_close(output(model, ids), unmerged, atol=TOL, rtol=1e-4)


def test_trainable_count_is_r_times_d_in_plus_d_out():
    for d_in, d_out, r in ((7, 5, 3), (5, 9, 16)):
        model = st.attach(nn.Sequential(nn.Linear(d_in, d_out)), DyLoraConfig(r=r, targets=["0"]))
        assert sum(p.numel() for _, p in model.trainable_parameters()) == r * (d_in + d_out)
    model = make(r=4)
    expected = sum(4 * sum(sizes(m.base_layer)) for m in layers(model).values())
    assert len(layers(model)) == 8
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected  # the ranks object holds no tensors


def test_save_then_load_is_exact_and_keeps_the_eval_rank(ids, tmp_path):
    model = make()
    randomize(model)
    full = output(model, ids)
    model.save(tmp_path / "full")
    loaded = st.load(tiny_llama(), tmp_path / "full")
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids), full, atol=0, rtol=0)
    at_rank(model, 3)
    model.save(tmp_path / "three")
    saved = json.loads((tmp_path / "three" / "adapter_config.json").read_text())["config"]
    assert saved["r"] == 8 and saved["eval_rank"] == 3  # every rank kept, evaluated at 3
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path / "three"), ids), output(model, ids),
                               atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_load_at_rank_k_equals_the_model_evaluated_at_k(k, ids, tmp_path):
    model = make()
    randomize(model)
    model.save(tmp_path)
    cut = st.load(tiny_llama(), tmp_path, rank=k)
    cfg = cut.configs["default"]
    assert (cfg.method, cfg.r, cfg.eval_rank) == ("dylora", k, None)
    for name, layer in layers(cut).items():
        adapter, full = layer.adapters["default"], model.get_submodule(name).adapters["default"]
        assert adapter.A.shape[0] == k and adapter.B.shape[1] == k
        assert torch.equal(adapter.A, full.A[:k]) and torch.equal(adapter.B, full.B[:, :k])
    torch.testing.assert_close(output(cut, ids), output(at_rank(model, k), ids), atol=TOL, rtol=1e-5)


def test_sampled_rank_changes_across_steps_stays_in_range_and_is_reproducible():
    model = make(r=8, r_min=3, seed=5)
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.0)
    seen = []
    for step in range(1, 41):
        model.step(step, opt)
        seen.append(model.shared["default"].rank)
    assert all(3 <= b <= 8 for b in seen) and len(set(seen)) >= 4
    assert sum(a != b for a, b in zip(seen, seen[1:], strict=False)) >= 20
    assert seen == [sample_rank(5, t, 3, 8) for t in range(1, 41)]  # a pure function of (seed, step)
    other = make(r=8, r_min=3, seed=5)
    other.step(17)
    assert other.shared["default"].rank == seen[16]  # a resumed run sees the same rank at the same step
    assert [sample_rank(6, t, 3, 8) for t in range(1, 41)] != seen
    assert "nested ranks 3..8" in model.summary(show=False)


def test_training_updates_only_the_sampled_leading_ranks(ids):
    model = make(r=8, seed=1).train()
    b = model.shared["default"].rank
    assert b < 8  # seed 1 draws a cut rank for the first step
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers(model).values():
        a = layer.adapters["default"]
        assert a.A.grad[b:].abs().sum() == 0 and a.B.grad[:, b:].abs().sum() == 0
        assert a.B.grad[:, :b].abs().sum() > 0


def test_frozen_lower_trains_only_the_b_th_row_and_column(ids):
    model = make(r=8, seed=1, frozen_lower=True)
    randomize(model)
    model.train()
    b = model.shared["default"].rank
    assert b > 1
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers(model).values():
        a = layer.adapters["default"]
        rows = (a.A.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        cols = (a.B.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
        assert rows == [b - 1] and cols == [b - 1]


def _lm_loss(model, data: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=data, labels=data).loss.item()


def _train(model, data: torch.Tensor, steps: int = 40):
    """AdamW on one fixed batch, with model.step after every optimizer step (DyLoRA draws its next rank)."""
    fit(model, data, steps, lr=1e-2)
    return model.eval()


def test_one_training_run_gives_every_rank_below_the_base_loss():
    """The paper's point: one run, then r/4, r/2 and r each work on their own without retraining;
    a LoRA trained at rank r alone and cut to r/4 does worse."""
    r, data = 8, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _train(st.attach(tiny_llama(), DyLoraConfig(r=r, alpha=8.0, targets="all-linear", seed=0)), data)
    with model.disabled():
        base_loss = _lm_loss(model, data)
    losses = {k: _lm_loss(at_rank(model, k), data) for k in (r // 4, r // 2, r)}
    assert all(loss < base_loss - 0.3 for loss in losses.values()), (base_loss, losses)
    lora = _train(st.attach(tiny_llama(), st.LoraConfig(r=r, alpha=8.0, targets="all-linear")), data)
    k, tensors = r // 4, lora.adapter_state_dict()
    cut = st.attach(tiny_llama(), st.LoraConfig(r=k, alpha=8.0, targets="all-linear"))
    cut.load_adapter_state_dict({n: t[:k] if n.endswith("lora_A.weight") else t[:, :k] for n, t in tensors.items()})
    lora_cut = _lm_loss(cut.eval(), data)
    assert losses[r // 4] < lora_cut - 0.1, (losses, lora_cut)


# -- HF PEFT: DyLoRA at one rank is a plain LoRA -------------------------------------------------------------
@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_peft_export_at_full_and_cut_rank_loads_in_peft_with_same_outputs(make_base, targets, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = st.attach(make_base(), DyLoraConfig(r=6, alpha=12.0, targets=targets))
    randomize(model)
    model.save(tmp_path / "full", format="peft")
    written = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["lora_alpha"]) == ("LORA", 6, 12.0)
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path / "full").eval()
    torch.testing.assert_close(output(pm, ids), output(model, ids), atol=TOL, rtol=1e-4)
    model.save(tmp_path / "ours")
    st.load(make_base(), tmp_path / "ours", rank=2).save(tmp_path / "cut", format="peft")
    assert json.loads((tmp_path / "cut" / "adapter_config.json").read_text())["r"] == 2
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path / "cut").eval()
    torch.testing.assert_close(output(pm, ids), output(at_rank(model, 2), ids), atol=TOL, rtol=1e-4)


def test_cli_export_with_rank_writes_the_cut_lora(ids, tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = st.attach(base, DyLoraConfig(r=8, targets=LLAMA))
    randomize(model)
    model.save(tmp_path / "adapter")
    args = ["export", str(tmp_path / "adapter"), "--rank", "4", "--format", "peft", "--out", str(tmp_path / "peft"),
            "--base", str(tmp_path / "base")]
    assert main(args) == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"]) == ("LORA", 4)
    loaded = st.load(tiny_llama(), tmp_path / "peft")
    assert loaded.configs["default"].method == "lora"
    torch.testing.assert_close(output(loaded, ids), output(at_rank(model, 4), ids), atol=TOL, rtol=1e-5)


def test_peft_export_of_a_cut_eval_rank_asks_to_cut_the_file_first(tmp_path):
    model = at_rank(make(), 3)
    with pytest.raises(NotImplementedError, match=r"eval_rank=3 < r=8.*rank=3"):
        model.save(tmp_path, format="peft")


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def saved_dylora(tmp_path):
    make(r=8, r_min=2).save(tmp_path / "dylora")
    return tmp_path / "dylora"


@pytest.mark.parametrize("rank", [0, -1, True, 2.0])
def test_load_with_a_rank_that_is_not_a_positive_int_is_refused(saved_dylora, rank):
    with pytest.raises(st.ConfigError, match=re.escape(f"st.load(..., rank={rank!r}): expected an int >= 1")):
        st.load(tiny_llama(), saved_dylora, rank=rank)


@pytest.mark.parametrize("rank", [9, 1])
def test_load_above_r_or_below_r_min_names_the_rank_and_the_range(saved_dylora, rank):
    base = tiny_llama()
    with pytest.raises(st.ConfigError, match=re.escape(f"rank={rank}: this DyLoRA adapter holds ranks r_min=2..r=8")):
        st.load(base, saved_dylora, rank=rank)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_rank_on_a_method_without_nested_ranks_is_not_implemented(tmp_path):
    st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"])).save(tmp_path)
    with pytest.raises(NotImplementedError, match=r"rank=2\): method 'lora' has no nested ranks.*dylora"):
        st.load(tiny_llama(), tmp_path, rank=2)


def test_eval_rank_set_in_memory_is_checked():
    model = make(r=8, r_min=2)
    for bad in (0, 1, 9, 2.5):
        with pytest.raises(st.ConfigError, match=re.escape(f"eval_rank={bad!r}: expected an int in [r_min=2, r=8]")):
            model.shared["default"].eval_rank = bad


@pytest.mark.parametrize("field, bad", [("r_min", 0), ("r_min", 9), ("r_min", 1.0), ("eval_rank", 0),
                                        ("eval_rank", 9), ("seed", -1), ("seed", "0"), ("frozen_lower", 1),
                                        ("init", "pissa"), ("rank_pattern", {"q_proj": 4})])
def test_bad_field_names_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"DyLoraConfig.{field}={bad!r}: expected")):
        DyLoraConfig(r=8, targets=["q_proj"], **{field: bad})


def test_non_linear_targets_are_refused():
    with pytest.raises(NotImplementedError, match=r"dylora on model.embed_tokens \(Embedding\)"):
        st.attach(tiny_llama(), DyLoraConfig(targets=["embed_tokens"]))
