"""P-tuning: prompt tuning's placement with virtual tokens from PEFT's prompt encoder (MLP / LSTM)."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.methods.p_tuning import PTuningConfig
from tests.conftest import MODELS, VOCAB, fit, output, tiny_gpt2, tiny_llama

P = 4
D = 64  # the tiny models' embedding size
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def attach(make, **kw) -> st.TunedModel:
    return st.attach(make(), PTuningConfig(num_virtual_tokens=P, **kw))


@pytest.mark.parametrize("arch", MODELS)
def test_disabled_is_base_and_prompt_changes_output(arch, ids):
    ref = output(MODELS[arch](), ids)
    model = attach(MODELS[arch])
    out = output(model, ids)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("encoder,h,encoder_params", [
    ("mlp", 16, D * 16 + 16 + 16 * 16 + 16 + 16 * D + D),
    ("lstm", 8, 2 * (4 * 8 * (D + 8) + 8 * 8) + 2 * (4 * 8 * (2 * 8 + 8) + 8 * 8)  # 2 layers x 2 directions
     + (2 * 8) * (2 * 8) + 2 * 8 + (2 * 8) * D + D),
    (None, None, 0),
])
def test_param_count_and_gradients_reach_only_the_adapter(encoder, h, encoder_params, ids):
    model = attach(tiny_llama, encoder=encoder, encoder_hidden_size=h)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == P * D + encoder_params
    assert model.adapter_parameter_count("default") == P * D  # files hold the computed tokens only
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    trainable = {n for n, _ in model.trainable_parameters()}
    assert all(n.startswith("inputs.default.") for n in trainable)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name.removeprefix("model.") in trainable), name


@pytest.mark.parametrize("arch", ["llama", "bert"])
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


def test_save_load_exact_and_not_mergeable(ids, tmp_path, capsys):
    model = attach(tiny_llama, encoder="lstm", encoder_hidden_size=8, encoder_dropout=0.1, encoder_num_layers=2)
    model.eval()
    ref = output(model, ids)
    model.save(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]
    assert saved["encoder"] is None  # the file holds the computed tokens
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(loaded, ids), ref, atol=0, rtol=0)
    assert [n for n, _ in loaded.trainable_parameters()] == ["inputs.default.embedding"]
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    main(["methods"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("p_tuning "))
    assert " no " in row and "P_TUNING" in row


@pytest.mark.parametrize("bad,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
    (dict(encoder="gru"), "encoder='gru'"),
    (dict(encoder_num_layers=3), "encoder_num_layers=3"),
    (dict(encoder_dropout=0.1), "encoder_dropout=0.1"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size=0"),
    (dict(targets=["q_proj"]), "targets"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        PTuningConfig(**bad)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = attach(tiny_llama)
    data = torch.randint(0, VOCAB, (1, 8)).repeat(2, 1)  # one sequence the prompt can make likely
    losses = fit(model, data, steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.2, losses


# -- HF PEFT interop ----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(make, task: str, encoder: str = "MLP", **kw):
    cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_reparameterization_type=encoder, **kw)
    return peft.get_peft_model(make(), cfg).eval()


def _ours_from_peft(pm) -> dict[str, torch.Tensor]:
    """PEFT's training-mode encoder state as our adapter's state dict (Z is PEFT's embedding.weight)."""
    return {"embedding" if k == "embedding.weight" else "encoder." + k: v
            for k, v in pm.prompt_encoder["default"].state_dict().items()}


def _peft_logits(pm, ids: torch.Tensor, task: str) -> torch.Tensor:
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, P:] if task == "CAUSAL_LM" else logits


@pytest.mark.parametrize("encoder,kw", [("MLP", {}), ("LSTM", {"encoder_hidden_size": 8, "encoder_num_layers": 2})])
def test_encoder_equals_peft_prompt_encoder(encoder, kw, ids):
    """The same encoder weights give PEFT's outputs: our encoder is PEFT's PromptEncoder."""
    pm = _peft_model(tiny_llama, "CAUSAL_LM", encoder, **kw)
    ours = attach(tiny_llama, encoder=encoder.lower(), encoder_hidden_size=kw.get("encoder_hidden_size"),
                  encoder_num_layers=kw.get("encoder_num_layers", 2))
    ours.inputs["default"].load_state_dict(_ours_from_peft(pm))
    torch.testing.assert_close(output(ours, ids), _peft_logits(pm, ids, "CAUSAL_LM"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_load_peft_p_tuning_gives_peft_outputs(arch, task, ids, tmp_path):
    pm = _peft_model(MODELS[arch], task)  # trained through the MLP: the file holds its output
    expected = _peft_logits(pm, ids, task)
    pm.save_pretrained(tmp_path)
    ours = st.load(MODELS[arch](), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_format_export_loads_in_peft(arch, ids, tmp_path):
    model = attach(MODELS[arch], modules_to_save=["classifier"] if arch == "bert" else None)
    ours = output(model, ids)
    model.save(tmp_path / "ours", format="peft")
    pm = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_logits(pm, ids, "CAUSAL_LM" if arch == "llama" else "SEQ_CLS"), ours,
                               atol=1e-5, rtol=1e-5)
    _peft_model(tiny_llama, "CAUSAL_LM").save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(written) == set(theirs)  # exactly PEFT's fields


def test_generate_equals_greedy_decoding_through_peft(ids):
    """PEFT 0.21's own generate() with prompt learning misses the prompt on transformers 5 (it looks for
    `past_key_values`, generate passes `cache`), so the reference is greedy decoding via PEFT's forward."""
    pm = _peft_model(tiny_llama, "CAUSAL_LM")
    model = attach(tiny_llama)
    model.inputs["default"].load_state_dict(_ours_from_peft(pm))
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    seq = ids
    for _ in range(4):
        seq = torch.cat([seq, _peft_logits(pm, seq, "CAUSAL_LM")[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
