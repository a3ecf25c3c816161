"""Prompt tuning, the input-method exemplar: forward, padding, generate(), files, PEFT both ways."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.errors import ConfigError
from tests.conftest import MODELS, VOCAB, fit, output, tiny_gpt2, tiny_llama

P = 4
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def attach(make, **kw):
    model = st.attach(make(), st.PromptTuningConfig(num_virtual_tokens=P, **kw))
    with torch.no_grad():
        model.inputs["default"].embedding.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("arch", MODELS)
def test_disabled_is_base_and_prompt_changes_output(arch, ids):
    ref = output(MODELS[arch](), ids)
    model = attach(MODELS[arch])
    out = output(model, ids)
    assert out.shape == ref.shape  # logits line up with input_ids: the virtual positions are dropped
    assert not torch.allclose(out, ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_param_count_and_gradients_reach_only_the_prompt(arch, ids):
    model = attach(MODELS[arch])
    d = model.model.get_input_embeddings().embedding_dim
    assert [n for n, _ in model.trainable_parameters()] == ["inputs.default.embedding"]
    assert sum(p.numel() for _, p in model.trainable_parameters()) == P * d
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name == "inputs.default.embedding"), name


@pytest.mark.parametrize("arch", MODELS)
def test_right_padded_rows_equal_unpadded(arch):
    torch.manual_seed(0)
    long, short = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (1, 6))
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    model = attach(MODELS[arch])
    batch = output(model, padded, attention_mask=mask)
    alone = output(model, short)
    if arch == "bert":
        torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(batch[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids(ids):
    model = attach(tiny_llama)
    embeds = model.model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, output(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_continues_what_forward_predicts(arch, ids):
    model = attach(DECODERS[arch])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 5) and torch.equal(out[:, :ids.shape[1]], ids)
    logits = output(model, out)  # one forward over prompt + generated text, no cache
    n = ids.shape[1]
    assert torch.equal(logits[:, n - 1:-1].argmax(-1), out[:, n:])


def test_save_load_exact_and_not_mergeable(ids, tmp_path):
    model = attach(tiny_llama)
    ref = output(model, ids)
    model.save(tmp_path / "a")
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), ref, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    with pytest.raises(NotImplementedError, match="one adapter per row"):
        model(input_ids=ids, adapter_names=["default", None, "default"])


def test_detach_gives_back_the_base(ids):
    base = tiny_gpt2()
    ref = output(base, ids)
    model = attach(lambda: base)
    plain = model.detach()
    torch.testing.assert_close(output(plain, ids), ref, atol=0, rtol=0)


def test_init_from_vocabulary_and_from_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "topic"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    base = tiny_llama()
    words = base.get_input_embeddings().weight.detach().clone()
    cfg = st.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="classify the topic",
                                tokenizer=str(tmp_path / "tok"))
    prompt = st.attach(base, cfg).inputs["default"].embedding.detach()
    torch.testing.assert_close(prompt, words[[1, 2, 3, 1, 2]])  # repeated to fill p, as HF PEFT
    sampled = st.attach(tiny_llama(), st.PromptTuningConfig(num_virtual_tokens=6)).inputs["default"].embedding
    assert all((words == row).all(1).any() for row in sampled.detach())  # every row is a vocabulary embedding


@pytest.mark.parametrize("bad,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
    (dict(init="vocab"), "init='vocab'"),
    (dict(init="text"), "init_text=None"),
    (dict(targets=["q_proj"]), "targets"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        st.PromptTuningConfig(**bad)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = attach(tiny_llama)
    data = torch.randint(0, VOCAB, (1, 12)).repeat(4, 1)  # one sequence the prompt can make likely
    losses = fit(model, data, steps=40, lr=0.1)
    assert losses[-1] < losses[0] - 0.15, losses[::5]  # a frozen random base limits how far a prompt moves it


# -- HF PEFT interop ----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(make, task_type: str):
    pm = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    return pm.eval()


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_load_peft_prompt_tuning_gives_peft_outputs(arch, task, ids, tmp_path):
    pm = _peft_model(MODELS[arch], task)
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    expected = expected[:, P:] if task == "CAUSAL_LM" else expected
    if task == "SEQ_CLS":  # PEFT trains a copy of the head for sequence classification; ours must load it
        with torch.no_grad():
            expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    ours = st.load(MODELS[arch](), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_format_export_loads_in_peft(arch, ids, tmp_path):
    saved = ["classifier"] if arch == "bert" else None
    model = attach(MODELS[arch], modules_to_save=saved)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    pm = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path).eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    theirs = theirs[:, P:] if arch == "llama" else theirs
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_loss_with_labels_equals_peft(ids, tmp_path):
    """Labels get -100 on the virtual positions; the last virtual token predicts the first real one."""
    pm = _peft_model(tiny_llama, "CAUSAL_LM")
    with torch.no_grad():
        expected = pm(input_ids=ids, labels=ids).loss
    pm.save_pretrained(tmp_path)
    ours = st.load(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, expected, atol=1e-5, rtol=1e-5)
