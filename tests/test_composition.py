"""Composition blocks (Stack, Parallel, Average, Split, Fuse), AdapterFusion, and call arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.errors import AdapterNameError, ConfigError
from slimtune.layer import AdapterLayer
from slimtune.methods.base import LayerAdapter, Method, register
from tests.conftest import VOCAB, fit, output, randomize, tiny_llama

LORA = dict(r=2, targets=["q_proj", "v_proj", "down_proj"])


def three_adapters(config=None) -> st.TunedModel:
    """tiny Llama with Pfeiffer bottleneck adapters a, b, c (serial: composition order matters)."""
    make = config or (lambda: st.BottleneckConfig.pfeiffer(reduction_factor=8))
    model = st.attach(tiny_llama(), make(), name="a")
    model.add(make(), name="b")
    model.add(make(), name="c")
    randomize(model, scale=0.2)
    return model


def a_layer(model: st.TunedModel) -> AdapterLayer:
    return next(m for m in model.modules() if isinstance(m, AdapterLayer))


def test_stack_is_the_adapters_in_sequence_by_hand(ids):
    model = three_adapters()
    layer = a_layer(model)
    x = torch.randn(2, 5, layer.base_layer.in_features)
    base = layer.base_layer
    a, b = layer.adapters["a"], layer.adapters["b"]
    model.use(st.Stack("a", "b"))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), b(x, a(x, base(x), base), base), atol=0, rtol=0)
        reverse = model.use(st.Stack("b", "a"))
        assert not torch.allclose(layer(x), b(x, a(x, base(x), base), base))  # order matters
    stacked = output(reverse.use(st.Stack(st.Stack("a"), "b")), ids)
    torch.testing.assert_close(stacked, output(model.use(["a", "b"]), ids), atol=0, rtol=0)
    assert model.use(st.Stack("a", "b")).setup == ["a", "b"]  # a Stack of names is the plain active list


def test_average_is_the_weighted_mean_of_outputs(ids):
    model = three_adapters()
    layer = a_layer(model)
    x = torch.randn(2, 5, layer.base_layer.in_features)
    base = layer.base_layer
    model.use(st.Average("a", "b", "c", weights=[0.5, 0.3, 0.2]))
    with torch.no_grad():
        h = base(x)
        want = sum(w * layer.adapters[n](x, h, base) for n, w in zip("abc", [0.5, 0.3, 0.2], strict=True))
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
    assert model.setup == st.Average("a", "b", "c", weights=[0.5, 0.3, 0.2])


def test_average_of_loras_equals_scaled_deltas(ids):
    """Σ w_i (h + Δ_i) with Σ w = 1 is h + Σ w_i Δ_i: two LoRAs with B scaled by their weights."""
    model = st.attach(tiny_llama(), st.LoraConfig(**LORA), name="a")
    model.add(st.LoraConfig(**LORA), name="b")
    randomize(model)
    averaged = output(model.use(st.Average("a", "b", weights=[0.25, 0.75])), ids)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
            layer.adapters["a"].B.mul_(0.25)
            layer.adapters["b"].B.mul_(0.75)
    torch.testing.assert_close(averaged, output(model.use(["a", "b"]), ids), atol=1e-5, rtol=1e-5)


def test_split_positions_follow_each_child(ids):
    model = three_adapters()
    layer = a_layer(model)
    x = torch.randn(2, 7, layer.base_layer.in_features)
    base = layer.base_layer
    model.use(st.Split("a", "b", splits=3))
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out[:, :3], layer.adapters["a"](x[:, :3], base(x[:, :3]), base))
        torch.testing.assert_close(out[:, 3:], layer.adapters["b"](x[:, 3:], base(x[:, 3:]), base))
    # causal attention: positions < 3 see only positions < 3, all through adapter a
    split = output(model, ids)
    torch.testing.assert_close(split[:, :3], output(model.use("a"), ids)[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(split[:, 3:], output(model.use("a"), ids)[:, 3:], atol=1e-4)
    with pytest.raises(ConfigError, match="splits"):
        st.Split("a", "b", splits=[0])


def test_parallel_runs_the_batch_once_per_child(ids):
    model = three_adapters()
    par = output(model.use(st.Parallel("a", "b")), ids)
    assert par.shape[0] == 2 * ids.shape[0]
    torch.testing.assert_close(par[:3], output(model.use("a"), ids), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(par[3:], output(model.use("b"), ids), atol=1e-5, rtol=1e-4)
    # Parallel inside a Stack distributes: Stack(a, Parallel(b, c)) = Parallel(Stack(a, b), Stack(a, c))
    model.use(st.Stack("a", st.Parallel("b", "c")))
    assert model.setup == st.Parallel(st.Stack("a", "b"), st.Stack("a", "c"))
    out = output(model, ids)
    torch.testing.assert_close(out[3:], output(model.use(["a", "c"]), ids), atol=1e-5, rtol=1e-4)
    model.use(st.Parallel("a", "b"))
    loss = model(input_ids=ids, labels=ids).loss  # labels are repeated with the batch
    assert torch.isfinite(loss)


def test_parallel_generate_equals_each_alone():
    model = three_adapters()
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = model.use(st.Parallel("a", "b")).generate(input_ids=prompt, **kw)
    assert torch.equal(both[:2], model.use("a").generate(input_ids=prompt, **kw))
    assert torch.equal(both[2:], model.use("b").generate(input_ids=prompt, **kw))


def test_blocks_route_per_row(ids):
    model = three_adapters()
    mixed = output(model, ids, adapter_names=[st.Stack("a", "b"), st.Average("b", "c"), None])
    torch.testing.assert_close(mixed[:1], output(model.use(["a", "b"]), ids[:1]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1:2], output(model.use(st.Average("b", "c")), ids[1:2]), atol=1e-5, rtol=1e-4)
    with model.disabled():
        torch.testing.assert_close(mixed[2:], output(model, ids[2:]), atol=1e-5, rtol=1e-4)


def test_bad_setups_are_refused_clearly():
    model = three_adapters()
    with pytest.raises(AdapterNameError, match="nope"):
        model.use(st.Average("a", "nope"))
    with pytest.raises(ConfigError, match="Parallel"):
        model.use(st.Average("a", st.Parallel("b", "c")))
    with pytest.raises(ConfigError, match="weights"):
        st.Average("a", "b", weights=[1.0])
    with pytest.raises(ConfigError, match="fusion"):
        model.use(st.Fuse("a", "b"))  # no fusion adapter attached
    with pytest.raises(ConfigError, match="not a fusion adapter"):
        model.use(st.Fuse("a", "b", fusion="c"))
    model.use(st.Average("a", "b"))
    with pytest.raises(NotImplementedError, match="merge"):
        model.merge()
    model.add(st.PromptTuningConfig(num_virtual_tokens=2), name="p")
    with pytest.raises(NotImplementedError, match="changes the model call"):
        model.use(st.Average("a", "p"))
    model.use(st.Stack("p", st.Average("a", "b")))  # stacked at the top: fine


def test_input_transforming_adapter_inside_a_block_is_refused(ids):
    model = st.attach(tiny_llama(), st.IA3Config(targets=["down_proj"], feedforward=True), name="a")
    model.add(st.IA3Config(targets=["down_proj"], feedforward=True), name="b")
    with pytest.raises(NotImplementedError, match="changes this layer's input"):
        output(model.use(st.Average("a", "b")), ids)


def test_delete_an_adapter_of_the_setup_falls_back_to_a_list():
    model = three_adapters()
    model.use(st.Average("a", "b"))
    model.delete("a")
    assert model.setup == ["b"]


# -- AdapterFusion ----------------------------------------------------------------------------------
def fused_model() -> st.TunedModel:
    model = three_adapters()
    model.add(st.FusionConfig(adapters=["a", "b", "c"]), name="f")
    return model.use(st.Fuse("a", "b", "c"))  # the one fusion adapter is found


def test_fusion_at_init_averages_the_deltas_and_trains_only_the_fusion(ids):
    model = fused_model()
    model.eval()
    assert model.setup == st.Fuse("a", "b", "c", fusion="f")
    layer = a_layer(model)
    base, fusion = layer.base_layer, layer.adapters["f"]
    x = torch.randn(2, 5, base.in_features)
    with torch.no_grad():
        h = base(x)
        deltas = [layer.adapters[n](x, h, base) - h for n in "abc"]
        alpha = fusion.attention(h, deltas)
        assert (alpha - 1 / 3).abs().max() < 0.05  # balanced at init
        torch.testing.assert_close(fusion.value.weight, torch.eye(base.out_features), atol=1e-6, rtol=0)
        # the formula by hand
        q, k = fusion.query(h), torch.stack([fusion.key(d) for d in deltas], -2)
        a = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1), -1)
        want = h + (a.unsqueeze(-2) @ torch.stack([fusion.value(d) for d in deltas], -2)).squeeze(-2)
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), h + sum(deltas) / 3, atol=0.05 * h.abs().max().item(), rtol=0)
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable and all(".adapters.f." in n for n in trainable)
    n_params = sum(p.numel() for _, p in model.trainable_parameters())
    d = [m.base_layer.out_features for m in model.modules() if isinstance(m, AdapterLayer)]
    assert n_params == sum(3 * (k * k + k) for k in d)


def test_fusion_fit_save_load(ids, tmp_path):
    model = fused_model()
    children = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters.f." not in n}
    losses = fit(model, ids, steps=15, lr=3e-3)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in children:
            assert torch.equal(p, children[n]), n  # the fused adapters and the base stay frozen
    reg = model.regularization_loss()
    v = [m.adapters["f"].value.weight for m in model.modules() if isinstance(m, AdapterLayer)]
    torch.testing.assert_close(reg, 0.01 * sum((w - torch.eye(w.shape[0])).pow(2).sum() for w in v))
    model.eval()
    want = output(model, ids)
    for name in "abcf":
        model.save(tmp_path / name, name=name)
    loaded = st.load(tiny_llama(), tmp_path / "a", name="a")
    for name in "bcf":
        loaded = st.load(loaded, tmp_path / name, name=name)
    torch.testing.assert_close(output(loaded.use(st.Fuse("a", "b", "c")), ids), want, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="not attached"):
        st.load(tiny_llama(), tmp_path / "f")


def test_fuse_inside_a_stack_and_unfreezing_the_children(ids):
    model = fused_model()
    model.use(st.Stack("a", st.Fuse("b", "c", fusion="f")), train=["f", "b"])
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, _ in model.trainable_parameters()}
    assert trainable == {"f", "b"}
    with pytest.raises(AdapterNameError, match="not in the active setup"):
        model.use(st.Fuse("b", "c", fusion="f"), train=["a"])
    assert torch.isfinite(output(model, ids)).all()


# -- call arguments ---------------------------------------------------------------------------------
@dataclass
class TaskShiftConfig(st.MethodConfig):
    """Adds task_id * scale to the output (a test method)."""

    scale: float = 0.1


class _TaskShift(LayerAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x, base_out, base):
        task_ids = self.call_argument("task_ids")
        self.seen.append(None if task_ids is None else task_ids.tolist())
        if task_ids is None:
            return base_out
        return base_out + 0.1 * task_ids.to(base_out.dtype).view(-1, *[1] * (base_out.dim() - 1))


@register
class _TaskShiftMethod(Method):
    name = "test_task_shift"
    config = TaskShiftConfig
    call_arguments: ClassVar[tuple[str, ...]] = ("task_ids",)

    def build_layer(self, base: nn.Module, cfg, init=True, shared=None):
        return _TaskShift()


def test_call_arguments_reach_adapters_and_not_the_base(ids):
    model = st.attach(tiny_llama(), TaskShiftConfig(targets=["q_proj"]), name="t")
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="l")
    adapter = a_layer(model).adapters["t"]
    plain = output(model, ids)
    shifted = output(model, ids, task_ids=torch.tensor([0, 1, 2]))  # the base model would refuse task_ids
    assert adapter.seen[-1] == [0, 1, 2] and not torch.allclose(plain, shifted)
    torch.testing.assert_close(plain[:1], shifted[:1])  # task 0: no shift
    output(model, ids, task_ids=torch.tensor([0, 1, 2]), adapter_names=["l", "t", "t"])
    assert adapter.seen[-1] == [1, 2]  # rows routed to this adapter see their own task ids
    output(model, ids)
    assert adapter.seen[-1] is None  # nothing leaks into the next call
    model.generate(input_ids=ids[:, :4], task_ids=torch.tensor([0, 1, 2]), max_new_tokens=2, do_sample=False,
                   pad_token_id=0)
    assert adapter.seen[-1] == [0, 1, 2]


def test_call_arguments_reach_the_parts_of_a_hybrid(ids):
    cfg = st.HybridConfig(parts=[TaskShiftConfig(targets=["q_proj"]), st.LoraConfig(r=2, targets=["v_proj"])])
    model = st.attach(tiny_llama(), cfg)
    plain, shifted = output(model, ids), output(model, ids, task_ids=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(plain[:1], shifted[:1])
    assert not torch.allclose(plain[1:], shifted[1:])
