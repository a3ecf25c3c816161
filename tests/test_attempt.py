"""ATTEMPT: the instance-wise mixture against a hand-written reference, pooling, files, gradients, training."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import slimtune as st
import slimtune.methods.attempt  # noqa: F401  (registers the method)
from slimtune.errors import ConfigError
from slimtune.methods.attempt import AttemptConfig, _pooled_positions, add_attempt
from tests.conftest import VOCAB, fit, output, tiny_bert, tiny_gpt2, tiny_llama

P, D, K = 3, 64, 8


@pytest.fixture
def sources(tmp_path):
    """Two random (P, D) source prompts, saved as .safetensors files."""
    g = torch.Generator().manual_seed(7)
    paths = []
    for i in range(2):
        path = tmp_path / f"source{i}.safetensors"
        save_file({"prompt_embeddings": torch.randn(P, D, generator=g) * 0.5}, str(path))
        paths.append(str(path))
    return paths


def attach(make, sources, **kw):
    model = st.attach(make(), AttemptConfig(sources=sources, attn_hidden=K, **kw))
    with torch.no_grad():  # off the init: LayerNorm (1, 0) and a target equal to source 0 hide mistakes
        for i, (_, p) in enumerate(model.trainable_parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    return model


def reference_prompt(adapter, words: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """ATTEMPT's instance prompt written out: words (b, n, d) the input's token embeddings, pool (b, n) bool."""
    target, srcs = adapter.embedding.detach(), adapter.sources
    prompts = list(srcs) + [target]
    out = []
    for b in range(words.shape[0]):
        x = torch.stack([words[b, i] for i in range(words.shape[1]) if pool[b, i]]).max(0).values
        h = adapter.attn_up.weight @ F.silu(adapter.attn_down.weight @ x)
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + adapter.attn_norm.eps)
        h = h * adapter.attn_norm.weight + adapter.attn_norm.bias
        T = D * math.e
        scores = torch.stack([(pj.max(0).values * h).sum() / T for pj in prompts])
        a = torch.exp(scores) / torch.exp(scores).sum()
        out.append(target + sum(a[j] * prompts[j] for j in range(len(prompts))))
    return torch.stack(out).detach()


def run_reference(base, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    words = base.get_input_embeddings()(ids)
    mask = torch.ones_like(ids) if mask is None else mask
    full = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        return base(inputs_embeds=torch.cat([prompt, words], 1), attention_mask=full).logits[:, P:]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forward_equals_the_formula_written_out(make, sources, ids):
    model = attach(make, sources)
    adapter = model.inputs["default"]
    words = model.model.get_input_embeddings()(ids).detach()
    prompt = reference_prompt(adapter, words, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(output(model, ids), run_reference(make(), prompt, ids), atol=1e-5, rtol=1e-5)
    a = adapter.mixture(words.max(1).values)
    assert a.shape == (3, 3) and not torch.allclose(a[0], a[1])  # the weights depend on the instance
    ref = output(make(), ids)
    assert not torch.allclose(output(model, ids), ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_pooling_leaves_out_padding_and_labelled_positions(sources):
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.clone()
    labels[0, :4] = -100  # row 0 reads 4 tokens and predicts the rest; row 1 is labelled everywhere
    pool = _pooled_positions({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert pool.tolist() == [[True] * 4 + [False] * 3, [True] * 5 + [False] * 2]
    model = attach(tiny_llama, sources)
    adapter = model.inputs["default"]
    words = model.model.get_input_embeddings()(ids).detach()
    prompt = reference_prompt(adapter, words, pool)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(ours, run_reference(tiny_llama(), prompt, ids, mask), atol=1e-5, rtol=1e-5)
    alone = output(model, ids[1:, :5])  # a padded row gives what it gives alone
    torch.testing.assert_close(output(model, ids, attention_mask=mask)[1, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_param_count_gradients_and_frozen_sources(sources, ids):
    model = attach(tiny_llama, sources)
    names = {n for n, _ in model.trainable_parameters()}
    assert names == {f"inputs.default.{n}" for n in ("embedding", "attn_down.weight", "attn_up.weight",
                                                     "attn_norm.weight", "attn_norm.bias")}
    assert sum(p.numel() for _, p in model.trainable_parameters()) == P * D + 2 * D * K + 2 * D
    frozen = model.inputs["default"].sources.clone()
    torch.testing.assert_close(frozen[1], load_file(sources[1])["prompt_embeddings"])  # the files' prompts
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in names), name
    torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=1.0).step()
    assert torch.equal(model.inputs["default"].sources, frozen)


def test_init_copies_the_first_source_and_temperature(sources):
    model = st.attach(tiny_llama(), AttemptConfig(sources=sources))
    adapter = model.inputs["default"]
    assert torch.equal(adapter.embedding.detach(), adapter.sources[0])
    assert adapter.temperature == pytest.approx(D * math.e) and model.configs["default"].num_virtual_tokens == P
    custom = st.attach(tiny_llama(), AttemptConfig(sources=sources, temperature=5.0, init="random"))
    assert custom.inputs["default"].temperature == 5.0
    assert not torch.equal(custom.inputs["default"].embedding.detach(), custom.inputs["default"].sources[0])


def test_save_load_exact_and_self_contained(sources, ids, tmp_path):
    model = attach(tiny_bert, sources)
    ref = output(model, ids)
    model.save(tmp_path / "a")
    for path in sources:  # the adapter file holds the sources
        shutil.move(path, path + ".gone")
    loaded = st.load(tiny_bert(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), ref, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()


def test_generate_with_cache_equals_without_and_left_padding(sources):
    model = attach(tiny_llama, sources)
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(2, VOCAB, (1, 8), generator=g), torch.randint(2, VOCAB, (1, 5), generator=g)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=padded, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **kw))
    alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **kw)
    assert torch.equal(cached[1, 8:], alone[0, 5:])
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)  # generate() repeats rows
    assert torch.equal(model.generate(input_ids=long, **beams),
                       model.generate(input_ids=long, use_cache=False, **beams))


def test_sources_from_attached_prompt_adapters(ids):
    model = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P), name="sst2")
    model.add(st.PTuningConfig(num_virtual_tokens=P), name="mnli")
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="lora")
    add_attempt(model, AttemptConfig(sources=["sst2", "mnli"]), name="target")
    srcs = model.inputs["target"].sources
    torch.testing.assert_close(srcs[0], model.inputs["sst2"].embedding.detach())
    torch.testing.assert_close(srcs[1], model.inputs["mnli"].virtual_tokens().detach())
    assert model.configs["target"].sources == ["sst2", "mnli"]
    with pytest.raises(ConfigError, match="'lora' is a 'lora' adapter"):
        add_attempt(model, AttemptConfig(sources=["sst2", "lora"]), name="bad")
    with pytest.raises(ConfigError, match="add_attempt"):
        model.add(AttemptConfig(sources=["sst2"]), name="bad")  # names need add_attempt
    assert "bad" not in model.configs


def test_training_lowers_the_loss(sources):
    torch.manual_seed(0)
    model = st.attach(tiny_llama(), AttemptConfig(sources=sources, attn_hidden=K))
    data = torch.randint(0, VOCAB, (1, 12)).repeat(4, 1)  # one sequence the prompt can make likely
    losses = fit(model, data, steps=30, lr=0.1)
    assert losses[-1] < losses[0] - 0.15, losses[::5]


def test_config_errors_name_the_value(sources, tmp_path):
    for bad, match in [(dict(sources=[]), "sources=\\[\\]"), (dict(sources=sources, temperature=0), "temperature=0"),
                       (dict(sources=sources, init="text"), "init='text'"),
                       (dict(sources=sources, attn_hidden=0), "attn_hidden=0"),
                       (dict(sources=sources, targets=["q_proj"]), "targets")]:
        with pytest.raises(ConfigError, match=match):
            AttemptConfig(**bad)
    with pytest.raises(ConfigError, match="same length"):
        st.attach(tiny_llama(), AttemptConfig(sources=sources, num_virtual_tokens=5))
    save_file({"prompt_embeddings": torch.randn(P + 1, D)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(ConfigError, match="same length"):
        st.attach(tiny_llama(), AttemptConfig(sources=[*sources, str(tmp_path / "long.safetensors")]))
    save_file({"prompt_embeddings": torch.randn(P, 32)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ConfigError, match="another base"):
        st.attach(tiny_llama(), AttemptConfig(sources=[str(tmp_path / "narrow.safetensors")]))
    st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"])).save(tmp_path / "lora")
    with pytest.raises(ConfigError, match="'lora' adapter"):
        st.attach(tiny_llama(), AttemptConfig(sources=[str(tmp_path / "lora")]))
