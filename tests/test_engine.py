"""The engine: method-free engine files, the base-layer registry, transactional add, the six
regressions of issue 7, and the diagnosis of bad adapter files."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.bases import BASE_KINDS, BaseKind, base_kind, kind_of, register_base, sizes, weight_2d
from slimtune.errors import AdapterLoadError, AdapterSaveError, ConfigError
from slimtune.io import CONFIG_NAME, WEIGHTS_NAME, atomic_save_safetensors, read_safetensors
from slimtune.layer import AdapterLayer
from slimtune.methods import METHODS
from tests.conftest import output, randomize, tiny_gpt2, tiny_llama

SLIMTUNE = Path(st.__file__).parent
ENGINE = ["io.py", "tuned.py", "layer.py", "composition.py", "targets.py", "config.py", "bases.py", "selection.py",
          "adapter_files.py"]


# -- structure ------------------------------------------------------------------------------------------
def test_engine_files_name_no_method():
    words = set(METHODS) | {"lora", "dora", "pissa", "olora", "ia3", "prompt", "bitfit"}
    pattern = re.compile(r"(?<![a-z])(" + "|".join(sorted(words)) + r")(?![a-z])", re.IGNORECASE)
    for name in ENGINE:
        text = (SLIMTUNE / name).read_text()
        text = re.sub(r'""".*?"""', "", text, flags=re.DOTALL)  # examples in docstrings may show a config
        hits = [m.group(0) for m in pattern.finditer(text)]
        assert not hits, f"{name} names methods: {hits}"


def test_io_depends_on_nothing_model_side():
    tree = ast.parse((SLIMTUNE / "io.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("slimtune")} == {"slimtune.errors"}


def test_every_method_says_its_shape():
    shapes = {name: info.shape for name, info in METHODS.items()}
    assert shapes["lora"] == "layer" and shapes["prompt_tuning"] == "input" and shapes["bitfit"] == "selective"
    assert set(shapes.values()) <= {"layer", "input", "selective"}


# -- the base-layer registry ------------------------------------------------------------------------------
def test_registry_reads_every_kind_in_out_by_in_layout():
    from transformers.pytorch_utils import Conv1D

    conv1d = Conv1D(6, 4)  # d_out=6, d_in=4, stored (4, 6)
    cases = [(nn.Linear(4, 6), (4, 6)), (conv1d, (4, 6)), (nn.Embedding(10, 6), (10, 6)),
             (nn.Conv2d(3, 6, 3), (3, 6))]
    for module, expected in cases:
        assert sizes(module) == expected
        W = kind_of(module).weight(module)
        assert W.shape[:2] == (expected[1], expected[0] if not isinstance(module, nn.Conv2d) else 3)
    assert torch.equal(kind_of(conv1d).weight(conv1d), conv1d.weight.T)
    assert weight_2d(nn.Conv2d(3, 6, 3)).shape == (6, 27)
    assert base_kind(nn.LayerNorm(4)) is None
    with pytest.raises(TypeError, match="cannot wrap LayerNorm"):
        kind_of(nn.LayerNorm(4))


class Int8Linear(nn.Module):
    """A toy quantized linear: int8 codes and one scale per output row, dequantized in forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        W = linear.weight.detach()
        self.register_buffer("scale", W.abs().amax(1, keepdim=True) / 127)
        self.register_buffer("codes", torch.round(W / self.scale).to(torch.int8))
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(), self.bias)


class Int8Kind(BaseKind):
    name, types, linear = "int8_linear", (Int8Linear,), True

    def weight(self, module):
        return module.dequantized()

    def write_weight(self, module, value):
        module.codes.copy_(torch.round(value / module.scale).clamp(-127, 127).to(torch.int8))

    def adapter_dtype(self, module):
        return torch.float32

    def device(self, module):
        return module.codes.device


@pytest.fixture
def int8_kind():
    kind = register_base(Int8Kind(), first=True)
    yield kind
    BASE_KINDS.remove(kind)


def test_a_new_base_kind_needs_no_method_change(int8_kind, ids):
    """What a quantized Linear will do: register a kind; LoRA and DoRA work on it untouched."""
    base = tiny_llama()
    for layer in base.model.layers:
        layer.self_attn.q_proj = Int8Linear(layer.self_attn.q_proj)
    for cfg in (st.LoraConfig(r=2, targets="all-linear"), st.DoraConfig(r=2, targets=["q_proj"])):
        model = st.attach(base, cfg)
        assert any(isinstance(m.base_layer, Int8Linear) for m in model.modules() if isinstance(m, AdapterLayer))
        randomize(model)
        with model.disabled():
            ref = output(model, ids)
        adapted = output(model, ids)
        assert not torch.allclose(adapted, ref)
        base = model.detach()


# -- transactional add ----------------------------------------------------------------------------------
def test_failed_add_leaves_the_model_exactly_as_before_with_a_clear_error(ids):
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = st.attach(base, st.LoraConfig(r=2, targets=["v_proj"]), name="first")
    with pytest.raises(ConfigError) as err:
        model.add(st.LoraConfig(r=100, init="pissa", targets=["q_proj", "v_proj"]), name="big")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "d_in=64" in message and "r=100" in message
    assert list(model.configs) == ["first"]
    assert all(list(m.adapters) == ["first"] for m in model.modules() if isinstance(m, AdapterLayer))
    assert not any(".big." in n for n, _ in model.named_parameters())
    state = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if ".adapters." not in k}
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


# -- issue 7's six bugs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_disabled_and_detach_give_the_base_for_residual_inits(init, make, ids):
    ref = output(make(), ids)
    model = st.attach(make(), st.LoraConfig(r=4, init=init, targets="all-linear"))
    randomize(model)
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=1e-4, rtol=0)
    model.add(st.LoraConfig(r=2, targets=["v_proj"] if make is tiny_llama else ["c_fc"]), name="other")
    model.use("other")  # the residual adapter is attached but inactive: the others see the base
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=1e-4, rtol=0)
    routed = output(model, ids, adapter_names=[None, None, None])
    torch.testing.assert_close(routed, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(output(model.detach(), ids), ref, atol=1e-4, rtol=0)


def test_lora_fa_on_an_embedding_learns(ids):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["embed_tokens"], freeze_A=True))
    before = output(model, ids)
    train_steps(model, ids, steps=1)
    assert (output(model, ids) - before).abs().max() > 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_on_embedding_and_conv_save_and_load(init, tmp_path):
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(50, 16))
    base_weights = {k: v.clone() for k, v in emb.state_dict().items()}
    x = torch.randint(0, 50, (2, 5))
    model = st.attach(emb, st.LoraConfig(r=3, init=init, targets=["0"]))
    randomize(model)
    adapted = model(x)
    model.save(tmp_path / "emb")
    fresh = nn.Sequential(nn.Embedding(50, 16))
    fresh.load_state_dict(base_weights)
    torch.testing.assert_close(st.load(fresh, tmp_path / "emb")(x), adapted, atol=1e-5, rtol=1e-5)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    base_weights = {k: v.clone() for k, v in conv.state_dict().items()}
    img = torch.randn(2, 3, 9, 9)
    model = st.attach(conv, st.LoraConfig(r=3, init=init, targets=["0"]))
    randomize(model)
    adapted = model(img)
    model.save(tmp_path / "conv")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    fresh.load_state_dict(base_weights)
    torch.testing.assert_close(st.load(fresh, tmp_path / "conv")(img), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [["lora", "dora"], ["dora", "lora"]])
def test_lora_and_dora_active_on_one_layer_merge_equals_unmerged(order, ids):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="lora")
    model.add(st.DoraConfig(r=4, targets=["q_proj", "o_proj"]), name="dora")
    randomize(model)
    model.use(order)
    unmerged = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)


# (the sixth, stray trainable biases after use(), is tests/test_bitfit.py::test_lora_bias_option_switching...)


def train_steps(model, ids, steps: int) -> None:
    model.train()
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=1.0)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# -- bad adapter files ----------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(tmp_path):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    model.save(tmp_path / "a")
    return tmp_path / "a"


def _rewrite(folder: Path, change) -> None:
    tensors = read_safetensors(folder / WEIGHTS_NAME)
    change(tensors)
    atomic_save_safetensors(tensors, folder / WEIGHTS_NAME)


def test_zero_size_tensor_is_diagnosed_as_an_ungathered_zero3_save(saved_adapter):
    def empty(t):
        key = next(k for k in t if k.endswith("lora_A.weight"))
        t[key] = torch.zeros(0)
    _rewrite(saved_adapter, empty)
    with pytest.raises(AdapterLoadError, match="empty.*ZeRO-3") as err:
        st.load(tiny_llama(), saved_adapter)
    assert "another base" not in str(err.value)


def test_config_rank_disagreeing_with_its_tensors_is_an_inconsistent_file(saved_adapter):
    raw = json.loads((saved_adapter / CONFIG_NAME).read_text())
    raw["config"]["r"] = 8
    (saved_adapter / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(AdapterLoadError, match="inconsistent adapter file") as err:
        st.load(tiny_llama(), saved_adapter)
    assert "another base" not in str(err.value)


def test_another_base_is_still_reported_as_another_base(saved_adapter):
    with pytest.raises(AdapterLoadError, match="another base"):
        st.load(tiny_llama(hidden_size=32, intermediate_size=64), saved_adapter)


def test_nan_tensors_are_refused_by_name_unless_allowed(saved_adapter, ids):
    key = []

    def poison(t):
        key.append(next(k for k in t if k.endswith("lora_B.weight")))
        t[key[0]][0, 0] = float("nan")
    _rewrite(saved_adapter, poison)
    base = tiny_llama()
    with pytest.raises(AdapterLoadError, match="NaN/inf") as err:
        st.load(base, saved_adapter)
    assert key[0].removeprefix("base_model.model.") in str(err.value)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())  # nothing left half-attached
    model = st.load(base, saved_adapter, allow_nonfinite=True)
    loaded = model.adapter_state_dict()[key[0]]
    assert torch.isnan(loaded[0, 0]) and torch.isfinite(loaded.flatten()[1:]).all()


def test_saving_onto_an_existing_file_is_a_slimtune_error(tmp_path):
    model = st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"]))
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(AdapterSaveError, match="existing file"):
        model.save(tmp_path / "taken")
    with pytest.raises(AdapterSaveError, match="is a file"):
        model.save(tmp_path / "taken" / "inside")
    assert (tmp_path / "taken").read_text() == "not a folder"



def test_merging_beside_an_idle_residual_init_keeps_outputs(ids):
    """(IA)3 scales the base weight when merged; an idle PiSSA adapter on the same layer first gives
    the base back its principal part, so the scaled weight is the original one."""
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, init="pissa", targets=["v_proj"]), name="pissa")
    model.add(st.IA3Config(targets=["v_proj", "down_proj"], feedforward=["down_proj"]), name="ia3")
    randomize(model)
    model.use("ia3")
    unmerged = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    model.merge()
    plain = model.detach(merge=True)
    torch.testing.assert_close(output(plain, ids), unmerged, atol=1e-5, rtol=1e-4)


def test_selected_bias_and_output_scaling_on_one_layer_merge_equals_unmerged(ids):
    model = st.attach(tiny_gpt2(), st.BitFitConfig(), name="bitfit")
    model.add(st.IA3Config(targets=["c_attn"]), name="ia3")
    randomize(model)
    with torch.no_grad():
        for entries in model.selections["bitfit"].values():
            entries.values.add_(0.1)
    model.use(["bitfit", "ia3"])
    unmerged = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)


def test_new_adapters_follow_the_models_train_or_eval_mode(ids):
    model = st.attach(tiny_llama(), st.LoraConfig(r=2, targets=["q_proj"], dropout=0.5))  # the base is in eval
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(output(model, ids), output(model, ids), atol=0, rtol=0)  # no dropout
    model.train()
    model.add(st.LoraConfig(r=2, targets=["v_proj"], dropout=0.5), name="second")
    assert all(m.training for m in model.modules())

