"""MOELoRA (task-ID-gated LoRA experts): formula, per-task merge, task ids in mixed batches, errors."""

from __future__ import annotations

import re

import pytest
import torch

import slimtune as st
import slimtune.methods.moelora  # noqa: F401  (registers the method)
from slimtune.bases import sizes
from slimtune.layer import AdapterLayer
from slimtune.methods.moelora import MoeLora, MoeLoraConfig, TaskIdError, merge_for_task
from tests.conftest import MODELS, assert_rows_match_alone, output, randomize, tiny_llama

TOL = 1e-5  # fp32 logits ~ O(1): a merged / re-associated computation against the routed one
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}


def config(arch: str = "llama", **kw) -> MoeLoraConfig:
    return MoeLoraConfig(**{"num_experts": 2, "r": 4, "num_tasks": 3, "task_embedding_dim": 8,
                            "targets": TARGETS[arch], **kw})


def layers(model) -> dict[str, MoeLora]:
    return {n: a for n, a in model.view("default").layers.items()}


@pytest.mark.parametrize("arch", TARGETS)
def test_identity_at_init(arch, ids):
    base = MODELS[arch]()
    ref = output(base, ids)
    model = st.attach(base, config(arch))
    torch.testing.assert_close(output(model, ids, task_ids=torch.tensor([0, 2, 1])), ref, atol=0, rtol=0)
    for a in layers(model).values():  # the reference code's init: B = 0, A small
        assert torch.count_nonzero(a.B) == 0 and 0.005 < a.A.std() < 0.02


def test_forward_is_the_formula_on_one_layer():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(5, 6))
    model = st.attach(lin, MoeLoraConfig(num_experts=3, r=6, alpha=3.0, num_tasks=2, task_embedding_dim=4,
                                         targets=["0"]))
    randomize(model, scale=0.5)
    a = model.model[0].adapters["default"]
    x, tasks = torch.randn(4, 7, 5), torch.tensor([1, 0, 0, 1])
    expected = []
    for row, t in zip(x, tasks.tolist(), strict=True):
        w = torch.softmax(a.W_g @ a.E[t], dim=0)  # (N,)
        delta = sum(w[i] * (a.B[i] @ a.A[i]) for i in range(3)) * (3.0 / 6)  # s = alpha / r, r the total rank
        expected.append(model.model[0].base_layer(row) + row @ delta.T)
    with torch.no_grad():
        got = model(x, task_ids=tasks)
    torch.testing.assert_close(got, torch.stack(expected).detach(), atol=1e-6, rtol=1e-5)
    assert a.A.shape == (3, 2, 5) and a.B.shape == (3, 6, 2)  # rank r / N per expert


@pytest.mark.parametrize("arch", TARGETS)
def test_param_count_is_the_formula(arch):
    cfg = config(arch)
    model = st.attach(MODELS[arch](), cfg)
    expected = 0
    for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
        d_in, d_out = sizes(layer.base_layer)
        expected += cfg.r * (d_in + d_out) + (cfg.num_tasks + cfg.num_experts) * cfg.task_embedding_dim
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_for_task_equals_the_routed_output_for_that_task(arch, ids):
    model = st.attach(MODELS[arch](), config(arch))
    randomize(model)
    for task in range(3):
        routed = output(model.use("default"), ids, task_ids=task)
        merge_for_task(model, "default", task)
        assert model.configs[f"default_task{task}"] == st.LoraConfig(r=4, alpha=16.0, targets=sorted(layers(model)))
        torch.testing.assert_close(output(model.use(f"default_task{task}"), ids), routed, atol=TOL, rtol=1e-4)
    assert not torch.allclose(output(model, ids), output(model.use("default_task0"), ids), atol=1e-3)


def test_merge_folds_in_the_default_task_and_unmerge_restores_the_weights(ids):
    model = st.attach(tiny_llama(), config(default_task=2))
    randomize(model)
    routed = output(model, ids, task_ids=2)
    torch.testing.assert_close(output(model, ids), routed, atol=0, rtol=0)  # no task ids: the default task
    before = {n: p.detach().clone() for n, p in model.model.named_parameters() if "base_layer" in n}
    model.merge()
    torch.testing.assert_close(output(model, ids), routed, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in model.model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)


def test_merge_for_task_gives_a_plain_lora_peft_loads(ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = st.attach(tiny_llama(), config())
    randomize(model)
    routed = output(model, ids, task_ids=1)
    merge_for_task(model, "default", 1, new_name="t1")
    model.save(tmp_path, name="t1", format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), routed, atol=TOL, rtol=1e-4)


def test_mixed_task_batch_rows_equal_each_task_alone(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model)
    batch, tasks = torch.cat([ids, ids]), torch.tensor([0, 1, 2, 2, 1, 0])
    mixed = output(model, batch, task_ids=tasks)
    for i in range(len(tasks)):
        alone = output(model, batch[i:i + 1], task_ids=int(tasks[i]))
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=TOL, rtol=1e-4)
    torch.testing.assert_close(output(model, batch, task_ids=tasks.tolist()), mixed, atol=0, rtol=0)  # a list


def test_adapter_names_cut_task_ids_to_each_adapters_rows(ids):
    model = st.attach(tiny_llama(), config(), name="a")
    model.add(config(num_tasks=2, r=2), name="b")
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="c")
    randomize(model)
    batch, tasks = torch.cat([ids, ids]), torch.tensor([2, 1, 0, 0, 1, 1])
    names = ["a", "b", None, "c", "a", "b"]
    assert_rows_match_alone(model, batch, names, atol=TOL, task_ids=tasks)


def test_gradients_reach_the_experts_the_gate_and_only_the_tasks_in_the_batch(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model)
    model.train()
    output_ = model(input_ids=ids, task_ids=torch.tensor([0, 2, 0])).logits
    output_.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".adapters." in name), name
    for a in layers(model).values():
        assert all(torch.count_nonzero(g) > 0 for g in (a.A.grad, a.B.grad, a.W_g.grad))
        assert torch.count_nonzero(a.E.grad[1]) == 0 and torch.count_nonzero(a.E.grad[[0, 2]]) > 0  # task 1 unused


def test_save_load_is_exact(ids, tmp_path):
    model = st.attach(tiny_llama(), config(default_task=1, dropout=0.1))
    randomize(model)
    tasks = torch.tensor([2, 0, 1])
    model.save(tmp_path)
    loaded = st.load(tiny_llama(), tmp_path)
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids, task_ids=tasks), output(model, ids, task_ids=tasks), atol=0, rtol=0)
    torch.testing.assert_close(output(loaded, ids), output(model, ids, task_ids=1), atol=0, rtol=0)


def test_generate_takes_task_ids(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model, scale=0.3)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    tasks = torch.tensor([0, 1, 2])
    both = model.generate(input_ids=ids, task_ids=tasks, **kw)
    for i in range(3):
        assert torch.equal(both[i:i + 1], model.generate(input_ids=ids[i:i + 1], task_ids=tasks[i:i + 1], **kw))


def test_two_tasks_with_conflicting_targets_learn_different_gates():
    """Same inputs, different next tokens per task: only a task-dependent update fits both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (2, 8), generator=g)
    ids, labels = torch.cat([x, x]), torch.randint(0, 1000, (4, 8), generator=g)
    tasks = torch.tensor([0, 0, 1, 1])
    model = st.attach(tiny_llama(), MoeLoraConfig(num_experts=2, r=8, num_tasks=2, task_embedding_dim=8,
                                                  targets=["q_proj", "v_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=2e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels, task_ids=tasks).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.5, losses[::5]
    with torch.no_grad():
        swapped = model(input_ids=ids, labels=labels, task_ids=1 - tasks).loss.item()
        right = model(input_ids=ids, labels=labels, task_ids=tasks).loss.item()
        gaps = [(a.gate(torch.tensor([0])) - a.gate(torch.tensor([1]))).abs().sum() for a in layers(model).values()]
    assert swapped > right + 0.3, (right, swapped)  # what was learnt depends on the task id
    assert sum(gaps) / len(gaps) > 0.2, gaps


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_task_ids_name_the_adapter_and_how_to_pass_them(ids):
    model = st.attach(tiny_llama(), config(), name="medical")
    with pytest.raises(TaskIdError, match=r"MoeLoraConfig adapter 'medical' needs task ids .*model\(\*\*batch, "
                                          r"task_ids=.*\[0, 3\).*default_task"):
        output(model, ids)
    with model.disabled():
        output(model, ids)  # the base needs none
    one = st.attach(tiny_llama(), config(num_tasks=1))  # one task: ids may be left out
    torch.testing.assert_close(output(one, ids), output(one, ids, task_ids=0), atol=0, rtol=0)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 3, 1]), r"task_ids holds 3: MoeLoraConfig adapter 'default' has 3 tasks, expected task ids in "
                              r"\[0, 3\)"),
    (torch.tensor([0, -1, 1]), r"task_ids holds -1"),
    (torch.tensor([0, 1]), r"task_ids of shape \(2,\): .* one task id per batch row, and this batch has 3 rows"),
    (torch.tensor([[0, 1, 1]]), r"task_ids of shape \(1, 3\)"),
    (torch.tensor([0.0, 1.0, 1.0]), r"expects integer task ids"),
    ("0", r"task_ids='0': .* expects integer task ids"),
])
def test_bad_task_ids_are_refused(bad, message, ids):
    model = st.attach(tiny_llama(), config())
    with pytest.raises(TaskIdError, match=message):
        output(model, ids, task_ids=bad)


@pytest.mark.parametrize("fields, message", [
    (dict(r=5), r"MoeLoraConfig.r=5: expected an int >= 1 and a multiple of num_experts=2"),
    (dict(num_experts=0), r"MoeLoraConfig.num_experts=0: expected an int >= 1"),
    (dict(num_tasks=0), r"MoeLoraConfig.num_tasks=0: expected an int >= 1"),
    (dict(default_task=3), r"MoeLoraConfig.default_task=3: expected None or a task id in \[0, 3\)"),
    (dict(task_embedding_dim=0), r"MoeLoraConfig.task_embedding_dim=0"),
    (dict(targets=None), r"MoeLoraConfig.targets=None: expected the modules to adapt"),
])
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises(st.ConfigError, match=message):
        config(**fields)


def test_merge_without_a_default_task_and_bad_merge_for_task_calls_are_refused(ids):
    model = st.attach(tiny_llama(), config())
    with pytest.raises(NotImplementedError, match=re.escape("cannot be merged")):
        model.merge()
    with pytest.raises(st.ConfigError, match=r"merge_for_task\(task=3\): adapter 'default' has 3 tasks"):
        merge_for_task(model, "default", 3)
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="plain")
    with pytest.raises(st.ConfigError, match=r"adapter 'plain' \(lora\) is not a task-routed mixture"):
        merge_for_task(model, "plain", 0)
    with pytest.raises(st.AdapterNameError, match="no adapter named 'nope'"):
        merge_for_task(model, "nope", 0)
    with pytest.raises(st.ConfigError, match="Did you mean 'num_experts'"):
        st.config_from_dict({"method": "moelora", "targets": ["q_proj"], "expert_num": 2})


@pytest.mark.parametrize("default_task", [None, 0])
def test_activation_checkpointing_is_refused_not_silently_wrong(default_task):
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = st.attach(base, config(default_task=default_task))
    randomize(model)
    model.train()
    ids = torch.randint(0, 1000, (2, 6))
    loss = model(input_ids=ids, labels=ids, task_ids=torch.tensor([1, 2])).loss
    with pytest.raises(TaskIdError, match="activation checkpointing"):
        loss.backward()  # the recomputed layers would not see task_ids=[1, 2]


def test_bf16_base_trains_in_bf16(ids):
    model = st.attach(tiny_llama().to(torch.bfloat16), config())
    randomize(model)
    assert {p.dtype for _, p in model.trainable_parameters()} == {torch.bfloat16}
    model.train()
    model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in model.trainable_parameters())
