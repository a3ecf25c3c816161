"""SPoT: a target prompt initialised from a source prompt, and prompt similarity as a transferability score."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import slimtune as st
from slimtune.errors import AdapterNameError, ConfigError
from slimtune.multitask.prompt_transfer import prompt_of, prompt_similarity, rank_sources, spot_init
from tests.conftest import VOCAB, fit, output, tiny_llama

P, D = 4, 64


def trained_prompt(tmp_path, name="source", fmt="slimtune", seed=3):
    model = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P))
    with torch.no_grad():
        model.inputs["default"].embedding.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    model.save(tmp_path / name, format=fmt)
    return model, tmp_path / name


@pytest.mark.parametrize("fmt", ["slimtune", "peft"])
def test_init_from_a_saved_prompt_copies_it(fmt, ids, tmp_path):
    source, path = trained_prompt(tmp_path, fmt=fmt)
    cfg = st.PromptTuningConfig(num_virtual_tokens=P, init="prompt", init_from=str(path))
    target = st.attach(tiny_llama(), cfg)
    torch.testing.assert_close(target.inputs["default"].embedding, source.inputs["default"].embedding,
                               atol=0, rtol=0)
    torch.testing.assert_close(output(target, ids), output(source, ids), atol=0, rtol=0)
    target.save(tmp_path / "target")
    shutil.rmtree(path)  # loading never reads init_from again
    loaded = st.load(tiny_llama(), tmp_path / "target")
    assert loaded.configs["default"].init == "prompt"
    torch.testing.assert_close(output(loaded, ids), output(source, ids), atol=0, rtol=0)


def test_init_from_p_tuning_and_safetensors(tmp_path):
    ptuned = st.attach(tiny_llama(), st.PTuningConfig(num_virtual_tokens=P))
    ptuned.save(tmp_path / "pt")
    tokens = ptuned.inputs["default"].export_tensors()["embedding"]
    target = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P, init="prompt",
                                                           init_from=str(tmp_path / "pt")))
    torch.testing.assert_close(target.inputs["default"].embedding.detach(), tokens)
    raw = torch.randn(P, D)
    save_file({"x": raw}, str(tmp_path / "p.safetensors"))
    spot = spot_init(tiny_llama(), tmp_path / "p.safetensors")  # p read from the source
    assert spot.configs["default"].num_virtual_tokens == P
    torch.testing.assert_close(spot.inputs["default"].embedding.detach(), raw)


def test_spot_init_from_an_attached_adapter(ids):
    model = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P), name="source")
    spot_init(model, "source", name="target")
    torch.testing.assert_close(model.inputs["target"].embedding, model.inputs["source"].embedding)
    assert model.inputs["target"].embedding is not model.inputs["source"].embedding
    torch.testing.assert_close(output(model.use("target"), ids), output(model.use("source"), ids), atol=0, rtol=0)


def test_transfer_starts_where_the_source_ended():
    """SPoT's point: on a related task, a prompt started from the source starts at a lower loss."""
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (1, 12)).repeat(4, 1)
    source = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P), name="source")
    trained = fit(source, data, steps=15, lr=0.1)
    spot_init(source, "source", name="spot")
    source.add(st.PromptTuningConfig(num_virtual_tokens=P), name="fresh")
    with torch.no_grad():
        spot, fresh = (source.use(n)(input_ids=data, labels=data).loss.item() for n in ("spot", "fresh"))
    assert spot == pytest.approx(trained[-1], abs=0.05) and spot < fresh - 0.15, (spot, fresh, trained[::5])


def reference_similarity(a, b, how):
    if how == "average":
        ma, mb = a.mean(0), b.mean(0)
        return float((ma @ mb) / (ma.norm() * mb.norm()))
    return sum(float((x @ y) / (x.norm() * y.norm())) for x in a for y in b) / (len(a) * len(b))


@pytest.mark.parametrize("how", ["average", "per_token"])
def test_similarity_equals_the_paper_formulas(how, tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(P, D, generator=g), torch.randn(P + 2, D, generator=g)  # lengths may differ
    assert prompt_similarity(a, b, how=how) == pytest.approx(reference_similarity(a, b, how), abs=1e-6)
    assert prompt_similarity(a, b, how=how) == pytest.approx(prompt_similarity(b, a, how=how), abs=1e-6)
    assert prompt_similarity(a, a[torch.randperm(P)] * 3.0, how=how) == pytest.approx(
        prompt_similarity(a, a, how=how), abs=1e-6)  # no token order, no scale
    if how == "average":
        assert prompt_similarity(a, a, how=how) == pytest.approx(1.0, abs=1e-6)
    _, path = trained_prompt(tmp_path)  # files and attached adapters read the same prompt
    model = st.load(tiny_llama(), path, name="attached")
    assert prompt_similarity(path, "attached", model, how=how) == pytest.approx(
        prompt_similarity(path, path, how=how), abs=1e-6)
    assert prompt_similarity(path, a, how=how) == pytest.approx(
        reference_similarity(prompt_of(path), a, how), abs=1e-6)


def test_rank_sources_puts_the_related_prompt_first(tmp_path):
    g = torch.Generator().manual_seed(2)
    offset = torch.randn(D, generator=g) * 0.5  # a shared direction the first two tasks' prompts have
    near, far, other = (torch.randn(P, D, generator=g) + s * offset for s in (1.0, 0.0, -1.0))
    target = near + 0.3 * torch.randn(P, D, generator=g) + offset * 0.5
    ranked = rank_sources(target, {"near": near, "far": far, "other": other})
    assert [name for name, _ in ranked] == ["near", "far", "other"]
    assert ranked == sorted(ranked, key=lambda kv: -kv[1])
    save_file({"prompt_embeddings": near}, str(tmp_path / "near.safetensors"))
    ranked = rank_sources(target, [far, str(tmp_path / "near.safetensors")], how="per_token")
    assert ranked[0][0].endswith("near.safetensors") and ranked[1][0] == "#0"


def test_errors_name_the_problem(tmp_path):
    _, path = trained_prompt(tmp_path)
    with pytest.raises(ConfigError, match="init_from=None"):
        st.PromptTuningConfig(init="prompt")
    with pytest.raises(ConfigError, match="holds a prompt of 4 tokens; expected num_virtual_tokens=6"):
        st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=6, init="prompt", init_from=str(path)))
    st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"])).save(tmp_path / "lora")
    with pytest.raises(ConfigError, match="'lora' adapter; expected a prompt-tuning or P-tuning"):
        prompt_of(tmp_path / "lora")
    save_file({"prompt_embeddings": torch.randn(P, 32)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ConfigError, match="another base"):
        spot_init(tiny_llama(), tmp_path / "narrow.safetensors")
    with pytest.raises(ConfigError, match="token size 64 and 32"):
        prompt_similarity(path, tmp_path / "narrow.safetensors")
    with pytest.raises(ConfigError, match="how='cosine'"):
        prompt_similarity(path, path, how="cosine")
    with pytest.raises(AdapterNameError, match="'nope' is neither"):
        prompt_similarity(path, "nope")


def test_peft_export_of_a_transferred_prompt(ids, tmp_path):
    peft = pytest.importorskip("peft")
    _, path = trained_prompt(tmp_path)
    model = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=P, init="prompt", init_from=str(path)))
    model.save(tmp_path / "out", format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, P:]
    torch.testing.assert_close(theirs, output(model, ids), atol=1e-5, rtol=1e-5)
    assert F.cosine_similarity(pm.prompt_encoder["default"].embedding.weight.flatten(),
                               model.inputs["default"].embedding.flatten(), dim=0) > 0.9999
