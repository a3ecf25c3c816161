"""PASTA: trainable vectors on the special tokens' hidden states at every block's input."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
import tests.test_contract as contract
from slimtune.errors import ConfigError
from slimtune.methods.pasta import PastaConfig, blocks
from tests.conftest import MODELS, VOCAB, assert_rows_match_alone, fit, output, tiny_bert, tiny_gpt2, tiny_llama

L, D = 2, 64
SPECIAL = [102, 721]  # ids the `ids` fixture holds (102 twice in different rows, 721 twice in one row)
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
EXAMPLES = {f"pasta-{k}": v for k, v in contract.per_family(lambda f: PastaConfig(token_ids=SPECIAL)).items()}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract_rows(example_id, ids, tmp_path, monkeypatch):
    monkeypatch.setitem(contract.EXAMPLES, example_id, EXAMPLES[example_id])
    contract.test_contract(example_id, ids, tmp_path)


def perturbed(make, **kw) -> st.TunedModel:
    model = st.attach(make(), PastaConfig(token_ids=SPECIAL, **kw))
    with torch.no_grad():
        model.inputs["default"].vectors.normal_(generator=torch.Generator().manual_seed(0))
    return model


def block_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states each block receives (after PASTA's pre-hook, which runs first)."""
    seen, handles = [], []
    for name in blocks(model):
        block = model.get_submodule(name)
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
    output(model, ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch", MODELS)
def test_only_special_positions_change_at_the_first_block(arch, ids):
    model = perturbed(MODELS[arch])
    adapted = block_inputs(model, ids)[0]
    with model.disabled():
        base = block_inputs(model, ids)[0]
    vectors = model.inputs["default"].vectors.detach()
    for k, token in enumerate(SPECIAL):
        where = ids == token
        torch.testing.assert_close(adapted[where] - base[where], vectors[0, k].expand(int(where.sum()), -1))
    others = ~torch.isin(ids, torch.tensor(SPECIAL))
    torch.testing.assert_close(adapted[others], base[others], atol=0, rtol=0)


@pytest.mark.parametrize("arch", DECODERS)
def test_causal_outputs_before_the_first_special_token_are_unchanged(arch, ids):
    model = perturbed(DECODERS[arch])
    adapted = output(model, ids)
    with model.disabled():
        base = output(model, ids)
    first = 2  # ids[0, 2] == 102 is row 0's first special token
    torch.testing.assert_close(adapted[0, :first], base[0, :first], atol=0, rtol=0)
    assert not torch.allclose(adapted[0, first:], base[0, first:])


@pytest.mark.parametrize("arch", MODELS)
def test_exact_base_at_init_and_parameter_count(arch, ids):
    model = st.attach(MODELS[arch](), PastaConfig(token_ids=SPECIAL))
    torch.testing.assert_close(output(model, ids), output(MODELS[arch](), ids), atol=0, rtol=0)
    assert model.adapter_parameter_count("default") == L * D * len(SPECIAL)
    assert [n for n, _ in model.trainable_parameters()] == ["inputs.default.vectors"]
    assert set(model.adapter_state_dict()) == {"vectors"}


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_equals_without(arch, ids):
    model = perturbed(DECODERS[arch])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    cached, fresh = model.generate(input_ids=ids, **kw), model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), atol=1e-5, rtol=1e-5)
    with model.disabled():
        base = model.generate(input_ids=ids, **kw)
    assert not torch.allclose(torch.stack(cached.logits), torch.stack(base.logits))


@pytest.mark.parametrize("arch", MODELS)
def test_right_padded_rows_equal_unpadded(arch):
    torch.manual_seed(0)
    long, short = torch.randint(2, VOCAB, (1, 9)), torch.randint(2, VOCAB, (1, 6))
    short[0, 1] = long[0, 3] = SPECIAL[0]
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    model = perturbed(MODELS[arch])
    batch, alone = output(model, padded, attention_mask=mask), output(model, short)
    got = batch[1] if arch == "bert" else batch[1, :6]
    torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_see_their_own_adapter(ids):
    model = perturbed(tiny_llama)
    assert_rows_match_alone(model, ids, ["default", None, "default"])


def test_toy_fit_lowers_the_loss():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (4, 12))
    data[:, ::3] = 7  # a special token every third position
    losses = fit(st.attach(tiny_llama(), PastaConfig(token_ids=[7])), data, steps=15, lr=5e-2)
    assert losses[-1] < losses[0] - 0.1, losses[::5]


def test_default_ids_come_from_the_model_config():
    assert st.attach(tiny_llama(), PastaConfig()).inputs["default"].ids.tolist() == [1, 2]  # bos, eos
    with pytest.raises(ConfigError, match="names no special token ids"):
        st.attach(tiny_bert(), PastaConfig())


@pytest.mark.parametrize("kwargs, match", [
    ({"token_ids": []}, "token_ids"), ({"token_ids": [1, 1]}, "distinct"), ({"token_ids": [True]}, "token_ids"),
    ({"init_std": -1}, "init_std"), ({"targets": ["q_proj"]}, "every block"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PastaConfig(**kwargs)


def test_refusals(ids):
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        st.attach(tiny_llama(), PastaConfig(token_ids=[VOCAB]))
    model = perturbed(tiny_llama)
    with pytest.raises(NotImplementedError, match="input_ids"):
        model(inputs_embeds=model.model.get_input_embeddings()(ids))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
