"""LLaMA-Adapter: gated adaption prompts in the top attention layers (HF PEFT's ADAPTION_PROMPT)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import slimtune as st
from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.methods.adaption_prompt import AdaptionPromptConfig
from tests.conftest import VOCAB, assert_rows_match_alone, fit, output, tiny_bert, tiny_gpt2, tiny_llama

K = 3
D = 64


def tiny_mistral() -> transformers.MistralForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                     intermediate_size=128, vocab_size=VOCAB)
    return transformers.MistralForCausalLM(cfg).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mistral": tiny_mistral}


def attach(make, gate: float = 0.5, **kw) -> st.TunedModel:
    model = st.attach(make(), AdaptionPromptConfig(adapter_len=K, **kw))
    with torch.no_grad():
        for g in model.inputs["default"].gate:
            g.fill_(gate)
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_identity_at_init_and_disabled_is_base(arch, ids):
    ref = output(FAMILIES[arch](), ids)
    model = st.attach(FAMILIES[arch](), AdaptionPromptConfig(adapter_len=K))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)  # zero gates: exactly the base
    with torch.no_grad():
        model.inputs["default"].gate[-1].fill_(0.5)
    assert not torch.allclose(output(model, ids), ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("layers", [None, 1])
def test_param_count_and_gradients_reach_only_the_adapter(layers, ids):
    model = attach(tiny_llama, adapter_layers=layers)
    n = 2 if layers is None else layers
    assert sum(p.numel() for _, p in model.trainable_parameters()) == n * (K * D + 1)
    assert model.adapter_parameter_count("default") == n * (K * D + 1)
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    trainable = {name for name, _ in model.trainable_parameters()}
    assert all(name.startswith("inputs.default.") for name in trainable)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_right_padded_rows_equal_unpadded():
    torch.manual_seed(0)
    long, short = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (1, 6))
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    model = attach(tiny_llama)
    batch, alone = output(model, padded, attention_mask=mask), output(model, short)
    torch.testing.assert_close(batch[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_one_adapter_per_row(ids):
    model = attach(tiny_llama)
    model.add(AdaptionPromptConfig(adapter_len=2, adapter_layers=1), name="other")
    with torch.no_grad():
        model.inputs["other"].gate[0].fill_(-0.7)
    assert_rows_match_alone(model, ids, ["default", None, "other"])


def test_save_load_exact_and_not_mergeable(ids, tmp_path, capsys):
    model = attach(tiny_llama)
    ref = output(model, ids)
    model.save(tmp_path)
    loaded = st.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, ids), ref, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    main(["methods"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("adaption_prompt "))
    assert " no " in row and "ADAPTION_PROMPT" in row


def test_unsupported_models_are_refused():
    with pytest.raises(NotImplementedError, match="model_type='bert'.*supported: llama, mistral, gpt2"):
        st.attach(tiny_bert(), AdaptionPromptConfig())
    with pytest.raises(NotImplementedError, match="o_proj has a bias"):
        st.attach(tiny_llama(attention_bias=True), AdaptionPromptConfig())
    with pytest.raises(ConfigError, match="adapter_layers=3: LlamaForCausalLM has 2 attention layers"):
        st.attach(tiny_llama(), AdaptionPromptConfig(adapter_layers=3))


@pytest.mark.parametrize("bad,match", [
    (dict(adapter_len=0), "adapter_len=0"),
    (dict(adapter_layers=0), "adapter_layers=0"),
    (dict(targets="self_attn"), "targets='self_attn'"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        AdaptionPromptConfig(**bad)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = st.attach(tiny_llama(), AdaptionPromptConfig(adapter_len=4))
    data = torch.randint(0, VOCAB, (1, 8)).repeat(2, 1)
    losses = fit(model, data, steps=10, lr=0.1)
    assert losses[-1] < losses[0] - 0.1, losses


# -- HF PEFT interop ----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(make, layers: int = 2):
    pm = peft.get_peft_model(make(), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=K,
                                                               adapter_layers=layers))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.6)
    return pm.eval()


@pytest.mark.parametrize("arch", FAMILIES)
def test_load_peft_adaption_prompt_gives_peft_outputs_and_generation(arch, ids, tmp_path):
    pm = _peft_model(FAMILIES[arch], layers=1)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    ours = st.load(FAMILIES[arch](), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, atol=1e-5, rtol=1e-5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(input_ids=ids, **kw), pm.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_format_export_loads_in_peft(arch, ids, tmp_path):
    model = attach(FAMILIES[arch])
    ours = output(model, ids)
    model.save(tmp_path / "ours", format="peft")
    pm = peft.PeftModel.from_pretrained(FAMILIES[arch](), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    _peft_model(FAMILIES[arch]).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written == {**theirs, "base_model_name_or_path": written["base_model_name_or_path"]}
