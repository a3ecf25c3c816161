"""Multitask prompt tuning: P_k = P* ∘ (U_k V_k) per row's task id, task_ids, files, PEFT both ways, training."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
import slimtune.methods.mpt  # noqa: F401  (registers the method)
from slimtune.errors import ConfigError
from slimtune.methods.mpt import MptConfig
from tests.conftest import VOCAB, fit, tiny_gpt2, tiny_llama

P, D, TASKS, R = 3, 64, 3, 2
TASK_IDS = torch.tensor([2, 0, 1])


def attach(make=tiny_llama, **kw):
    model = st.attach(make(), MptConfig(num_virtual_tokens=P, num_tasks=TASKS, num_ranks=R, **kw))
    with torch.no_grad():  # U, V ~ N(0, 0.02) make every task prompt ~0; give them weight
        for i, (_, p) in enumerate(model.trainable_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def reference(base, adapter, ids, task_ids):
    """The task prompts written out, put before the input's embeddings by hand."""
    star, cols, rows = (adapter.embedding.detach(), adapter.prefix_task_cols.detach(),
                        adapter.prefix_task_rows.detach())
    prompts = torch.stack([star * (cols[t] @ rows[t]) for t in task_ids.tolist()])
    words = base.get_input_embeddings()(ids)
    with torch.no_grad():
        return base(inputs_embeds=torch.cat([prompts, words], 1)).logits[:, P:]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forward_equals_the_formula_per_row(make, ids):
    model = attach(make)
    ours = logits(model, ids, task_ids=TASK_IDS)
    torch.testing.assert_close(ours, reference(make(), model.inputs["default"], ids, TASK_IDS), atol=1e-5, rtol=1e-5)
    for i, t in enumerate(TASK_IDS.tolist()):  # a mixed batch: each row sees its task's prompt
        torch.testing.assert_close(ours[i:i + 1], logits(model, ids[i:i + 1], task_ids=t), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[0], logits(model, ids[:1], task_ids=[1])[0])  # tasks differ
    base = logits(make(), ids)
    with model.disabled():
        torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(model.inputs["default"].task_prompt(2),
                               model.inputs["default"].embedding * (model.inputs["default"].prefix_task_cols[2]
                                                                    @ model.inputs["default"].prefix_task_rows[2]))


def test_missing_and_bad_task_ids(ids):
    model = attach()
    with pytest.raises(ValueError, match="num_tasks=3: pass task_ids"):
        logits(model, ids)
    with pytest.raises(ValueError, match=r"task_ids holds \[3\]"):
        logits(model, ids, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="one task id per row"):
        logits(model, ids, task_ids=torch.tensor([0, 1]))
    one = st.attach(tiny_llama(), MptConfig(num_virtual_tokens=P))  # one task: calls without ids use it
    torch.testing.assert_close(logits(one, ids), logits(one, ids, task_ids=torch.zeros(3, dtype=torch.long)))
    fallback = attach(default_task=1)
    torch.testing.assert_close(logits(fallback, ids), logits(fallback, ids, task_ids=1))


def test_param_count_and_gradients_reach_only_the_tasks_used(ids):
    model = attach()
    names = {n: p for n, p in model.trainable_parameters()}
    assert set(names) == {"inputs.default.embedding", "inputs.default.prefix_task_cols",
                          "inputs.default.prefix_task_rows"}
    assert sum(p.numel() for p in names.values()) == P * D + TASKS * R * (P + D)
    model.train()
    model(input_ids=ids, task_ids=torch.tensor([1, 1, 2])).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name
    cols = names["inputs.default.prefix_task_cols"].grad
    assert cols[0].abs().sum() == 0 and cols[1].abs().sum() > 0 and cols[2].abs().sum() > 0  # task 0 unused


def test_save_load_exact(ids, tmp_path):
    model = attach()
    ref = logits(model, ids, task_ids=TASK_IDS)
    model.save(tmp_path / "a")
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, ids, task_ids=TASK_IDS), ref, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()


def test_generate_with_task_ids_cache_equals_without():
    model = attach()
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(2, VOCAB, (1, 8), generator=g), torch.randint(2, VOCAB, (1, 5), generator=g)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, task_ids=torch.tensor([0, 2]))
    cached = model.generate(input_ids=padded, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **kw))
    kw["task_ids"] = torch.tensor([2])
    assert torch.equal(cached[1, 8:], model.generate(input_ids=short, **kw)[0, 5:])
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0, task_ids=torch.tensor([0, 2]))
    assert torch.equal(model.generate(input_ids=padded, attention_mask=mask, **beams),
                       model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **beams))


def test_source_inits(tmp_path):
    source = attach()
    source.save(tmp_path / "source")
    src = source.inputs["default"]
    cases = {"average_source_tasks": (src.prefix_task_cols.mean(0), src.prefix_task_rows.mean(0)),
             "exact_source_task": (src.prefix_task_cols[2], src.prefix_task_rows[2])}
    for init, (cols, rows) in cases.items():
        target = st.attach(tiny_llama(), MptConfig(num_virtual_tokens=P, num_tasks=2, num_ranks=R, init=init,
                                                   init_from=str(tmp_path / "source"), init_task=2)).inputs["default"]
        torch.testing.assert_close(target.embedding, src.embedding)
        for k in range(2):  # every target task starts from the source's factors
            torch.testing.assert_close(target.prefix_task_cols[k], cols)
            torch.testing.assert_close(target.prefix_task_rows[k], rows)
    shared = st.attach(tiny_llama(), MptConfig(num_virtual_tokens=P, num_ranks=R, init="only_source_shared",
                                               init_from=str(tmp_path / "source"))).inputs["default"]
    torch.testing.assert_close(shared.embedding, src.embedding)
    assert shared.prefix_task_cols.abs().max() < 0.2  # PEFT's N(0, 0.02), not the source's
    with pytest.raises(ConfigError, match="init_task=5: the source has 3 task"):
        st.attach(tiny_llama(), MptConfig(num_virtual_tokens=P, num_ranks=R, init="exact_source_task",
                                          init_from=str(tmp_path / "source"), init_task=5))
    with pytest.raises(ConfigError, match="num_ranks=1"):
        st.attach(tiny_llama(), MptConfig(num_virtual_tokens=P, init="average_source_tasks",
                                          init_from=str(tmp_path / "source")))


def test_training_two_tasks_lowers_the_loss():
    torch.manual_seed(0)
    model = st.attach(tiny_llama(), MptConfig(num_virtual_tokens=4, num_tasks=2, init="random"))
    data = torch.randint(0, VOCAB, (1, 12)).repeat(4, 1)
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=0.1)
    losses = []
    for _ in range(30):
        loss = model(input_ids=data, labels=data, task_ids=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15, losses[::5]
    single = st.attach(tiny_llama(), MptConfig(num_virtual_tokens=4, init="random"))
    losses = fit(single, data, steps=20, lr=0.1)  # conftest.fit passes no task_ids: num_tasks=1 uses task 0
    assert losses[-1] < losses[0] - 0.1, losses[::5]


@pytest.mark.parametrize("bad,match", [
    (dict(num_tasks=0), "num_tasks=0"), (dict(num_ranks=0), "num_ranks=0"),
    (dict(init="exact_source_task"), "init_from=None"), (dict(init="vocab"), "init='vocab'"),
    (dict(num_tasks=2, default_task=2), "default_task=2"), (dict(init="text"), "init_text=None"),
    (dict(targets=["q_proj"]), "targets"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        MptConfig(**bad)


# -- HF PEFT interop --------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def test_load_peft_mpt_gives_peft_logits(ids, tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, num_tasks=TASKS, num_ranks=R))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        expected = pm.eval()(input_ids=ids, task_ids=TASK_IDS).logits[:, P:]
        loss = pm(input_ids=ids, labels=ids, task_ids=TASK_IDS).loss
    pm.save_pretrained(tmp_path)
    ours = st.load(tiny_llama(), tmp_path)
    assert ours.configs["default"].num_tasks == TASKS and ours.configs["default"].num_ranks == R
    torch.testing.assert_close(logits(ours, ids, task_ids=TASK_IDS), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, labels=ids, task_ids=TASK_IDS).loss, loss,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_format_export_loads_in_peft(make, ids, tmp_path):
    model = attach(make)
    ours = logits(model, ids, task_ids=TASK_IDS)
    model.save(tmp_path, format="peft")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():  # forward logits: PEFT 0.21's own generate() drops prompts on transformers 5
        theirs = pm(input_ids=ids, task_ids=TASK_IDS).logits[:, P:]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
