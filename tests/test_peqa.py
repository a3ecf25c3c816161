"""PEQA (slimtune/methods/peqa.py): train only the quantization scales of a group-wise INT-b base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimtune as st
import slimtune.methods.peqa  # noqa: F401  (registers peqa without the shared import)
import slimtune.quant as sq
import tests.test_contract as tc
from slimtune.bases import kind_of
from slimtune.layer import AdapterLayer
from slimtune.methods.peqa import PeqaConfig
from slimtune.quant import groupwise as gw
from tests.conftest import VOCAB, fit, output, tiny_llama

G = 16


def int4_llama(group_size: int = G, **kw) -> nn.Module:
    return sq.quantize(tiny_llama(), "int4", group_size=group_size, **kw)


def layers(model: st.TunedModel) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def set_scales(model: st.TunedModel, name: str, seed: int, size: float = 0.2) -> None:
    """ds of adapter `name` to a random relative change of the base's scales (|ds / s0| <= size)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            ds = layer.adapters[name].ds
            ds.copy_(layer.base_layer.scales * (torch.rand(ds.shape, generator=g) - 0.5) * 2 * size)


def reference_output(make, model: st.TunedModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    """The output of a fresh base whose scales were set to s0 + ds by hand."""
    ref = make()
    for full, layer in layers(model).items():
        q = ref.get_submodule(full.removeprefix("model."))
        q.scales.copy_(layer.base_layer.scales + layer.adapters[name].ds.detach())
    return output(ref, ids)


def test_identity_at_init_exactly(ids):
    model = st.attach(int4_llama(), PeqaConfig())
    with model.disabled():
        ref = output(model, ids)
    assert torch.equal(output(model, ids), ref)  # alone: the fused path, one matmul with s0 + 0
    model.add(PeqaConfig(), "other")
    model.use(["default", "other"])  # two adapters: base(x) + x @ (ds * (q - z)).T, unfused
    assert torch.equal(output(model, ids), ref)


def test_forward_is_the_base_with_scales_s0_plus_ds(ids):
    model = st.attach(int4_llama(), PeqaConfig())
    set_scales(model, "default", seed=1)
    torch.testing.assert_close(output(model, ids), reference_output(int4_llama, model, "default", ids),
                               atol=1e-5, rtol=1e-5)
    layer = model.model.model.layers[0].mlp.down_proj
    base, ds = layer.base_layer, layer.adapters["default"].ds
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    W = gw.dequantize_groupwise(base.codes(), base.scales + ds.detach(), base.zeros)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, W, base.bias), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_scale_gradients_equal_autograd_through_the_dense_weight(fused):
    q = sq.GroupQuantLinear.from_linear(nn.Linear(64, 8), 4, G)
    kind = kind_of(q)
    ds = torch.randn(8, 64 // G, generator=torch.Generator().manual_seed(2)) * 0.01
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    out_grad = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(4))
    ours_ds, ours_x = ds.clone().requires_grad_(), x.clone().requires_grad_()
    scales = kind.scales(q) + ours_ds if fused else ours_ds
    kind.linear_with_scales(q, ours_x, scales, bias=fused).backward(out_grad)
    ref_ds, ref_x = ds.clone().requires_grad_(), x.clone().requires_grad_()
    q_minus_z = (q.codes().float() - q.zeros.repeat_interleave(G, dim=1))  # (8, 64)
    s = (q.scales + ref_ds) if fused else ref_ds
    W = s.repeat_interleave(G, dim=1) * q_minus_z
    nn.functional.linear(ref_x, W, q.bias if fused else None).backward(out_grad)
    torch.testing.assert_close(ours_ds.grad, ref_ds.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("group_size", "groups"), [(G, {64: 4, 128: 8}), (-1, {64: 1, 128: 1})])
def test_trains_only_the_scales_d_out_times_n_groups_per_layer(ids, group_size, groups):
    model = st.attach(int4_llama(group_size), PeqaConfig())
    trainable = dict(model.trainable_parameters())
    assert trainable and all(n.endswith(".ds") for n in trainable)
    want = sum(m.base_layer.out_features * groups[m.base_layer.in_features] for m in layers(model).values())
    assert sum(p.numel() for p in trainable.values()) == want and len(trainable) == 14
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    ids_trainable = {id(p) for p in trainable.values()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in ids_trainable), name
    codes = {n: (m.base_layer.weight.clone(), m.base_layer.zeros.clone()) for n, m in layers(model).items()}
    fit(model, ids, steps=2, lr=1e-2)
    for name, layer in layers(model).items():  # codes and zeros are frozen (buffers, never written)
        assert torch.equal(layer.base_layer.weight, codes[name][0]) and torch.equal(layer.base_layer.zeros,
                                                                                    codes[name][1])


def test_the_adapter_file_holds_only_the_scale_offsets_and_loads_exactly(ids, tmp_path):
    model = st.attach(int4_llama(), PeqaConfig())
    set_scales(model, "default", seed=1)
    model.save(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors and all(k.endswith(".peqa_scales_delta") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for _, p in model.trainable_parameters())
    loaded = st.load(int4_llama(), tmp_path / "a")
    assert torch.equal(output(loaded, ids), output(model, ids))


def test_switching_adapters_switches_scale_sets(ids):
    model = st.attach(int4_llama(), PeqaConfig(), name="task_a")
    model.add(PeqaConfig(), "task_b")
    set_scales(model, "task_a", seed=1)
    set_scales(model, "task_b", seed=2)
    with model.disabled():
        base = output(model, ids)
    out_a, out_b = output(model.use("task_a"), ids), output(model.use("task_b"), ids)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    torch.testing.assert_close(out_a, reference_output(int4_llama, model, "task_a", ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_b, reference_output(int4_llama, model, "task_b", ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output(model, ids, adapter_names=["task_a", "task_b", None]),
                               torch.cat([out_a[:1], out_b[1:2], base[2:]]), atol=1e-5, rtol=1e-5)


def test_merge_writes_the_scales_exactly_and_disabled_is_the_base_bit_for_bit(ids):
    model = st.attach(int4_llama(), PeqaConfig())
    set_scales(model, "default", seed=1)
    with model.disabled():
        base = output(model, ids)
    adapted = output(model, ids)
    before = {n: tuple(t.clone() for t in m.base_layer.state_tensors()) for n, m in layers(model).items()}
    model.merge()
    for name, layer in layers(model).items():
        packed, scales, zeros = before[name]
        q = layer.base_layer
        assert torch.equal(q.weight, packed) and torch.equal(q.zeros, zeros)
        assert torch.equal(q.scales, scales + layer.adapters["default"].ds.detach())  # s0 + ds, written as is
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    with model.disabled():
        assert torch.equal(output(model, ids), base)
    model.unmerge()
    for name, layer in layers(model).items():
        assert all(torch.equal(a, b) for a, b in zip(layer.base_layer.state_tensors(), before[name], strict=True))
    with model.disabled():
        assert torch.equal(output(model, ids), base)
    plain = model.detach(merge=True)
    torch.testing.assert_close(output(plain, ids), adapted, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, sq.GroupQuantLinear) for m in plain.modules()) == 14  # still INT4


def test_the_contract_checks_including_merge_and_unmerge(ids, tmp_path, monkeypatch):
    """The row proposed for tests/test_contract.py; merge checks run here (skipped there for this base kind)."""
    example = tc.Example(int4_llama, lambda: PeqaConfig())
    monkeypatch.setitem(tc.EXAMPLES, "peqa-int4", example)
    tc.test_contract("peqa-int4", ids, tmp_path)
    model = st.attach(example.make(), example.config())
    tc.perturb(model)
    tc.check_merge(model, example, ids, tc.run(model, example, ids))


def test_refuses_bases_that_are_not_group_quantized():
    with pytest.raises(st.ConfigError, match=r"PeqaConfig cannot be built on model\.layers\.0\.self_attn\.q_proj "
                                             r"\(QuantLinear.*PEQA needs a group-wise quantized base layer"):
        st.attach(sq.quantize(tiny_llama(), "nf4"), PeqaConfig())
    with pytest.raises(st.ConfigError, match=r"mlp\.down_proj \(Linear.*got Linear \(base kind 'linear'\)"):
        st.attach(int4_llama(skip=["down_proj"]), PeqaConfig())
    assert st.attach(int4_llama(skip=["down_proj"]), PeqaConfig(exclude=["down_proj"]))


def test_a_toy_fit_lowers_the_loss_and_bf16_starts_at_the_base(ids):
    data = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(st.attach(int4_llama(), PeqaConfig()), data, steps=6, lr=1e-2)
    assert losses[-1] < 0.97 * losses[0] and losses == sorted(losses, reverse=True)
    model = st.attach(int4_llama(compute_dtype=torch.bfloat16), PeqaConfig())
    assert {p.dtype for _, p in model.trainable_parameters()} == {torch.bfloat16}
    with model.disabled():
        ref = output(model, ids)
    assert torch.equal(output(model, ids), ref)
