"""slimtune.optim.make_optimizer and `train.optimizer`: AdamW, bitsandbytes' 8-bit / paged AdamW, SGD; their
state (uint8 codes for 8-bit), their checkpoints and exact resume in st.Trainer, LoRA+ groups, clear errors."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from test_train_fixtures import text_rows, tiny_llama_dir, write_jsonl

import slimtune as st
from slimtune.errors import ConfigError
from slimtune.optim import OPTIMIZERS, check_optimizer, loraplus_groups, make_optimizer, optimizer_state_bytes
from slimtune.train import Trainer
from slimtune.train.config import TrainConfig, TrainConfigError
from tests.conftest import VOCAB, tiny_llama

needs_bnb = pytest.mark.skipif(not st.optim.bitsandbytes_available(), reason="bitsandbytes not installed")
BNB = ["adamw8bit", "paged_adamw8bit", "paged_adamw"]


def lora_model(r: int = 4):
    return st.attach(tiny_llama(), st.LoraConfig(r=r, targets=["q_proj", "v_proj"]))


def fit(model, opt, steps: int = 12) -> list[float]:
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def quiet(name: str, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paged ones say once that they do not page on CPU
        return make_optimizer(name, params, **kw)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in BNB] + [pytest.param(n, marks=needs_bnb)
                                                                           for n in BNB])
def test_each_optimizer_trains_a_tiny_lora(name):
    model = lora_model()
    lr = 0.5 if name == "sgd" else 1e-2
    losses = fit(model, quiet(name, [p for _, p in model.trainable_parameters()], lr=lr, min_8bit_size=64), steps=6)
    assert losses[-1] < losses[0] - 0.15, losses


@needs_bnb
def test_8bit_state_is_uint8_codes_with_block_scales_and_small_tensors_stay_float():
    model = lora_model(r=64)  # A (64, 64) and q's B (64, 64): 4096 entries; v's B (32, 64): 2048 < 4096
    opt = make_optimizer("adamw8bit", [p for _, p in model.trainable_parameters()], lr=1e-3)
    fit(model, opt, steps=1)
    for name, p in model.trainable_parameters():
        s = opt.state[p]
        if p.numel() >= 4096:
            assert s["state1"].dtype == s["state2"].dtype == torch.uint8 and s["state1"].shape == p.shape, name
            assert s["absmax1"].numel() == -(-p.numel() // 256)  # one float scale per block of 256
        else:
            assert s["state1"].dtype == torch.float32, name  # bitsandbytes' min_8bit_size
    model = lora_model(r=64)
    adamw = make_optimizer("adamw", [p for _, p in model.trainable_parameters()], lr=1e-3)
    fit(model, adamw, steps=1)
    assert optimizer_state_bytes(opt) < 0.5 * optimizer_state_bytes(adamw)


@needs_bnb
def test_paged_adamw_on_cpu_is_adamw_and_says_once_that_it_does_not_page():
    model, twin = lora_model(), lora_model()
    with pytest.warns(UserWarning, match="runs as 'adamw'") as record:
        paged = make_optimizer("paged_adamw", [p for _, p in model.trainable_parameters()], lr=1e-2)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        fit(model, paged, steps=3)
    assert len([w for w in record if "pag" in str(w.message)]) == 1
    assert not [w for w in later if "aged" in str(w.message)]  # bitsandbytes' own warning is not repeated
    fit(twin, make_optimizer("adamw", [p for _, p in twin.trainable_parameters()], lr=1e-2), steps=3)
    for (n, p), (_, q) in zip(model.trainable_parameters(), twin.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)  # same AdamW update as torch's


@needs_bnb
def test_8bit_adamw_tracks_float_adamw_closely():
    model, twin = lora_model(), lora_model()
    fit(model, make_optimizer("adamw8bit", [p for _, p in model.trainable_parameters()], lr=1e-3,
                              min_8bit_size=64), steps=4)
    fit(twin, make_optimizer("adamw", [p for _, p in twin.trainable_parameters()], lr=1e-3), steps=4)
    ref = lora_model()
    for (n, p), (_, q), (_, p0) in zip(model.trainable_parameters(), twin.trainable_parameters(),
                                       ref.trainable_parameters(), strict=True):
        moved = (q - p0).norm()
        assert moved > 0 and (p - q).norm() < 0.1 * moved, n  # the update differs by the moments' rounding


def test_bad_names_list_the_choices():
    with pytest.raises(ConfigError, match=r"optimizer='adam8bit'.*'adamw', 'adamw8bit'.*Did you mean 'adamw8bit'"):
        make_optimizer("adam8bit", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(TrainConfigError, match=r"train\.optimizer='sgdd'.*Did you mean 'sgd'"):
        TrainConfig.from_dict({"train": {"optimizer": "sgdd"}})
    with pytest.raises(TrainConfigError, match="loraplus_ratio"):
        TrainConfig.from_dict({"train": {"loraplus_ratio": 0}})
    with pytest.raises(ConfigError, match="lr"):
        make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lr=0)


def test_without_bitsandbytes_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import and find_spec now see no bitsandbytes
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        check_optimizer("paged_adamw8bit")
    with pytest.raises(TrainConfigError, match="pip install bitsandbytes"):
        TrainConfig.from_dict({"train": {"optimizer": "adamw8bit"}})
    check_optimizer("adamw")  # the torch ones need nothing


# -- st.Trainer ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("optim")
    tiny_llama_dir(d / "llama")
    write_jsonl(d / "lm.jsonl", text_rows(40))
    return d


def config(files, out, **train):
    return {"model": {"name": str(files / "llama")},
            "method": {"method": "lora", "r": 64, "alpha": 64, "targets": ["q_proj"]},  # 64 x 64: 8-bit state
            "data": {"task": "causal_lm", "train": str(files / "lm.jsonl"), "max_length": 32, "eval_size": 6},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "eval_before": False,
                      "warmup_steps": 1, **train},
            "output_dir": str(out)}


@needs_bnb
def test_trainer_with_adamw8bit_checkpoints_uint8_state_and_resumes_exactly(files, tmp_path):
    from safetensors.torch import load_file

    full = Trainer(config(files, tmp_path / "full", optimizer="adamw8bit"))
    summary = full.train()
    assert summary["eval"]["adapted"]["loss"] < Trainer(config(files, tmp_path / "x")).evaluate()["loss"]
    saved = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "optimizer.safetensors"))
    assert {k.split(".", 1)[1] for k in saved} >= {"state1", "state2", "absmax1", "qmap1"}
    assert all(v.dtype == torch.uint8 for k, v in saved.items() if k.endswith((".state1", ".state2")))

    Trainer(config(files, tmp_path / "cut", optimizer="adamw8bit", max_steps=4, save_every=2)).train()
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")  # as if stopped after step 2
    resumed = Trainer(config(files, tmp_path / "cut", optimizer="adamw8bit", save_every=2))
    assert resumed.train(resume=True)["steps"] == 4
    for (n, p), (_, q) in zip(resumed.model.trainable_parameters(), full.model.trainable_parameters(), strict=True):
        assert torch.equal(p, q), n  # the 8-bit moments came back bit for bit

    with pytest.raises(st.train.CheckpointError, match="optimizer"):
        Trainer(config(files, tmp_path / "cut", optimizer="adamw")).train(resume=True)


def test_trainer_loraplus_keeps_B_at_ratio_times_the_scheduled_lr(files, tmp_path):
    t = Trainer(config(files, tmp_path / "run", optimizer="sgd", loraplus_ratio=16.0))
    opt = t._make_optimizer()
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert all(names[id(p)].endswith(".B") for p in opt.param_groups[1]["params"])
    t._optimizer_step(opt, 3e-4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(3e-4), pytest.approx(16 * 3e-4)]
    assert isinstance(opt, torch.optim.SGD)
    groups = loraplus_groups(t.model, lr=1e-3, ratio=4)
    assert make_optimizer("adamw", groups, lr=1e-3).param_groups[1]["lr"] == pytest.approx(4e-3)


def test_a_checkpoint_from_before_train_optimizer_existed_still_resumes(tmp_path):
    from slimtune.train.trainer import _check_same_run

    cfg = TrainConfig.from_dict({"train": {"max_steps": 2}})
    saved = cfg.to_dict()
    for key in ("optimizer", "loraplus_ratio"):
        del saved["train"][key]  # written by a slimtune without these fields
    _check_same_run(saved, cfg, tmp_path)  # the defaults: the same run
    with pytest.raises(st.train.CheckpointError, match="train.optimizer"):
        _check_same_run(saved, TrainConfig.from_dict({"train": {"max_steps": 2, "optimizer": "sgd"}}), tmp_path)
