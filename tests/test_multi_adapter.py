"""Several named adapters on one model: active sets, per-row routing, delete."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from tests.conftest import output, randomize, tiny_gpt2, tiny_llama


def three_adapters(rank_c: int = 4):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    model.add(st.LoraConfig(r=4, targets="all-linear"), name="b")
    model.add(st.LoraConfig(r=rank_c, targets=["o_proj"]), name="c")
    for i, name in enumerate("abc"):
        model.use(name)
        randomize(model, seed=10 + i)
    return model


def single(model, name, ids):
    if name is None:
        with model.disabled():
            return output(model, ids)
    model.use(name)
    return output(model, ids)


@pytest.mark.parametrize("rank_c", [4, 2])  # 2: adapter c takes the per-group path beside the bmm group
@pytest.mark.parametrize("routing", [["a", "b", "c"], ["b", None, "a"], ["c", "c", "a"], [None, None, "b"]])
def test_mixed_batch_rows_equal_single_adapter_runs(routing, rank_c, ids):
    model = three_adapters(rank_c)
    mixed = output(model, ids, adapter_names=routing)
    for row, name in enumerate(routing):
        expected = single(model, name, ids)[row]
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_dora_and_gpt2_conv1d(ids):
    model = st.attach(tiny_gpt2(), st.LoraConfig(r=2, targets=["c_attn"]), name="l")
    model.add(st.DoraConfig(r=2, targets=["c_attn", "c_proj"]), name="d")
    for name in ("l", "d"):
        model.use(name)
        randomize(model, seed=len(name))
    mixed = output(model, ids, adapter_names=["d", "l", None])
    for row, name in enumerate(["d", "l", None]):
        torch.testing.assert_close(mixed[row], single(model, name, ids)[row], atol=1e-5, rtol=1e-5)


def test_mixed_batch_cache_follows_weight_updates(ids):
    model = three_adapters()
    first = output(model, ids, adapter_names=["a", "b", "c"])
    with torch.no_grad():
        model.model.model.layers[0].self_attn.q_proj.adapters["a"].B.add_(0.5)
    second = output(model, ids, adapter_names=["a", "b", "c"])
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[0], single(model, "a", ids)[0], atol=1e-5, rtol=1e-5)


def test_active_set_composes_as_a_sum_of_layer_deltas():
    model = three_adapters()
    layer = model.model.model.layers[1].self_attn.q_proj  # carries adapters a and b
    x = torch.randn(2, 5, 64)
    base = layer.base_layer(x)
    deltas = []
    for name in "ab":
        model.use(name)
        deltas.append(layer(x) - base)
    model.use(["a", "b"])
    torch.testing.assert_close(layer(x), base + deltas[0] + deltas[1], atol=1e-5, rtol=1e-5)


def test_only_active_adapters_train():
    model = three_adapters()
    model.use("b")
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all(".adapters.b." in n for n in names)


def test_delete_removes_wrappers_and_generate_routes(ids):
    model = three_adapters()
    model.delete("b")
    model.delete("c")
    assert sum(1 for n, _ in model.named_modules() if n.endswith("mlp.down_proj.base_layer")) == 0
    assert model.active == []
    with pytest.raises(st.AdapterNameError, match="no adapter named 'b'"):
        model.use("b")
    out = model.generate(input_ids=ids[:2, :4], max_new_tokens=3, do_sample=False, adapter_names=["a", None])
    assert out.shape == (2, 7)


def test_routing_while_merged_is_refused(ids):
    model = three_adapters()
    model.use("a").merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])


def test_routing_needs_one_name_per_row(ids):
    model = three_adapters()
    with pytest.raises(ValueError, match="3 rows"):
        model(input_ids=ids, adapter_names=["a", "b"])
    with pytest.raises(st.AdapterNameError, match="Did you mean 'a'"):
        model(input_ids=ids, adapter_names=["a", "b", "aa"])
