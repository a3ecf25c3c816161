"""Polytropon / MHR (HF PEFT's POLY): formula, PEFT both ways (eval and the training-mode relaxed Bernoulli),
per-task merge, task ids in mixed batches, errors."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
import slimtune.methods.poly  # noqa: F401  (registers the method)
from slimtune.bases import sizes
from slimtune.layer import AdapterLayer
from slimtune.methods.moelora import TaskIdError
from slimtune.methods.poly import Poly, PolyConfig, merge_for_task, param_groups
from tests.conftest import MODELS, assert_rows_match_alone, output, randomize, tiny_bert, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32 logits ~ O(1): PEFT vs ours, merged vs routed
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
TASKS = torch.tensor([0, 2, 1])


def config(arch: str = "llama", **kw) -> PolyConfig:
    return PolyConfig(**{"r": 2, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "targets": TARGETS[arch], **kw})


def layers(model, name: str = "default") -> dict[str, Poly]:
    return dict(model.view(name).layers)


@pytest.mark.parametrize("arch", TARGETS)
def test_identity_at_init_with_peft_init(arch, ids):
    base = MODELS[arch]()
    ref = output(base, ids)
    model = st.attach(base, config(arch))
    torch.testing.assert_close(output(model, ids, task_ids=TASKS), ref, atol=0, rtol=0)
    for a in layers(model).values():
        bound = (2 / a.A.shape[2]) ** 0.5  # U(+-1/sqrt(d_in / n_splits)): |A| <= bound / sqrt(2)
        assert torch.count_nonzero(a.B) == 0 and a.A.abs().max() <= bound and a.logits.abs().max() <= 1e-3


def test_forward_is_the_formula_on_one_layer():
    """Eval mode, MHR with 2 heads: each head of the input / output features mixes its own skill pieces."""
    torch.manual_seed(0)
    model = st.attach(torch.nn.Sequential(torch.nn.Linear(6, 4)), PolyConfig(r=3, n_tasks=2, n_skills=3, n_splits=2,
                                                                              targets=["0"])).eval()
    randomize(model, scale=0.5)
    a, base = model.model[0].adapters["default"], model.model[0].base_layer
    x, tasks = torch.randn(3, 5, 6), torch.tensor([1, 0, 1])
    expected = []
    for row, t in zip(x, tasks.tolist(), strict=True):
        z = torch.sigmoid(a.logits[t]).view(2, 3)  # (heads, skills)
        w = z / z.sum(-1, keepdim=True)
        A = torch.cat([sum(w[q, s] * a.A[q, s] for s in range(3)) for q in range(2)], dim=0)  # (6, r): rows by head
        B = torch.cat([sum(w[q, s] * a.B[q, s] for s in range(3)) for q in range(2)], dim=1)  # (r, 4): cols by head
        expected.append(base(row) + row @ A @ B / 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, task_ids=tasks), torch.stack(expected).detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", TARGETS)
def test_param_count_is_the_formula(arch):
    cfg = config(arch)
    model = st.attach(MODELS[arch](), cfg)
    expected = 0
    for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
        d_in, d_out = sizes(layer.base_layer)
        expected += cfg.n_skills * cfg.r * (d_in + d_out) + cfg.n_tasks * cfg.n_splits * cfg.n_skills
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_for_task_equals_the_routed_output_for_that_task(arch, ids):
    model = st.attach(MODELS[arch](), config(arch))
    randomize(model)
    for task in range(3):
        routed = output(model.use("default"), ids, task_ids=task)
        merge_for_task(model, "default", task)
        assert model.configs[f"default_task{task}"] == st.LoraConfig(r=2, alpha=1.0, targets=sorted(layers(model)))
        torch.testing.assert_close(output(model.use(f"default_task{task}"), ids), routed, atol=TOL, rtol=1e-4)


def test_merge_folds_in_the_default_task_and_unmerge_restores_the_weights(ids):
    model = st.attach(tiny_llama(), config(default_task=1))
    randomize(model)
    routed = output(model, ids, task_ids=1)
    torch.testing.assert_close(output(model, ids), routed, atol=0, rtol=0)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters() if "base_layer" in n}
    model.merge()
    torch.testing.assert_close(output(model, ids), routed, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in model.model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)


def test_mixed_task_batch_rows_equal_each_task_alone(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model)
    batch, tasks = torch.cat([ids, ids]), torch.tensor([0, 1, 2, 2, 1, 0])
    mixed = output(model, batch, task_ids=tasks)
    for i in range(len(tasks)):
        torch.testing.assert_close(mixed[i:i + 1], output(model, batch[i:i + 1], task_ids=int(tasks[i])),
                                   atol=TOL, rtol=1e-4)
    names = ["default", None, "default", "lora", "default", None]
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="lora")
    randomize(model, seed=4)
    assert_rows_match_alone(model, batch, names, atol=TOL, task_ids=tasks)


def test_gradients_reach_the_skills_and_only_the_routing_rows_of_tasks_in_the_batch(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model)
    model.train()
    model(input_ids=ids, task_ids=torch.tensor([2, 0, 2])).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".adapters." in name), name
    for a in layers(model).values():
        assert torch.count_nonzero(a.A.grad) > 0 and torch.count_nonzero(a.B.grad) > 0
        assert torch.count_nonzero(a.logits.grad[1]) == 0 and torch.count_nonzero(a.logits.grad[[0, 2]]) > 0


def test_training_samples_a_relaxed_bernoulli_and_eval_is_deterministic(ids):
    model = st.attach(tiny_llama(), config())
    randomize(model)
    a, b = output(model, ids, task_ids=TASKS), output(model, ids, task_ids=TASKS)
    assert torch.equal(a, b)
    model.train()
    w = next(iter(layers(model).values())).mixing(torch.tensor([0, 0]), sample=True)
    assert not torch.allclose(w[0], w[1]) and torch.allclose(w.sum(-1), torch.ones(2, 2))


def test_save_load_is_exact(ids, tmp_path):
    model = st.attach(tiny_gpt2(), config("gpt2", default_task=2))  # GPT-2 Conv1D: ours, not PEFT's
    randomize(model)
    model.save(tmp_path)
    loaded = st.load(tiny_gpt2(), tmp_path)
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids, task_ids=TASKS), output(model, ids, task_ids=TASKS), atol=0, rtol=0)
    torch.testing.assert_close(output(loaded, ids), output(model, ids, task_ids=2), atol=0, rtol=0)


def test_two_tasks_with_conflicting_targets_learn_different_routings():
    """Same inputs, different next tokens per task: only a task-dependent mixture fits both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (2, 8), generator=g)
    ids, labels = torch.cat([x, x]), torch.randint(0, 1000, (4, 8), generator=g)
    tasks = torch.tensor([0, 0, 1, 1])
    torch.manual_seed(0)
    model = st.attach(tiny_llama(), PolyConfig(r=4, n_tasks=2, n_skills=2, targets=["q_proj", "v_proj", "down_proj"]))
    groups = param_groups(model, lr=3e-2, logits_lr=0.3)  # the routing at 10x the skills' rate, as mttl's Poly
    assert [len(g["params"]) for g in groups] == [12, 6]
    opt = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels, task_ids=tasks).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.4, losses[::5]
    with torch.no_grad():
        right = model(input_ids=ids, labels=labels, task_ids=tasks).loss.item()
        swapped = model(input_ids=ids, labels=labels, task_ids=1 - tasks).loss.item()
        gaps = [(a.mixing(torch.tensor([0]), False) - a.mixing(torch.tensor([1]), False)).abs().sum()
                for a in layers(model).values()]
    assert swapped > right + 0.3, (right, swapped)  # what was learnt depends on the task id
    assert sum(gaps) / len(gaps) > 0.5, gaps  # of at most 2 per head


# -- HF PEFT interop -----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {  # PEFT's Poly wraps nn.Linear only and routes task_ids for models with a task type
    "llama": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"])),
    "bert": (tiny_bert, dict(task_type="SEQ_CLS", target_modules=["query", "output.dense"])),
}
EXPORT_CASES = {
    "llama": (tiny_llama, config(targets=["q_proj", "v_proj", "down_proj"])),
    "llama_layer1": (tiny_llama, config(targets=["q_proj"], layers=[1], n_splits=1)),  # full module names
    "bert": (tiny_bert, config("bert", modules_to_save=["classifier"])),
}


def _scramble_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, ids, tmp_path):
    make_base, kwargs = PEFT_CASES[case]
    pm = peft.get_peft_model(make_base(), peft.PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2, **kwargs))
    _scramble_peft(pm)
    pm.eval()
    expected = output(pm, ids, task_ids=TASKS)
    pm.save_pretrained(tmp_path)
    ours = st.load(make_base(), tmp_path)
    assert ours.configs["default"] == PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2,
                                                 targets=sorted(kwargs["target_modules"]),
                                                 modules_to_save=["classifier"] if case == "bert" else None)
    torch.testing.assert_close(output(ours, ids, task_ids=TASKS), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_peft_format_export_loads_in_peft_with_same_outputs(case, ids, tmp_path):
    make_base, cfg = EXPORT_CASES[case]
    model = st.attach(make_base(), cfg)
    randomize(model, scale=0.3)
    ours = output(model, ids, task_ids=TASKS)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(peft.PolyConfig().to_dict()), "exactly PEFT's PolyConfig fields"
    assert written["peft_type"] == "POLY" and written["task_type"] == ("SEQ_CLS" if case == "bert" else "CAUSAL_LM")
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids, task_ids=TASKS), ours, atol=TOL, rtol=TOL)


def test_training_mode_relaxed_bernoulli_draws_equal_peft_under_one_seed(ids, tmp_path):
    make_base, kwargs = PEFT_CASES["llama"]
    pm = peft.get_peft_model(make_base(), peft.PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2, **kwargs))
    _scramble_peft(pm)
    pm.save_pretrained(tmp_path)
    ours = st.load(make_base(), tmp_path)
    pm.train()
    ours.train()
    torch.manual_seed(5)
    theirs = pm(input_ids=ids, task_ids=TASKS).logits
    torch.manual_seed(5)
    mine = ours(input_ids=ids, task_ids=TASKS).logits
    torch.testing.assert_close(mine, theirs, atol=TOL, rtol=TOL)
    assert not torch.allclose(mine, output(ours.eval(), ids, task_ids=TASKS), atol=1e-3)  # the samples matter


def test_peft_tensor_keys_and_shapes_match_peft_exactly(tmp_path):
    from safetensors.torch import load_file

    make_base, kwargs = PEFT_CASES["llama"]
    peft.get_peft_model(make_base(), peft.PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2, **kwargs)
                        ).save_pretrained(tmp_path / "peft")
    st.attach(make_base(), EXPORT_CASES["llama"][1]).save(tmp_path / "ours", format="peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# -- bad input -------------------------------------------------------------------------------------------
def test_peft_export_of_conv1d_targets_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match=r"HF PEFT's POLY wraps torch.nn.Linear only"):
        st.attach(tiny_gpt2(), config("gpt2")).save(tmp_path, format="peft")


def test_missing_and_bad_task_ids_are_refused(ids):
    model = st.attach(tiny_llama(), config(), name="skills")
    with pytest.raises(TaskIdError, match=r"PolyConfig adapter 'skills' needs task ids .*task_ids="):
        output(model, ids)
    with pytest.raises(TaskIdError, match=r"task_ids holds 3: PolyConfig adapter 'skills' has 3 tasks"):
        output(model, ids, task_ids=torch.tensor([0, 3, 1]))
    one = st.attach(tiny_llama(), config(n_tasks=1))  # PEFT's default: one task, ids may be left out here
    torch.testing.assert_close(output(one, ids), output(one, ids, task_ids=0), atol=0, rtol=0)


@pytest.mark.parametrize("fields, message", [
    (dict(n_splits=0), r"PolyConfig.n_splits=0: expected an int >= 1"),
    (dict(r=1.5), r"PolyConfig.r=1.5: expected an int >= 1"),
    (dict(poly_type="mhr"), r"PolyConfig.poly_type='mhr': expected 'poly'"),
    (dict(default_task=-1), r"PolyConfig.default_task=-1: expected None or a task id in \[0, 3\)"),
])
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises(st.ConfigError, match=message):
        config(**fields)


def test_n_splits_not_dividing_the_features_names_the_layer():
    with pytest.raises(st.ConfigError, match=r"q_proj \(Linear, d_in=64, d_out=64\): PolyConfig.n_splits=3: "
                                             r"expected a divisor of both d_in=64 and d_out=64"):
        st.attach(tiny_llama(), config(n_splits=3))


def test_bf16_base_trains_in_bf16(ids):
    model = st.attach(tiny_llama().to(torch.bfloat16), config())
    randomize(model)
    assert {p.dtype for _, p in model.trainable_parameters()} == {torch.bfloat16}
    model.train()  # the relaxed Bernoulli samples in bf16 too
    model(input_ids=ids, labels=ids, task_ids=TASKS).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in model.trainable_parameters())
