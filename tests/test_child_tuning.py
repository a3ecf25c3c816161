"""Child-Tuning_F: dense selections whose gradient is masked by Bernoulli(p) / p each optimizer step.
(Child-Tuning_D, a fixed Fisher mask, is tested with FishMask in test_fishmask.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import slimtune as st
from slimtune.methods.child_tuning import ChildTuningFConfig
from tests.conftest import VOCAB, output, tiny_gpt2, tiny_llama
from tests.selective_checks import assert_only_entries_changed, base_state, masks_of, train

Q = "model.layers.0.self_attn.q_proj.weight"


def one_tensor(p: float = 0.3, seed: int = 0) -> tuple[st.TunedModel, torch.nn.Parameter]:
    model = st.attach(tiny_llama(), ChildTuningFConfig(p=p, seed=seed, targets=["layers.0.self_attn.q_proj"]))
    model.train()  # the gradient masks are armed when the adapter is attached
    return model, model.view("default").selections[Q].values


def grad_of(values: torch.nn.Parameter, c: torch.Tensor) -> torch.Tensor:
    (values * c).sum().backward()  # raw gradient = c
    g, values.grad = values.grad.clone(), None
    return g


def test_scaled_gradient_is_unbiased_in_expectation():
    p, n = 0.3, 300
    model, values = one_tensor(p)
    c = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    total, kept = torch.zeros_like(c), 0.0
    for step in range(1, n + 1):
        g = grad_of(values, c)
        masked = g == 0
        assert torch.equal(g[~masked], c[~masked] / p)  # kept entries are scaled by exactly 1/p
        total += g
        kept += (~masked).float().mean().item() / n
        model.step(step)
    z = (total / n - c) / (c.abs() * math.sqrt((1 - p) / (p * n)))  # ~ N(0, 1) per entry if unbiased
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert 0.9 < z.std().item() < 1.1
    assert abs(kept - p) < 0.01


def test_mask_is_fixed_within_a_step_redrawn_by_step_and_reproducible():
    model, values = one_tensor()
    c = torch.ones(values.shape)
    first = grad_of(values, c)
    assert torch.equal(grad_of(values, c), first)  # gradient accumulation: one mask per optimizer step
    model.step(1)
    assert not torch.equal(grad_of(values, c), first)
    _, again = one_tensor()
    assert torch.equal(grad_of(again, c), first)  # same seed, same masks (every data-parallel rank alike)
    _, other = one_tensor(seed=1)
    assert not torch.equal(grad_of(other, c), first)


def test_masks_are_armed_at_attach_and_after_loading(tmp_path):
    """No call order to remember: a plain loop gets masked gradients from step 1, a loaded adapter too."""
    attached = st.attach(tiny_llama(), ChildTuningFConfig(targets=["q_proj"]))
    attached.save(tmp_path / "a")
    for model in (attached, st.load(tiny_llama(), tmp_path / "a")):
        values = model.view("default").selections[Q].values
        g = grad_of(values, torch.ones(values.shape))
        assert 0 < (g == 0).float().mean().item() < 1  # some entries masked, the rest scaled


def test_only_chosen_tensors_change_and_save_load_merge_disable_are_exact(ids, tmp_path):
    base = tiny_gpt2()
    before, ref = base_state(base), output(base, ids)
    model = st.attach(base, ChildTuningFConfig(targets=["mlp"], layers=[1]))
    chosen = masks_of(model)
    assert set(chosen) == {f"transformer.h.1.mlp.{m}.{t}" for m in ("c_fc", "c_proj") for t in ("weight", "bias")}
    opt = train(model, ids, weight_decay=0.5)
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == sum(before[n].numel() for n in chosen)
    assert_only_entries_changed(model, before, chosen)
    adapted = output(model, ids)
    assert not torch.allclose(adapted, ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.save(tmp_path / "a")
    torch.testing.assert_close(output(st.load(tiny_gpt2(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    model = st.attach(tiny_llama(), ChildTuningFConfig(p=0.5, targets=["mlp"]))
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    losses = []
    for step in range(1, 11):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_clear_errors():
    with pytest.raises(st.ConfigError, match=r"ChildTuningFConfig.p=0: expected a probability in \(0, 1\]"):
        ChildTuningFConfig(p=0)
    with pytest.raises(st.ConfigError, match=r"ChildTuningFConfig.seed=-1: expected an int >= 0"):
        ChildTuningFConfig(seed=-1)
    with pytest.raises(st.TargetNotFoundError, match="skipped as tied"):
        st.attach(tiny_gpt2(), ChildTuningFConfig(targets=["wte"]))
