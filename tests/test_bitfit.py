"""BitFit, the selective exemplar, and the selective engine under it (masks, sparse files, optimizer state)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import slimtune as st
from slimtune.config import _CONFIG_CLASSES, MethodConfig
from slimtune.errors import TargetNotFoundError
from slimtune.io import WEIGHTS_NAME, read_safetensors
from slimtune.methods.base import METHODS, Method, Selection, register
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_gpt2, tiny_llama

BIASED = {"gpt2": tiny_gpt2, "bert": tiny_bert}


def bias_sizes(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if n.endswith(".bias")}


def train(model, ids, steps: int = 5, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids if ids.dim() == 2 and "LMHead" in type(model.model).__name__ else None)
        loss = out.loss if out.loss is not None else out.logits.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


@pytest.mark.parametrize("arch", BIASED)
def test_identity_count_and_gradients(arch, ids):
    base = BIASED[arch]()
    ref, n_bias = output(base, ids), sum(bias_sizes(base).values())
    model = st.attach(base, st.BitFitConfig())
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == n_bias
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("selections.default."), name


@pytest.mark.parametrize("arch", BIASED)
def test_training_leaves_every_untuned_entry_bitwise_and_saves_only_biases(arch, ids, tmp_path):
    base = BIASED[arch]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ref = output(base, ids)
    model = st.attach(base, st.BitFitConfig())
    train(model, ids)
    adapted = output(model, ids)
    assert not torch.allclose(adapted, ref)
    for k, v in model.model.state_dict().items():  # the base tensors themselves never change
        assert torch.equal(v, before[k]), k
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.save(tmp_path / "a")
    saved = read_safetensors(tmp_path / "a" / WEIGHTS_NAME)
    assert {k.removeprefix("base_model.model.") for k in saved} == set(bias_sizes(BIASED[arch]()))
    loaded = st.load(BIASED[arch](), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("arch", BIASED)
def test_merge_unmerge_and_detach(arch, ids):
    base = BIASED[arch]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = st.attach(base, st.BitFitConfig())
    train(model, ids, steps=2)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=0, rtol=0)
    model.unmerge()
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit for bit
    plain = model.detach(merge=True)
    assert type(plain.get_submodule(next(iter(bias_sizes(plain))).rsplit(".", 1)[0])).__module__ != __name__
    torch.testing.assert_close(output(plain, ids), adapted, atol=0, rtol=0)


def test_detach_without_merge_gives_the_base_back(ids):
    base = tiny_gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    classes = {n: type(m) for n, m in base.named_modules()}
    model = st.attach(base, st.BitFitConfig())
    train(model, ids, steps=2)
    plain = model.detach()
    assert {n: type(m) for n, m in plain.named_modules()} == classes  # no swapped classes left behind
    for k, v in plain.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_subset_by_name_pattern_as_the_paper_ablation():
    model = st.attach(tiny_bert(), st.BitFitConfig(targets=["query", "intermediate.dense"], layers=[1]))
    keys = sorted(k.removeprefix("base_model.model.") for k in model.adapter_state_dict())
    assert keys == ["bert.encoder.layer.1.attention.self.query.bias", "bert.encoder.layer.1.intermediate.dense.bias"]


def test_model_without_biases_is_a_clear_error():
    with pytest.raises(TargetNotFoundError, match="no bias"):
        st.attach(tiny_llama(), st.BitFitConfig())
    with pytest.raises(TargetNotFoundError, match="modules with a bias here"):
        st.attach(tiny_gpt2(), st.BitFitConfig(targets=["q_proj"]))


def test_bitfit_beside_lora_and_activation_checkpointing(ids):
    """Selected tensors are read through the module at every access: fused LoRA kernels and
    activation-checkpoint recomputation see the tuned biases too."""
    grads = []
    for checkpointing in (False, True):
        model = st.attach(tiny_gpt2(), st.BitFitConfig())
        model.add(st.LoraConfig(r=2, targets=["c_attn"]), name="lora")
        model.use(["default", "lora"])
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_lora_bias_option_switching_adapters_leaves_no_stray_trainable_bias():
    """Regression: use() from a bias="all" adapter to one without left every base bias trainable."""
    model = st.attach(tiny_gpt2(), st.LoraConfig(r=2, targets=["c_attn"], bias="all"), name="with_bias")
    model.add(st.LoraConfig(r=2, targets=["c_attn"]), name="plain")
    model.use("plain")
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all(".adapters.plain." in n for n in names), names
    model.use("with_bias")
    assert sum(n.startswith("selections.with_bias.") for n, _ in model.trainable_parameters()) == len(
        bias_sizes(tiny_gpt2()))


# -- sparse selections: a test-only method that tunes a fixed random 5% of two weight matrices ----------
@dataclass
class SparseConfig(MethodConfig):
    density: float = 0.05


class SparseMethod(Method):
    name, config, shape, category, mergeable = "test_sparse", SparseConfig, "selective", "selective", True
    TENSORS = ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight")

    def select(self, model, cfg, targets, init=True, data=None):
        if not init:
            return [Selection(n, sparse=True) for n in self.TENSORS]
        params = dict(model.named_parameters())
        g = torch.Generator().manual_seed(0)
        return [Selection(n, torch.rand(params[n].shape, generator=g) < cfg.density) for n in self.TENSORS]


@pytest.fixture
def sparse_method():
    register(SparseMethod)
    yield SparseConfig
    METHODS.pop("test_sparse")
    _CONFIG_CLASSES.pop("test_sparse")


def test_sparse_entries_train_alone_optimizer_state_is_k_sized_and_files_hold_index_and_values(
        sparse_method, ids, tmp_path):
    base = tiny_gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = st.attach(base, sparse_method())
    k = sum(p.numel() for _, p in model.trainable_parameters())
    total = sum(before[n].numel() for n in SparseMethod.TENSORS)
    assert 0.03 * total < k < 0.07 * total
    opt = train(model, ids, weight_decay=0.5)  # strong decay: it must reach the tuned entries only
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == k
    adapted = output(model, ids)
    for name in SparseMethod.TENSORS:
        W0 = before[name]
        W = model.model.get_submodule(name.rsplit(".", 1)[0]).weight  # what the module computes with
        changed = W != W0
        assert changed.sum() > 0 and torch.equal(W[~changed], W0[~changed])
    for key, v in model.model.state_dict().items():
        assert torch.equal(v, before[key]), key
    model.save(tmp_path / "a")
    saved = read_safetensors(tmp_path / "a" / WEIGHTS_NAME)
    assert sorted(saved) == sorted(f"base_model.model.{n}.sparse_{part}" for n in SparseMethod.TENSORS
                                   for part in ("index", "values"))
    assert sum(v.numel() for key, v in saved.items() if key.endswith("values")) == k
    loaded = st.load(tiny_gpt2(), tmp_path / "a")  # the mask comes from the file
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
    loaded.merge()
    torch.testing.assert_close(output(loaded, ids), adapted, atol=1e-6, rtol=1e-6)
    loaded.unmerge()
    assert all(torch.equal(v, before[key]) for key, v in loaded.model.state_dict().items())


def test_two_sparse_adapters_add_their_deltas(sparse_method, ids):
    model = st.attach(tiny_gpt2(), sparse_method(), name="a")
    model.add(sparse_method(density=0.1), name="b")
    for name in ("a", "b"):
        model.use(name)
        train(model, ids, steps=2)
    W0 = model.model.state_dict()[SparseMethod.TENSORS[0]].clone()
    owner = model.model.get_submodule(SparseMethod.TENSORS[0].rsplit(".", 1)[0])
    deltas = []
    for name in ("a", "b"):
        model.use(name)
        deltas.append(owner.weight.detach() - W0)
    model.use(["a", "b"])
    torch.testing.assert_close(owner.weight.detach(), W0 + deltas[0] + deltas[1], atol=1e-6, rtol=1e-6)
    both = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), both, atol=1e-5, rtol=1e-5)


def test_trains_and_lowers_the_loss():
    torch.manual_seed(0)
    model = st.attach(tiny_gpt2(), st.BitFitConfig())
    data = torch.randint(0, VOCAB, (4, 12))
    losses = fit(model, data, steps=30, lr=3e-2)
    assert losses[-1] < losses[0] - 0.15, losses[::5]  # biases alone move a frozen random model a little


def test_a_head_trained_in_full_is_not_also_selected():
    model = st.attach(tiny_bert(), st.BitFitConfig(modules_to_save=["classifier"]))
    keys = list(model.adapter_state_dict())
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert not any("classifier" in k and ("original_module" in k or "sparse" in k) for k in keys)
    assert sum(k.endswith("classifier.bias") for k in keys) == 1
