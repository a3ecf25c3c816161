"""The training loop on tiny random models: every task type, resume exactness, signals, atomic
checkpoints, non-finite losses, HF Trainer compatibility, the CLI verbs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from test_train_fixtures import labelled_rows, text_rows, tiny_bert_dir, tiny_llama_dir, write_jsonl

import slimtune as st
import slimtune.train.checkpoint as ckpt_mod
from slimtune.train import CheckpointError, Trainer, TrainingAborted, train
from slimtune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from slimtune.train.metrics import read_metrics


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tiny_llama_dir(d / "llama")
    tiny_bert_dir(d / "bert")
    write_jsonl(d / "lm.jsonl", text_rows(40))
    write_jsonl(d / "cls.jsonl", labelled_rows(48))
    write_jsonl(d / "alpaca.jsonl", [{"instruction": "repeat", "input": str(i), "output": f"ok {i}"}
                                     for i in range(24)])
    return d


def config(files, out, task="causal_lm", model="llama", data="lm.jsonl", **train):
    extra = {"prompt": "Colour? {text}", "max_length": 96} if task == "generative_classification" else {}
    return {"model": {"name": str(files / model)},
            "method": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear", "dropout": 0.1},
            "data": {"task": task, "train": str(files / data), "max_length": 32, "eval_size": 6} | extra,
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False, "eval_before": True,
                      "warmup_steps": 2, **train},
            "output_dir": str(out)}


@pytest.mark.parametrize("task, model, data, metric", [
    ("causal_lm", "llama", "lm.jsonl", "loss"),
    ("instruction", "llama", "alpaca.jsonl", "loss"),
    ("classification", "bert", "cls.jsonl", "accuracy"),
    ("classification", "llama", "cls.jsonl", "accuracy"),  # decoder classifier: needs a pad id, head "score"
    ("generative_classification", "llama", "cls.jsonl", "accuracy"),
])
def test_every_task_trains_and_writes_its_records(files, tmp_path, task, model, data, metric):
    summary = train(config(files, tmp_path / "run", task, model, data))
    run = tmp_path / "run"
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert metric in summary["eval"]["base"] and metric in summary["eval"]["adapted"]
    assert (run / "adapter" / "adapter_model.safetensors").exists() and (run / "config.yaml").exists()
    assert {p.name for p in (run / "plots").iterdir()} >= {"loss.png", "lr.png", "eval.png"}
    steps = [r for r in read_metrics(run) if r.get("split", "train") == "train"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    if metric == "loss":  # training on the eval-like data lowers the loss
        assert summary["eval"]["adapted"]["loss"] < summary["eval"]["base"]["loss"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_signal_equals_an_uninterrupted_run(files, tmp_path, monkeypatch, signum):
    # 8 steps x 2 micro-batches x 8 rows = 128 rows > one epoch: the resumed run crosses an epoch boundary
    kw = {"max_steps": 8, "grad_accum": 2, "batch_size": 8, "save_every": 4, "eval_before": False}
    full = Trainer(config(files, tmp_path / "full", **kw))
    full.train()
    reference = {n: p.detach().clone() for n, p in full.model.trainable_parameters()}

    calls = {"n": 0}
    original = Trainer._forward

    def forward_then_signal(self, model, batch):  # a real signal in the middle of micro-batch 6 (step 3)
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signum)
        return original(self, model, batch)

    monkeypatch.setattr(Trainer, "_forward", forward_then_signal)
    handler_before = signal.getsignal(signum)
    summary = Trainer(config(files, tmp_path / "cut", **kw)).train()
    assert summary["status"] == "interrupted" and summary["steps"] == 3
    assert latest_checkpoint(tmp_path / "cut").name == "step-3"
    assert signal.getsignal(signum) == handler_before  # the Trainer restores the caller's handler
    monkeypatch.setattr(Trainer, "_forward", original)

    resumed = Trainer(config(files, tmp_path / "cut", **kw))
    assert resumed.train(resume=True)["status"] == "completed"
    for n, p in resumed.model.trainable_parameters():
        assert torch.equal(p, reference[n]), n  # bit-for-bit on CPU
    losses = [[r["loss"] for r in read_metrics(d) if r.get("split", "train") == "train"]
              for d in (tmp_path / "full", tmp_path / "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_killed_checkpoint_save_leaves_the_previous_one_loadable(files, tmp_path, monkeypatch):
    t = Trainer(config(files, tmp_path / "run", max_steps=4, save_every=2, keep_last=5, eval_before=False))
    real = ckpt_mod._save_tensors

    def dies_on_second_save(tensors, path):
        if "step-4" in str(path) and path.name == "optimizer.safetensors":
            raise KeyboardInterrupt("killed mid-save")
        real(tensors, path)

    monkeypatch.setattr(ckpt_mod, "_save_tensors", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-2"]
    opt = torch.optim.AdamW([p for _, p in t.model.trainable_parameters()])
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"), t.model, opt)["consumed"] == 2
    monkeypatch.setattr(ckpt_mod, "_save_tensors", real)
    assert Trainer(config(files, tmp_path / "run", max_steps=4, save_every=2)).train(resume=True)["steps"] == 4
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the half save was cleaned up


def test_keep_last_prunes_old_checkpoints(files, tmp_path):
    train(config(files, tmp_path / "run", max_steps=6, save_every=1, keep_last=2, eval_before=False))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-5", "step-6"]


def test_non_finite_losses_are_skipped_then_abort(files, tmp_path, monkeypatch):
    original = Trainer._forward
    bad_calls = {2, 3}

    def sometimes_nan(self, model, batch):
        sometimes_nan.n += 1
        loss = original(self, model, batch)
        return loss * float("nan") if sometimes_nan.n in bad_calls else loss

    sometimes_nan.n = 0
    monkeypatch.setattr(Trainer, "_forward", sometimes_nan)
    t = Trainer(config(files, tmp_path / "skip", max_steps=5, eval_before=False))
    before = {n: p.detach().clone() for n, p in t.model.trainable_parameters()}
    summary = t.train()
    assert summary["status"] == "completed"
    records = [r for r in read_metrics(tmp_path / "skip") if r.get("split", "train") == "train"]
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3]
    assert all(torch.isfinite(p).all() for _, p in t.model.trainable_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in t.model.trainable_parameters())

    sometimes_nan.n = 0
    bad_calls.update(range(3, 100))  # from step 3 on, every loss is NaN
    with pytest.raises(TrainingAborted, match="3 non-finite losses in a row"):
        Trainer(config(files, tmp_path / "abort", max_steps=8, save_every=1, max_bad_steps=3,
                       eval_before=False)).train()
    assert latest_checkpoint(tmp_path / "abort").name == "step-1"  # the last good one is kept


def test_model_trains_under_hf_transformers_trainer(files, tmp_path):
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(files / "llama")
    model = st.attach(base, st.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 259, (16, 12), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapter[n]) for n, p in model.trainable_parameters())


def test_cli_train_eval_plot_generate(files, tmp_path, capsys):
    import yaml

    from slimtune.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(files, tmp_path / "run", "generative_classification",
                                              data="cls.jsonl")))
    assert main(["train", str(cfg_path), "--set", "train.max_steps=2", "--set", "train.eval_before=false"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert main(["eval", str(tmp_path / "run"), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result) == {"base", "adapted"} and "accuracy" in result["adapted"]
    (tmp_path / "run" / "plots" / "loss.png").unlink()
    assert main(["plot", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "plots" / "loss.png").exists()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "3",
                 "--adapters", "default,base"]) == 0
    out = capsys.readouterr().out
    assert "[default] hello" in out and "[base] hello" in out
    assert main(["train", str(cfg_path), "--set", "train.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_training(files, tmp_path):
    plain = Trainer(config(files, tmp_path / "plain", max_steps=2, eval_before=False, **{"lr": 1e-3}))
    plain.train()
    ckpt = Trainer(config(files, tmp_path / "gc", max_steps=2, eval_before=False, gradient_checkpointing=True,
                          **{"lr": 1e-3}))
    ckpt.train()
    a, b = dict(plain.model.trainable_parameters()), dict(ckpt.model.trainable_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_bf16_autocast_trains(files, tmp_path):
    summary = train(config(files, tmp_path / "bf16", max_steps=2, eval_before=False, precision="bf16"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16") if r.get("split", "train") == "train"]
    assert summary["status"] == "completed" and all(torch.isfinite(torch.tensor(losses)))


def test_resume_refuses_a_changed_run(files, tmp_path):
    train(config(files, tmp_path / "run", max_steps=2, eval_before=False))
    with pytest.raises(CheckpointError, match=r"train\.lr=0\.01, this run has 0\.001"):
        Trainer(config(files, tmp_path / "run", max_steps=2, lr=1e-3)).train(resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(config(files, tmp_path / "empty", max_steps=2)).train(resume=True)
