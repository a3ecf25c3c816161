"""Contract hooks methods share: state shared by all layers of an adapter, the per-step callback and
regularisers, driven from a plain loop, st.Trainer and HF Trainer. A test-only method exercises them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_train_fixtures import text_rows, tiny_llama_dir, write_jsonl
from torch import nn

import slimtune as st
from slimtune.adapter_files import read_adapter
from slimtune.config import _CONFIG_CLASSES, MethodConfig
from slimtune.methods.base import METHODS, LayerAdapter, Method, register
from tests.conftest import output, tiny_llama

STEPS: list[tuple[str, int, bool]] = []
GRADS: list[bool] = []  # whether the layer gradients were still there when step() ran


@dataclass
class HookConfig(MethodConfig):
    penalty: float = 0.0


class Shared(nn.Module):
    """One trainable offset for every layer, and a fixed random buffer saved with it."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer("fixed", torch.randn(3, generator=torch.Generator().manual_seed(0)))


class Gain(LayerAdapter):
    def __init__(self, shared: Shared) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.zeros(()))
        self._shared = [shared]  # a reference, not a submodule: the shared state is the adapter's, not the layer's

    def forward(self, x, base_out, base):
        return base_out * (1 + self.g) + self._shared[0].offset


class HookMethod(Method):
    name, config, shape, category, mergeable = "test_hooks", HookConfig, "layer", "test", False
    tensor_keys = {"offset": "shared_offset", "fixed": "shared_fixed"}

    def build_shared(self, model, cfg, targets, init=True):
        return Shared()

    def build_layer(self, base, cfg, init=True, shared=None):
        return Gain(shared)

    def step(self, adapter, cfg, global_step, optimizer):
        STEPS.append((adapter.name, global_step, optimizer is not None))
        GRADS.append(all(m.g.grad is not None for m in adapter.layers.values()))

    def regularizer(self, adapter, cfg):
        if not cfg.penalty:
            return None
        return cfg.penalty * (1 + sum(m.g.pow(2) for m in adapter.layers.values()))


@pytest.fixture
def hooks():
    register(HookMethod)
    STEPS.clear()
    GRADS.clear()
    yield HookConfig
    METHODS.pop("test_hooks")
    _CONFIG_CLASSES.pop("test_hooks")


def test_shared_state_is_built_once_trained_saved_once_and_deleted(hooks, ids, tmp_path):
    model = st.attach(tiny_llama(), hooks(targets=["q_proj", "v_proj"]))
    layers = model.view("default").layers
    assert len(layers) == 4 and all(m._shared[0] is model.shared["default"] for m in layers.values())
    names = [n for n, _ in model.trainable_parameters()]
    assert names.count("shared.default.offset") == 1 and len(names) == 5
    with torch.no_grad():
        model.shared["default"].offset.fill_(0.25)
        for m in layers.values():
            m.g.fill_(0.5)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    keys = set(read_adapter(tmp_path / "a")[2])
    assert {"shared_offset", "shared_fixed"} <= keys and len(keys) == 6
    torch.testing.assert_close(output(st.load(tiny_llama(), tmp_path / "a"), ids), adapted, atol=0, rtol=0)
    model.delete("default")
    assert not len(model.shared)


def test_step_reaches_active_adapters_only_and_regularizer_sums(hooks):
    model = st.attach(tiny_llama(), hooks(targets=["q_proj"], penalty=2.0), name="a")
    model.add(hooks(targets=["v_proj"]), name="b")
    model.step(7)
    assert STEPS == [("a", 7, False)]
    model.use(["a", "b"])
    model.step(8, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    assert STEPS[1:] == [("a", 8, True), ("b", 8, True)]
    assert model.regularization_loss().item() == pytest.approx(2.0)  # b has no regulariser
    model.use("b")
    assert model.regularization_loss() is None


def test_st_trainer_calls_step_after_every_optimizer_step_and_adds_the_regularizer(hooks, tmp_path):
    from slimtune.train import train
    from slimtune.train.metrics import read_metrics

    tiny_llama_dir(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", text_rows(24))
    cfg = {"model": {"name": str(tmp_path / "llama")},
           "method": {"method": "test_hooks", "targets": ["q_proj"], "penalty": 100.0},
           "data": {"task": "causal_lm", "train": str(tmp_path / "lm.jsonl"), "max_length": 32, "eval_size": 4},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "eval_before": False},
           "output_dir": str(tmp_path / "run")}
    train(cfg)
    assert [s[1:] for s in STEPS] == [(1, True), (2, True), (3, True)]
    assert GRADS == [True] * 3  # called before zero_grad
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r.get("split", "train") == "train"]
    assert len(losses) == 3 and all(loss > 100 for loss in losses)  # LM loss ~7 plus the penalty


def test_hf_trainer_callback_calls_step(hooks, tmp_path, ids):
    import transformers

    from slimtune.train import SlimtuneCallback

    model = st.attach(tiny_llama(), hooks(targets=["q_proj"]))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                                          remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SlimtuneCallback()]).train()
    assert [s[1:] for s in STEPS] == [(1, True), (2, True)]
    assert GRADS == [True] * 2  # on_optimizer_step: before HF Trainer zeroes the gradients


# -- data-dependent selections --------------------------------------------------------------------------
SEEN: list[list[dict]] = []


@dataclass
class DataConfig(MethodConfig):
    pass


class DataMethod(Method):
    """Selects the q_proj weight of layer 0; records the calibration batches it was given."""

    name, config, shape, category, mergeable, needs_data = "test_data", DataConfig, "selective", "test", True, True

    def select(self, model, cfg, targets, init=True, data=None):
        SEEN.append(list(data) if data is not None else None)
        return [st.methods.Selection("model.layers.0.self_attn.q_proj.weight")]


@pytest.fixture
def data_method():
    register(DataMethod)
    SEEN.clear()
    yield DataConfig
    METHODS.pop("test_data")
    _CONFIG_CLASSES.pop("test_data")


def test_methods_that_need_data_get_the_batches_and_say_so_without_them(data_method, ids):
    with pytest.raises(st.ConfigError, match=r"calibration batches.*data=batches"):
        st.attach(tiny_llama(), data_method())
    batches = [{"input_ids": ids, "labels": ids}]
    model = st.attach(tiny_llama(), data_method(), data=batches)
    assert SEEN == [batches]
    assert list(model.view("default").selections) == ["model.layers.0.self_attn.q_proj.weight"]


def test_slimtune_train_passes_its_first_training_batches(data_method, tmp_path):
    from slimtune.train import train

    tiny_llama_dir(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", text_rows(24))
    cfg = {"model": {"name": str(tmp_path / "llama")}, "method": {"method": "test_data"},
           "data": {"task": "causal_lm", "train": str(tmp_path / "lm.jsonl"), "max_length": 32, "eval_size": 4},
           "train": {"max_steps": 1, "batch_size": 4, "calibration_batches": 3, "lr": 1e-3, "progress": False,
                     "eval_before": False},
           "output_dir": str(tmp_path / "run")}
    train(cfg)
    assert len(SEEN) == 1 and len(SEEN[0]) == 3
    assert all(b["input_ids"].shape[0] == 4 and "labels" in b and "attention_mask" in b for b in SEEN[0])
