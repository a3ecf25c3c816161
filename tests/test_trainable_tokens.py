"""Trainable tokens: only the chosen rows change, tied heads share them, exact merge/restore, vocabulary
growth saved with the tokenizer and resized on load, HF PEFT TRAINABLE_TOKENS both ways."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_fixtures import byte_tokenizer

import slimtune as st
from slimtune.errors import ConfigError
from slimtune.methods.trainable_tokens import TrainableTokensConfig, token_ids
from tests.conftest import fit, output, tiny_gpt2, tiny_llama

IDS = [3, 17, 250]


def tied_llama(**kw):
    return tiny_llama(tie_word_embeddings=True, **kw)


def perturb(model, scale: float = 0.5) -> None:
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * scale)


def layers(model):
    return model.view("default").layers


def test_identity_at_init_and_a_tied_head_shares_the_rows(ids):
    ref = output(tied_llama(), ids)
    model = st.attach(tied_llama(), TrainableTokensConfig(token_indices=IDS))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    found = layers(model)
    assert list(found) == ["model.embed_tokens", "lm_head"]
    assert found["model.embed_tokens"].delta is found["lm_head"].delta
    assert sum(p.numel() for _, p in model.trainable_parameters()) == len(IDS) * 64


def test_an_untied_head_is_left_alone_unless_named():
    model = st.attach(tiny_llama(), TrainableTokensConfig(token_indices=IDS))
    assert list(layers(model)) == ["model.embed_tokens"]
    both = st.attach(tiny_llama(), TrainableTokensConfig(token_indices=IDS, targets=["embed_tokens", "lm_head"]))
    assert layers(both)["model.embed_tokens"].delta is not layers(both)["lm_head"].delta
    assert sum(p.numel() for _, p in both.trainable_parameters()) == 2 * len(IDS) * 64


def test_only_the_chosen_rows_and_logit_columns_change():
    base = tied_llama()
    model = st.attach(tied_llama(), TrainableTokensConfig(token_indices=IDS))
    perturb(model)
    emb = model.model.model.embed_tokens
    every = torch.arange(1000)
    with torch.no_grad():
        changed = (emb(every) != base.model.embed_tokens(every)).any(-1)
        assert changed.nonzero().squeeze(1).tolist() == IDS
        h = torch.randn(2, 64)
        cols = (model.model.lm_head(h) != base.lm_head(h)).any(0)
        assert cols.nonzero().squeeze(1).tolist() == IDS


@pytest.mark.parametrize("make", [tied_llama, tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(make, ids):
    model = st.attach(make(), TrainableTokensConfig(token_indices=IDS))
    weight = model.model.get_input_embeddings().base_layer.weight
    before = weight.detach().clone()
    perturb(model)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(weight[IDS], layers(model)["model.embed_tokens" if make is not tiny_gpt2
                                                   else "transformer.wte"].delta)
    model.unmerge()
    assert torch.equal(weight, before)


def test_training_changes_only_the_chosen_rows_even_with_weight_decay(ids):
    model = st.attach(tied_llama(), TrainableTokensConfig(token_indices=IDS))
    data = torch.tensor([[3, 17, 250, 3, 17, 250, 5, 6]] * 2)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=0.1, weight_decay=0.5)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    plain = model.detach(merge=True)
    fresh = tied_llama()
    diff = (plain.model.embed_tokens.weight != fresh.model.embed_tokens.weight).any(-1)
    assert diff.nonzero().squeeze(1).tolist() == IDS
    others = [n for n in fresh.state_dict() if "embed_tokens" not in n and "lm_head" not in n]
    assert all(torch.equal(plain.state_dict()[n], fresh.state_dict()[n]) for n in others)


def test_save_then_load_is_exact_and_the_file_holds_k_rows(ids, tmp_path):
    model = st.attach(tied_llama(), TrainableTokensConfig(token_indices=IDS))
    perturb(model)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    loaded = st.load(tied_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_size < 4 * 2 * len(IDS) * 64 + 2000


def test_grown_vocabulary_trains_saves_with_the_tokenizer_and_loads_into_a_fresh_base(tmp_path):
    tokenizer = byte_tokenizer()
    base = tied_llama(vocab_size=len(tokenizer))
    tokenizer.add_tokens(["<tool>", "</tool>", "<think>"])
    base.resize_token_embeddings(len(tokenizer))
    new = token_ids(tokenizer, ["<tool>", "</tool>", "<think>"])
    assert new == [259, 260, 261]
    model = st.attach(base, TrainableTokensConfig(token_indices=new))
    data = torch.tensor([tokenizer("<tool>call</tool><think>")["input_ids"]] * 2)
    fit(model, data, steps=3, lr=0.1)
    model.eval()
    adapted = output(model, data)
    model.save(tmp_path / "a", tokenizer=tokenizer)
    assert (tmp_path / "a" / "tokenizer.json").exists()
    fresh = tied_llama(vocab_size=259)  # the original base: no manual resizing
    loaded = st.load(fresh, tmp_path / "a")
    assert fresh.get_input_embeddings().base_layer.num_embeddings == 262
    torch.testing.assert_close(output(loaded, data), adapted, atol=0, rtol=0)


def test_bad_configs_name_the_value():
    with pytest.raises(ConfigError, match=r"token_indices=None: expected a non-empty list"):
        TrainableTokensConfig()
    with pytest.raises(ConfigError, match="distinct"):
        TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ConfigError, match=r"outside the vocabulary of 1000 rows.*resize"):
        st.attach(tiny_llama(), TrainableTokensConfig(token_indices=[5, 1000]))
    with pytest.raises(ConfigError, match="not in the tokenizer"):
        token_ids(byte_tokenizer(), ["<never-added>"])


# -- HF PEFT interop ------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("make", [tied_llama, tiny_llama])
def test_peft_files_load_with_peft_outputs(make, ids, tmp_path):
    theirs = peft.get_peft_model(make(), peft.TrainableTokensConfig(token_indices=IDS, init_weights=False))
    theirs.save_pretrained(tmp_path / "p")
    ours = st.load(make(), tmp_path / "p")
    torch.testing.assert_close(output(ours, ids), output(theirs, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tied_llama, tiny_llama])
def test_our_peft_export_loads_in_peft_with_our_outputs(make, ids, tmp_path):
    ours = st.attach(make(), TrainableTokensConfig(token_indices=IDS))
    perturb(ours)
    ours.save(tmp_path / "e", format="peft")
    raw = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "TRAINABLE_TOKENS" and raw["token_indices"] == IDS
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "e")
    torch.testing.assert_close(output(theirs, ids), output(ours, ids), atol=1e-5, rtol=0)


def test_grown_vocabulary_peft_export_loads_in_peft_after_resizing_from_the_saved_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    base = tied_llama(vocab_size=len(tokenizer))
    tokenizer.add_tokens(["<tool>", "</tool>"])
    base.resize_token_embeddings(len(tokenizer))
    model = st.attach(base, TrainableTokensConfig(token_indices=token_ids(tokenizer, ["<tool>", "</tool>"])))
    perturb(model)
    data = torch.tensor([tokenizer("<tool>x</tool>")["input_ids"]])
    model.save(tmp_path / "e", format="peft", tokenizer=tokenizer)
    fresh = tied_llama(vocab_size=259)
    fresh.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tmp_path / "e")))  # what a PEFT user does
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "e")
    torch.testing.assert_close(output(theirs, data), output(model, data), atol=1e-5, rtol=0)
