"""LoRAHub: the composed factors are the weighted sums, CMA-ES beats the uniform mix on a toy task with a
fixed seed, weights stay in bounds, the L1 term acts, runs repeat exactly, the model's state comes back,
save -> load is exact (ours and HF PEFT's format), bad inputs are refused, and the CLI writes an adapter."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import slimtune as st
from slimtune.errors import AdapterNameError, ConfigError
from slimtune.multitask.lorahub import _Composer, _read_sources, add_parser, lorahub
from tests.conftest import fit, output, tiny_llama

pytest.importorskip("cma")

TARGETS = ["q_proj", "v_proj", "up_proj"]
CFG = dict(r=4, alpha=8, targets=TARGETS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRAs, each fitted to its own fixed batch of random token sequences ("task" a and b), saved."""
    tmp = tmp_path_factory.mktemp("hub")
    g = torch.Generator().manual_seed(0)
    data = {t: torch.randint(0, 1000, (8, 12), generator=g) for t in ("a", "b")}
    model = st.attach(tiny_llama(), st.LoraConfig(**CFG), name="a")
    model.add(st.LoraConfig(**CFG), name="b")
    for t in ("a", "b"):
        fit(model.use(t), data[t], 40, 2e-2)
        model.save(tmp / t, name=t)
    return tmp, data


def _loaded(trained):
    tmp, _ = trained
    model = st.load(tiny_llama(), tmp / "a", name="a")
    return st.load(model, tmp / "b", name="b").eval()


def _batches(ids):
    return [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]


def _loss(model, ids):
    with torch.no_grad():
        return (model(input_ids=ids[:4], labels=ids[:4]).loss.item() + model(input_ids=ids[4:], labels=ids[4:])
                .loss.item()) / 2


def _factors(model, name):
    return {m: (a.A.detach().clone(), a.B.detach().clone()) for m, a in model.view(name).layers.items()}


def test_composed_factors_are_the_weighted_sums_of_A_and_B(trained):
    model = _loaded(trained)
    model.add(st.LoraConfig(**CFG), "hub", init=False)
    composer = _Composer(model, "hub", "a", _read_sources(model, ["a", "b"]))
    fa, fb = _factors(model, "a"), _factors(model, "b")
    w = [0.7, -1.2]
    composer.write(w)
    for module, (A, B) in _factors(model, "hub").items():
        assert torch.equal(A, w[0] * fa[module][0] + w[1] * fb[module][0])  # bitwise: the same float ops
        assert torch.equal(B, w[0] * fa[module][1] + w[1] * fb[module][1])
    composer.write([1.0, 0.0])  # the composed adapter computes what "a" computes
    ids = trained[1]["a"]
    torch.testing.assert_close(output(model.use("hub"), ids), output(model.use("a"), ids), atol=0, rtol=0)


def test_result_adapter_holds_the_reported_weights(trained):
    model = _loaded(trained)
    result = lorahub(model, ["a", "b"], _batches(trained[1]["a"]), name="hub", progress=False)
    w = [result.weights["a"], result.weights["b"]]
    fa, fb = _factors(model, "a"), _factors(model, "b")
    for module, (A, B) in _factors(model, "hub").items():
        assert torch.equal(A, w[0] * fa[module][0] + w[1] * fb[module][0])
        assert torch.equal(B, w[0] * fa[module][1] + w[1] * fb[module][1])
    assert model.active == ["hub"]
    assert math.isclose(_loss(model, trained[1]["a"]), result.few_shot_loss, rel_tol=1e-6)


@pytest.mark.parametrize("task", ["a", "mix"])
def test_lorahub_beats_the_uniform_mix(trained, task):
    """New task = task a's examples, or half a / half b. The uniform mix (1/2, 1/2) holds a quarter of each
    B_i A_i plus cross terms; CMA-ES (seed 0, 40 evaluations) must find a clearly better composition."""
    data = trained[1]
    ids = data["a"] if task == "a" else torch.cat([data["a"][:4], data["b"][:4]])
    model = _loaded(trained)
    own = _loss(model.use("a"), ids)
    with model.disabled():
        base = _loss(model, ids)
    result = lorahub(model, ["a", "b"], _batches(ids), name="hub", steps=40, seed=0, progress=False)
    uniform = result.uniform_loss
    assert result.few_shot_loss < uniform - (0.4 if task == "a" else 0.1), (result, uniform)
    assert result.loss < uniform  # the objective with its penalty, too
    assert len(result.history) == 40
    assert math.isclose(result.history[0], base, rel_tol=1e-6)  # the first evaluation: w = 0, the base model
    assert all(x >= y for x, y in zip(result.history, result.history[1:], strict=False))
    assert result.history[-1] == result.loss
    if task == "a":  # close to adapter a alone; (-A)(-B) = AB, so a's weight may come out negative
        assert abs(result.weights["a"]) > 0.6 and abs(result.weights["b"]) < 0.3, result.weights
        assert result.few_shot_loss < own + 0.15, (result.few_shot_loss, own)


def test_weights_stay_within_bounds(trained):
    model = _loaded(trained)
    lo, hi = -0.3, 0.4  # the good weights (|w_a| ~ 0.9) lie outside: the search presses on the bounds
    result = lorahub(model, ["a", "b"], _batches(trained[1]["a"]), name="hub", bounds=(lo, hi), progress=False)
    assert all(lo <= w <= hi for w in result.weights.values()), result.weights
    assert max(abs(w) for w in result.weights.values()) > 0.25


def test_l1_penalty_is_in_the_objective(trained):
    batches = _batches(trained[1]["a"])
    free = lorahub(_loaded(trained), ["a", "b"], batches, name="hub", l1=0.0, progress=False)
    heavy = lorahub(_loaded(trained), ["a", "b"], batches, name="hub", l1=5.0, progress=False)
    assert sum(abs(w) for w in free.weights.values()) > 0.6
    assert sum(abs(w) for w in heavy.weights.values()) < 0.05  # pushed to (about) zero
    for r, l1 in ((free, 0.0), (heavy, 5.0)):
        assert math.isclose(r.loss, r.few_shot_loss + l1 * sum(abs(w) for w in r.weights.values()), rel_tol=1e-9)


def test_fixed_seed_repeats_exactly(trained):
    batches = _batches(trained[1]["a"])
    runs = [lorahub(_loaded(trained), ["a", "b"], batches, name="hub", seed=s, steps=20, progress=False)
            for s in (3, 3, 4)]
    assert runs[0].weights == runs[1].weights and runs[0].history == runs[1].history
    assert runs[0].weights != runs[2].weights


def test_in_place_evaluation_and_restored_state(trained):
    """Every candidate is written into the same tensors, evaluated in eval mode without grad; afterwards the
    modes, the sources and their tensors are as before, and only the composed adapter is active."""
    model = _loaded(trained).train()
    model.model.model.layers[0].eval()  # a mixed mode must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    before = {n: model.adapter_state_dict(n) for n in ("a", "b")}
    seen = []

    def loss_fn(m, batch):
        a = m.view("hub").layers["model.layers.0.self_attn.q_proj"]
        seen.append((a.A.data_ptr(), id(a.A), m.training, torch.is_grad_enabled(), m.active))
        return m(**batch).loss

    lorahub(model, ["a", "b"], _batches(trained[1]["a"]), name="hub", steps=10, loss_fn=loss_fn, progress=False)
    assert len(seen) == (10 + 2) * 2  # (10 steps, the uniform mix, the final re-evaluation) x 2 batches
    assert len({s[:2] for s in seen}) == 1  # one set of tensors, written in place
    assert all(not train and not grad and active == ["hub"] for *_, train, grad, active in seen)
    assert {n: m.training for n, m in model.named_modules() if ".hub" not in n and not n.endswith("hub")} == modes
    for n in ("a", "b"):
        assert all(torch.equal(v, model.adapter_state_dict(n)[k]) for k, v in before[n].items())
    assert model.active == ["hub"] and set(model.configs) == {"a", "b", "hub"}
    assert all(p.requires_grad for _, p in model.view("hub").layers["model.layers.0.self_attn.q_proj"]
               .named_parameters())  # the active adapter trains further if asked
    lorahub(model, ["a", "b"], _batches(trained[1]["b"]), name="hub", steps=5, progress=False)  # replaces it
    assert set(model.configs) == {"a", "b", "hub"}


def test_failure_leaves_the_model_as_it_was(trained):
    model = _loaded(trained).use("b").train()

    def broken(m, batch):
        if len(calls) == 3:
            raise RuntimeError("boom")
        calls.append(1)
        return m(**batch).loss

    calls: list = []
    with pytest.raises(RuntimeError, match="boom"):
        lorahub(model, ["a", "b"], _batches(trained[1]["a"]), name="hub", loss_fn=broken, progress=False)
    assert "hub" not in model.configs and model.active == ["b"] and model.training


@pytest.mark.parametrize("fmt", ["slimtune", "peft"])
def test_save_load_is_exact(trained, tmp_path, fmt):
    model = _loaded(trained)
    lorahub(model, ["a", "b"], _batches(trained[1]["a"]), name="hub", steps=15, progress=False)
    ids = trained[1]["a"]
    want = output(model, ids)
    model.save(tmp_path / "hub", name="hub", format=fmt)
    again = st.load(tiny_llama(), tmp_path / "hub", name="hub")
    assert all(torch.equal(v, again.adapter_state_dict("hub")[k]) for k, v in model.adapter_state_dict("hub").items())
    torch.testing.assert_close(output(again, ids), want, atol=0, rtol=0)
    if fmt == "peft":
        peft = pytest.importorskip("peft")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "hub").eval()
        torch.testing.assert_close(output(pm, ids), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused(trained):
    model = _loaded(trained)
    batches = _batches(trained[1]["a"])
    cases = [
        (AdapterNameError, "no adapter named 'c'", dict(adapters=["a", "c"])),
        (ConfigError, "at least 2", dict(adapters=["a"])),
        (ConfigError, "at least 2", dict(adapters="a")),
        (ConfigError, "appear once", dict(adapters=["a", "a"])),
        (AdapterNameError, "one of the source", dict(name="a")),
        (ConfigError, "batches is empty", dict(batches=[])),
        (ConfigError, "one dict", dict(batches=batches[0])),
        (ConfigError, "batch 0 is a Tensor", dict(batches=[trained[1]["a"]])),
        (ConfigError, "need `labels`", dict(batches=[{"input_ids": trained[1]["a"]}])),
        (ConfigError, "steps=0", dict(steps=0)),
        (ConfigError, "bounds=", dict(bounds=(1.0, -1.0))),
        (ConfigError, "l1=", dict(l1=-1)),
    ]
    for error, text, kw in cases:
        args = {"adapters": ["a", "b"], "batches": batches, "name": "hub", "progress": False, "steps": 3, **kw}
        with pytest.raises(error, match=text):
            lorahub(model, args.pop("adapters"), args.pop("batches"), **args)
        assert "hub" not in model.configs and model.active == ["a"]
    model.add(st.IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"]), "ia3")
    with pytest.raises(ConfigError, match="'ia3' is 'ia3'.*plain LoRA"):
        lorahub(model, ["a", "ia3"], batches, progress=False)
    model.add(st.LoraConfig(r=2, alpha=4, targets=TARGETS), "low")
    with pytest.raises(ConfigError, match="'low' has rank 2 at .*'a' rank 4"):
        lorahub(model, ["a", "low"], batches, progress=False)
    model.add(st.LoraConfig(r=4, alpha=8, targets=["q_proj"]), "few")
    with pytest.raises(ConfigError, match="target different modules"):
        lorahub(model, ["a", "few"], batches, progress=False)
    model.add(st.LoraConfig(r=4, alpha=16, targets=TARGETS), "loud")
    with pytest.raises(ConfigError, match="scale"):
        lorahub(model, ["a", "loud"], batches, progress=False)


def test_missing_cma_says_how_to_install(trained, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(ImportError, match="pip install cma"):
        lorahub(_loaded(trained), ["a", "b"], _batches(trained[1]["a"]), progress=False)


def test_cli_writes_the_composed_adapter(trained, tmp_path, capsys):
    import transformers

    from tests.test_train_fixtures import tiny_llama_dir, write_jsonl

    base = tiny_llama_dir(tmp_path / "base")
    model = st.attach(transformers.AutoModelForCausalLM.from_pretrained(base), st.LoraConfig(**CFG), name="a")
    model.add(st.LoraConfig(**CFG), name="b")
    model.load_adapter_state_dict(_loaded(trained).adapter_state_dict("a"), "a")
    model.load_adapter_state_dict(_loaded(trained).adapter_state_dict("b"), "b")
    for n in ("a", "b"):
        model.save(tmp_path / n, name=n)
    rows = [{"input": f"say {w}", "output": w} for w in ("alpha", "beta", "gamma")] + [{"text": "delta epsilon"}]
    data = write_jsonl(tmp_path / "few.jsonl", rows)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["lorahub", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(data), "--out",
                              str(tmp_path / "out"), "--base", str(base), "--steps", "6", "--batch-size", "2"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "out" / "lorahub.json").read_text())
    assert set(report["weights"]) == {"a", "b"} and len(report["history"]) == 6
    hub = st.load(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "out", name="hub")
    assert hub.configs["hub"].method == "lora" and hub.configs["hub"].r == 4
    assert "lorahub: a=" in capsys.readouterr().out
