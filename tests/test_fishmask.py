"""FishMask and Child-Tuning_D: a fixed top-Fisher mask, trained and saved sparse."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.methods._selective import chosen_tensors, empirical_fisher, top_k_masks
from slimtune.methods.child_tuning import ChildTuningDConfig
from slimtune.methods.fishmask import FishMaskConfig
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_gpt2, tiny_llama
from tests.selective_checks import (
    assert_only_entries_changed,
    base_state,
    file_size,
    lm_batches,
    masks_of,
    saved,
    train,
    train_run,
)


def reference_fisher(model, names: list[str], batches: list[dict], per_example: bool) -> dict[str, torch.Tensor]:
    """By hand: autograd.grad of every example's (or batch's) loss, squared and summed."""
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(params[n]) for n in names}
    for batch in batches:
        size = batch["input_ids"].shape[0]
        parts = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)] if per_example else [batch]
        for part in parts:
            grads = torch.autograd.grad(model(**part).loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    scores[n] += g.square()
    return scores


def reference_masks(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Top-k by a full sort, checking that the k-th and (k+1)-th scores differ (no tie decides)."""
    def top(flat: torch.Tensor) -> torch.Tensor:
        k = max(1, round(density * flat.numel()))
        values, order = flat.sort(descending=True)
        assert values[k - 1] > values[k], "a tie at the budget boundary would make the reference ambiguous"
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[order[:k]] = True
        return mask

    if scope == "per_tensor":
        return {n: top(s.reshape(-1)).view_as(s) for n, s in scores.items()}
    flat = top(torch.cat([s.reshape(-1) for s in scores.values()]))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = flat[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


@pytest.mark.parametrize("per_example", [True, False])
def test_fisher_scores_and_top_k_equal_a_brute_force_reference(per_example, ids):
    batches = lm_batches(ids, 2)  # 2 rows + 1 row
    names = chosen_tensors(tiny_llama(), FishMaskConfig(layers=[1]))
    ref = reference_fisher(tiny_llama(), names, batches, per_example)
    got = empirical_fisher(tiny_llama(), names, iter(batches), per_example)  # a one-shot iterator: streamed
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-12)
    want = reference_masks(ref, 0.02, "per_tensor")
    assert all(torch.equal(m, want[n]) for n, m in top_k_masks(got, 0.02, "per_tensor").items())
    cfg = FishMaskConfig(density=0.02, layers=[1], per_example=per_example)
    masks = masks_of(st.attach(tiny_llama(), cfg, data=batches))
    want = reference_masks(ref, 0.02, "global")
    assert masks.keys() == want.keys() and all(torch.equal(masks[n], want[n]) for n in names)


def test_top_k_masks_keep_exactly_k_with_ties_broken_in_model_order():
    scores = {"a": torch.tensor([0.0, 3.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 5.0], [0.0, 1.0]])}
    masks = top_k_masks(scores, 0.5)  # k = 4: 5 and 3, then two of the four 1s, the earliest
    assert masks["a"].tolist() == [False, True, True, True] and masks["b"].tolist() == [[False, True], [False, False]]
    masks = top_k_masks(scores, 0.25, "per_tensor")  # one each
    assert masks["a"].tolist() == [False, True, False, False] and masks["b"].tolist() == [[False, True], [False, False]]
    assert top_k_masks({"z": torch.zeros(5)}, 0.4)["z"].tolist() == [True, True, False, False, False]


def test_child_tuning_d_is_the_global_top_density_of_batch_gradient_fisher(ids):
    batches = lm_batches(ids, 2)  # 2 rows + 1 row: batch gradients differ from per-example ones
    names = chosen_tensors(tiny_llama(), ChildTuningDConfig())
    want = reference_masks(reference_fisher(tiny_llama(), names, batches, per_example=False), 0.3, "global")
    model = st.attach(tiny_llama(), ChildTuningDConfig(density=0.3), data=batches)
    masks = masks_of(model)
    assert all(torch.equal(masks[n], want[n]) for n in names)
    total = sum(m.numel() for m in want.values())
    assert sum(p.numel() for _, p in model.trainable_parameters()) == round(0.3 * total)


def test_fisher_pass_leaves_no_gradients_flags_or_mode_behind(ids):
    base = tiny_llama()
    model = st.attach(base, st.LoraConfig(r=2, targets=["q_proj"]), name="lora")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add(FishMaskConfig(density=0.01), name="fish", data=lm_batches(ids))
    assert model.training and all(m.training for m in model.model.modules())
    for n, p in model.named_parameters():
        assert p.grad is None, n
        if n in flags:
            assert p.requires_grad == flags[n], n


@pytest.mark.parametrize("config", [FishMaskConfig(density=0.01), ChildTuningDConfig(density=0.05),
                                    FishMaskConfig(density=0.02, scope="per_tensor")],
                         ids=["fishmask", "child_tuning_d", "fishmask_per_tensor"])
def test_only_masked_entries_change_under_adamw_weight_decay_and_state_is_k_sized(config, ids):
    base = tiny_llama()
    before = base_state(base)
    model = st.attach(base, config, data=lm_batches(ids))
    k = sum(p.numel() for _, p in model.trainable_parameters())
    opt = train(model, ids, weight_decay=0.5)
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == k
    masks = masks_of(model)
    assert sum(int(m.sum()) for m in masks.values()) == k
    assert_only_entries_changed(model, before, masks)
    assert not torch.allclose(output(model, ids), output(tiny_llama(), ids))


def test_file_size_scales_with_k_save_load_exact_and_restores_the_base_bit_for_bit(ids, tmp_path):
    sizes = {}  # k -> bytes
    for density in (0.005, 0.05):
        base = tiny_llama()
        before = base_state(base)
        ref = output(base, ids)
        model = st.attach(base, FishMaskConfig(density=density), data=lm_batches(ids))
        train(model, ids, steps=2)
        adapted = output(model, ids)
        model.save(tmp_path / str(density))
        values = {k: v for k, v in saved(tmp_path / str(density)).items() if k.endswith(".sparse_values")}
        assert sum(v.numel() for v in values.values()) == model.adapter_parameter_count("default")
        sizes[model.adapter_parameter_count("default")] = file_size(tmp_path / str(density))
        loaded = st.load(tiny_llama(), tmp_path / str(density))  # no data needed: the mask is in the file
        torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
        with model.disabled():
            torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
        model.merge()
        torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
        model.unmerge()
        assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    (k1, s1), (k2, s2) = sorted(sizes.items())
    header = 16 * 2 * len(model.view("default").selections)  # the header's offsets grow a few digits per tensor
    assert abs((s2 - s1) - 8 * (k2 - k1)) < header  # 8 bytes an entry: int32 index + fp32 value
    assert s1 < 8 * k1 + 8 * header  # a 0.5% mask: 1% of the fp32 model's bytes plus ~130 bytes a tensor


def test_classifier_head_in_modules_to_save_is_not_scored(ids):
    labels = torch.tensor([0, 2, 1])
    cfg = FishMaskConfig(density=0.01, modules_to_save=["classifier"])
    model = st.attach(tiny_bert(), cfg, data=[{"input_ids": ids, "labels": labels}])
    assert not any("classifier" in n for n in model.view("default").selections)
    assert any("classifier" in n for n, _ in model.trainable_parameters())
    train(model, ids, steps=2, labels=labels)


def test_tied_embeddings_are_never_selected(ids):
    model = st.attach(tiny_gpt2(), FishMaskConfig(density=0.01), data=lm_batches(ids))
    assert "transformer.wte.weight" not in model.view("default").selections


@pytest.mark.parametrize("config", [FishMaskConfig(density=0.01), ChildTuningDConfig(density=0.1)],
                         ids=["fishmask", "child_tuning_d"])
def test_toy_fit_lowers_the_loss(config):
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    model = st.attach(tiny_llama(), config, data=lm_batches(data))
    losses = fit(model, data, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.5, losses[::5]


def test_slimtune_train_scores_its_calibration_batches_and_saves_the_sparse_adapter(tmp_path):
    summary = train_run(tmp_path, {"method": "fishmask", "density": 0.01})
    assert summary["trainable_params"] == round(0.01 * sum(p.numel() for p in tiny_llama().parameters()))
    adapter = next(p for p in (tmp_path / "run").rglob("adapter_model.safetensors")).parent
    assert any(k.endswith(".sparse_index") for k in saved(adapter))


def test_clear_errors(ids):
    with pytest.raises(st.ConfigError, match=r"calibration batches.*data=batches"):
        st.attach(tiny_llama(), FishMaskConfig())
    with pytest.raises(st.ConfigError, match=r"calibration batches"):
        st.attach(tiny_llama(), ChildTuningDConfig())
    with pytest.raises(st.ConfigError, match="no loss: expected labels"):
        st.attach(tiny_llama(), FishMaskConfig(), data=[{"input_ids": ids}])
    with pytest.raises(st.ConfigError, match="calibration data is empty"):
        st.attach(tiny_llama(), FishMaskConfig(), data=[])
    with pytest.raises(st.ConfigError, match=r"FishMaskConfig.density=0: expected a fraction"):
        FishMaskConfig(density=0)
    with pytest.raises(st.ConfigError, match=r"FishMaskConfig.scope='layer': expected 'global' or 'per_tensor'"):
        FishMaskConfig(scope="layer")
    with pytest.raises(st.ConfigError, match=r"ChildTuningDConfig.density=1.5"):
        ChildTuningDConfig(density=1.5)
    with pytest.raises(st.TargetNotFoundError, match="picks no tensor"):
        st.attach(tiny_llama(), FishMaskConfig(targets=["q_projj"]), data=lm_batches(ids))
