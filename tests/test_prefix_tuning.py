"""Prefix tuning / P-tuning v2: per-layer key/value prefixes through the transformers cache API."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.methods.prefix_tuning import PrefixTuningConfig
from tests.conftest import MODELS, VOCAB, fit, output, tiny_gpt2, tiny_llama

P = 4
L = 2  # layers of the tiny models
KV = {"llama": 2 * 16, "gpt2": 64, "bert": 64}  # D = key/value heads x head_dim (Llama: 2 of 4 heads, GQA)
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def attach(make, **kw) -> st.TunedModel:
    return st.attach(make(), PrefixTuningConfig(num_virtual_tokens=P, **kw))


@pytest.mark.parametrize("arch", MODELS)
def test_disabled_is_base_and_prefix_changes_output(arch, ids):
    ref = output(MODELS[arch](), ids)
    model = attach(MODELS[arch])
    out = output(model, ids)
    assert out.shape == ref.shape and not torch.allclose(out, ref)  # no token added: logits line up with ids
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    torch.testing.assert_close(output(model.model, ids), ref, atol=0, rtol=0)  # outside a TunedModel call: base


@pytest.mark.parametrize("arch", MODELS)
def test_param_count_and_gradients_reach_only_the_prefix(arch, ids):
    model = attach(MODELS[arch])
    assert [n for n, _ in model.trainable_parameters()] == ["inputs.default.embedding"]
    assert model.adapter_parameter_count("default") == 2 * L * P * KV[arch]
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name == "inputs.default.embedding"), name


def test_projection_params_and_saved_as_computed_prefix(ids, tmp_path):
    h, D = 8, KV["llama"]
    model = attach(tiny_llama, prefix_projection=True, encoder_hidden_size=h)
    mlp = D * h + h + h * 2 * L * D + 2 * L * D
    assert sum(p.numel() for _, p in model.trainable_parameters()) == P * D + mlp
    assert model.adapter_parameter_count("default") == 2 * L * P * D
    ref = output(model, ids)
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["prefix_projection"] is False
    loaded = st.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, ids), ref, atol=0, rtol=0)


def test_zero_init():
    assert attach(tiny_llama, init="zero").inputs["default"].embedding.abs().sum() == 0
    projected = attach(tiny_llama, init="zero", prefix_projection=True).inputs["default"]
    assert projected.prefix().abs().sum() == 0 and projected.embedding.abs().sum() > 0


@pytest.mark.parametrize("arch", MODELS)
def test_right_padded_rows_equal_unpadded(arch):
    torch.manual_seed(0)
    long, short = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (1, 6))
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    model = attach(MODELS[arch])
    batch, alone = output(model, padded, attention_mask=mask), output(model, short)
    got = batch[1] if arch == "bert" else batch[1, :6]
    torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids(ids):
    model = attach(tiny_llama)
    embeds = model.model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, output(model, ids), atol=1e-5, rtol=1e-5)


def test_continuing_from_a_returned_cache_equals_one_call(ids):
    model = attach(tiny_llama)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :6], use_cache=True)
        rest = model(input_ids=ids[:, 6:], attention_mask=torch.ones_like(ids), cache=first.cache).logits
        torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=1e-5)
        with pytest.raises(NotImplementedError, match="did not start"):
            with model.disabled():
                foreign = model(input_ids=ids[:, :6], use_cache=True).cache
            model(input_ids=ids[:, 6:], cache=foreign)


def test_refusals(ids):
    model = attach(tiny_llama)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    with pytest.raises(NotImplementedError, match="one adapter per row"):
        model(input_ids=ids, adapter_names=["default", None, "default"])
    model.model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(NotImplementedError, match="activation checkpointing"):
        model(input_ids=ids)
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        st.attach(_tiny_t5(), PrefixTuningConfig(num_virtual_tokens=2))


def _tiny_t5():
    import transformers

    cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=VOCAB)
    return transformers.T5ForConditionalGeneration(cfg)


def test_slimtune_methods_row(capsys):
    main(["methods"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("prefix_tuning "))
    assert " no " in row and "PREFIX_TUNING" in row


@pytest.mark.parametrize("bad,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
    (dict(init="normal"), "init='normal'"),
    (dict(encoder_hidden_size=-1), "encoder_hidden_size=-1"),
    (dict(prefix_projection="yes"), "prefix_projection='yes'"),
    (dict(targets=["q_proj"]), "targets"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        PrefixTuningConfig(**bad)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = attach(tiny_llama)
    data = torch.randint(0, VOCAB, (1, 8)).repeat(2, 1)
    losses = fit(model, data, steps=10, lr=0.1)
    assert losses[-1] < losses[0] - 0.25, losses


# -- HF PEFT interop ----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(make, task: str, **kw):
    return peft.get_peft_model(make(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, **kw)).eval()


def _peft_logits(pm, ids: torch.Tensor, **kw) -> torch.Tensor:
    """PEFT's forward; for BERT (whose forward PEFT 0.21 no longer recognises as taking a cache on
    transformers 5: it looks for `past_key_values`) what that forward does: PEFT's own prefix cache and mask."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if pm.peft_config["default"].task_type != "SEQ_CLS":
            return pm(input_ids=ids, attention_mask=mask, **kw).logits
        mask = torch.cat([torch.ones(ids.shape[0], P, dtype=torch.long), mask], 1)
        return pm.base_model(input_ids=ids, attention_mask=mask, past_key_values=pm.get_prompt(ids.shape[0])).logits


@pytest.mark.parametrize("arch,task,kw", [("llama", "CAUSAL_LM", {}), ("gpt2", "CAUSAL_LM", {}),
                                          ("llama", "CAUSAL_LM", {"prefix_projection": True}),
                                          ("bert", "SEQ_CLS", {})])
def test_load_peft_prefix_tuning_gives_peft_outputs(arch, task, kw, ids, tmp_path):
    pm = _peft_model(MODELS[arch], task, **kw)
    expected = _peft_logits(pm, ids)
    pm.save_pretrained(tmp_path)
    ours = st.load(MODELS[arch](), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_format_export_loads_in_peft(arch, ids, tmp_path):
    model = attach(MODELS[arch], prefix_projection=True, modules_to_save=["classifier"] if arch == "bert" else None)
    ours = output(model, ids)
    model.save(tmp_path / "ours", format="peft")
    pm = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_logits(pm, ids), ours, atol=1e-5, rtol=1e-5)
    _peft_model(tiny_llama, "CAUSAL_LM").save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(written) == set(theirs)  # exactly PEFT's fields
    if arch == "llama":
        assert (written["token_dim"], written["num_attention_heads"]) == (theirs["token_dim"], 2)  # KV heads


def test_labels_and_position_ids_equal_peft(ids, tmp_path):
    pm = _peft_model(tiny_llama, "CAUSAL_LM")
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        loss = pm(input_ids=ids, labels=ids).loss
    expected = _peft_logits(pm, ids, position_ids=positions)  # PEFT shifts given positions by p
    pm.save_pretrained(tmp_path)
    ours = st.load(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output(ours, ids, position_ids=positions), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_equals_greedy_decoding_through_peft(arch, ids, tmp_path):
    """PEFT 0.21's own generate() loses the prefix on transformers 5 (it hands it over as `past_key_values`
    while generate passes `cache`), so the reference is greedy decoding through PEFT's forward."""
    pm = _peft_model(DECODERS[arch], "CAUSAL_LM")
    pm.save_pretrained(tmp_path)
    ours = st.load(DECODERS[arch](), tmp_path)
    got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    seq = ids
    for _ in range(4):
        seq = torch.cat([seq, _peft_logits(pm, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
