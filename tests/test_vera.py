"""Properties of VeRA on tiny Llama / GPT-2 / BERT models: shared projections, saving, HF PEFT interop both ways."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer
from slimtune.methods.vera import VeraConfig, projections
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, randomize, tiny_bert, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32, logits ~ O(1): merged vs unmerged, PEFT vs ours (absolute)
W_TOL = 1e-6  # unmerge: weights after W + delta - delta
ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"],
           "bert": ["query", "value", "intermediate.dense"]}


def make(arch: str, **extra):
    return MODELS[arch](), VeraConfig(r=8, targets=TARGETS[arch], **extra)


def layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def scramble(model, seed: int = 1) -> None:
    """d and b ~ N(0, 0.5^2): non-trivial, so merge / save checks cannot pass because b = 0."""
    randomize(model, scale=0.5, seed=seed)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("arch", TARGETS)
def test_identity_at_init(arch, ids):
    base, cfg = make(arch)
    ref = output(base, ids)
    model = st.attach(base, cfg)
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", TARGETS)
def test_projections_are_shared_sized_to_the_largest_target_and_vectors_have_peft_shapes(arch):
    model = st.attach(*make(arch, d_initial=0.05))
    found = layers(model)
    d_in_max = max(features(m.base_layer)[0] for m in found.values())
    d_out_max = max(features(m.base_layer)[1] for m in found.values())
    shared = model.shared["default"]
    assert tuple(shared.A.shape) == (8, d_in_max) and tuple(shared.B.shape) == (d_out_max, 8)
    assert not any(p.requires_grad for p in shared.buffers())
    for name, layer in found.items():
        d_in, d_out = features(layer.base_layer)
        adapter = layer.adapters["default"]
        assert set(adapter.state_dict()) == {"d", "b"}, name  # the projections are not per layer
        assert torch.equal(adapter.d, torch.full((8,), 0.05)) and torch.equal(adapter.b, torch.zeros(d_out)), name
        A, B = adapter.projections()
        assert A.data_ptr() == shared.A.data_ptr() and B.data_ptr() == shared.B.data_ptr(), name  # slices, no copy
        assert tuple(A.shape) == (8, d_in) and tuple(B.shape) == (d_out, 8), name


def test_forward_and_delta_weight_are_the_formula_on_one_layer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)
    model = st.attach(net, VeraConfig(r=4, targets=["0", "1"], projection_prng_key=3))
    scramble(model)
    A, B = projections(4, 6, 5, key=3)  # sized to max d_in = 6, max d_out = 5
    a0, a1 = model.model[0].adapters["default"], model.model[1].adapters["default"]
    h = model.model[0].base_layer(x) + a0.b * ((a0.d * (x @ A.T)) @ B.T)
    expected = model.model[1].base_layer(h) + a1.b * ((a1.d * (h @ A[:, :5].T)) @ B[:3].T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    delta = torch.diag(a1.b) @ B[:3] @ torch.diag(a1.d) @ A[:, :5]
    torch.testing.assert_close(a1.delta_weight(model.model[1].base_layer), delta, atol=1e-7, rtol=1e-6)


def test_projections_match_peft_bit_for_bit():
    from peft.tuners.vera.model import _kaiming_init

    for key in (0, 7, 2**40):
        g = torch.Generator(device="cpu").manual_seed(key)
        A, B = projections(16, 64, 128, key)
        assert torch.equal(A, _kaiming_init((16, 64), generator=g)) and torch.equal(B, _kaiming_init((128, 16), g))
    assert not torch.equal(projections(16, 64, 128, 0)[0], projections(16, 64, 128, 1)[0])


_CHILD = """
import hashlib, torch, slimtune as st
from slimtune.methods.vera import VeraConfig
from tests.conftest import tiny_llama
m = st.attach(tiny_llama(), VeraConfig(r=8, targets=["q_proj", "v_proj", "up_proj"], projection_prng_key=1234))
for t in (m.shared["default"].A, m.shared["default"].B):
    print(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())
"""


def test_regenerated_projections_are_bit_identical_in_another_process():
    torch.manual_seed(99)  # the global RNG state must not matter
    model = st.attach(tiny_llama(), VeraConfig(r=8, targets=["q_proj", "v_proj", "up_proj"], projection_prng_key=1234))
    ours = [digest(model.shared["default"].A), digest(model.shared["default"].B)]
    child = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ours


@pytest.mark.parametrize("arch", TARGETS)
def test_merge_matches_unmerged_and_unmerge_restores_weights(arch, ids):
    base, cfg = make(arch)
    model = st.attach(base, cfg)
    scramble(model)
    adapted = output(model, ids)
    with model.disabled():
        assert not torch.allclose(output(model, ids), adapted, atol=1e-3)  # the adapter does something
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    after = base_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(".weight"))
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


def test_param_count_of_one_layer_is_r_plus_d_out():
    for d_in, d_out, r in ((7, 5, 3), (5, 9, 16)):
        model = st.attach(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)), VeraConfig(r=r, targets=["0"]))
        assert sum(p.numel() for _, p in model.trainable_parameters()) == r + d_out


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", TARGETS)
def test_param_count_is_r_plus_d_out_per_target(arch, save_projection):
    model = st.attach(*make(arch, save_projection=save_projection))
    found = layers(model)
    expected = sum(8 + features(m.base_layer)[1] for m in found.values())
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    shared = model.shared["default"]
    saved = expected + (shared.A.numel() + shared.B.numel() if save_projection else 0)  # A and B once, if saved
    assert model.adapter_parameter_count("default") == saved


@pytest.mark.parametrize("format", ["slimtune", "peft"])
def test_without_save_projection_the_file_holds_no_projections_and_loading_regenerates_them(format, ids, tmp_path):
    model = st.attach(tiny_llama(), VeraConfig(r=8, targets=TARGETS["llama"], save_projection=False,
                                               projection_prng_key=42))
    scramble(model)
    adapted = output(model, ids)
    model.save(tmp_path, format=format)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(k.endswith((".vera_lambda_d", ".vera_lambda_b")) for k in keys)
    assert len(keys) == 2 * len(layers(model))
    loaded = st.load(tiny_llama(), tmp_path)
    assert torch.equal(loaded.shared["default"].A, model.shared["default"].A)
    assert torch.equal(loaded.shared["default"].B, model.shared["default"].B)
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("format", ["slimtune", "peft"])
def test_with_save_projection_the_file_holds_them_once_and_loading_uses_them(format, ids, tmp_path):
    model = st.attach(tiny_llama(), VeraConfig(r=8, targets=TARGETS["llama"]))
    scramble(model)
    with torch.no_grad():  # projections the seed cannot give back: loading must take the file's
        model.shared["default"].A.mul_(-1.5)
        model.shared["default"].B.add_(0.25)
    adapted = output(model, ids)
    model.save(tmp_path, format=format)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    projection_keys = [k for k in tensors if "vera_A" in k or "vera_B" in k]
    assert sorted(projection_keys) == ["base_model.vera_A", "base_model.vera_B"]
    assert len(tensors) == 2 * len(layers(model)) + 2
    assert torch.equal(tensors["base_model.vera_A"], model.shared["default"].A)
    loaded = st.load(tiny_llama(), tmp_path)
    assert torch.equal(loaded.shared["default"].A, model.shared["default"].A)
    assert torch.equal(loaded.shared["default"].B, model.shared["default"].B)
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)


def test_file_missing_its_projections_is_refused(tmp_path):
    model = st.attach(tiny_llama(), VeraConfig(r=8, targets=["q_proj"]))
    model.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.vera_B"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(st.AdapterLoadError, match="missing, first 'vera_B'"):
        st.load(tiny_llama(), tmp_path)


def test_two_vera_adapters_keep_their_own_projections_and_merge_with_lora(ids):
    model = st.attach(tiny_llama(), VeraConfig(r=8, targets=["q_proj", "v_proj"], projection_prng_key=1))
    model.add(VeraConfig(r=4, targets=["v_proj", "down_proj"], projection_prng_key=2), name="other")
    model.add(st.LoraConfig(r=4, targets=["v_proj"]), name="lora")
    scramble(model)
    a, b = model.shared["default"], model.shared["other"]
    assert tuple(a.A.shape) == (8, 64) and tuple(b.A.shape) == (4, 128) and tuple(b.B.shape) == (64, 4)
    assert not torch.equal(a.A[:4, :64], b.A[:, :64])
    model.use(["default", "other", "lora"])
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    model.delete("other")
    assert set(model.shared) == {"default"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_adapter_alone(arch, ids):
    base, cfg = make(arch)
    model = st.attach(base, cfg, name="a")
    model.add(cfg.replace(projection_prng_key=5), name="b")
    model.add(cfg.replace(r=4, targets=TARGETS[arch][:1]), name="c")  # another r: its own row group
    scramble(model, seed=3)
    names = ["a", "b", None, "c", "a", "b"]
    batch = torch.cat([ids, ids.flip(0)])
    mixed = assert_rows_match_alone(model, batch, names, atol=TOL)
    with model.disabled():
        assert not torch.allclose(mixed[:1], output(model, batch[:1]), atol=1e-3)


def test_adapter_follows_the_base_dtype():
    base = tiny_llama().to(torch.bfloat16)
    model = st.attach(base, VeraConfig(r=8, targets=["q_proj", "up_proj"]))
    shared = model.shared["default"]
    assert shared.A.dtype == shared.B.dtype == torch.bfloat16
    assert torch.equal(shared.A, projections(8, 64, 128, 0)[0].to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for _, p in model.trainable_parameters())
    scramble(model)
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    assert output(model, ids).dtype == torch.bfloat16


def test_training_lowers_the_loss():
    model = st.attach(tiny_llama(), VeraConfig(r=32, targets=["q_proj", "v_proj", "up_proj", "down_proj"]))
    data = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05, losses[::5]


# -- HF PEFT interop --------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning",
                                        "ignore:fan_in_fan_out is set to False:UserWarning")

PEFT_CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def _scramble_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, save_projection, ids, tmp_path):
    make_base, kwargs = PEFT_CASES[case]
    pm = peft.get_peft_model(make_base(), peft.VeraConfig(r=16, projection_prng_key=11, d_initial=0.05,
                                                          save_projection=save_projection, **kwargs))
    _scramble_peft(pm)
    pm.eval()
    expected = output(pm, ids)
    pm.save_pretrained(tmp_path)
    ours = st.load(make_base(), tmp_path)
    cfg = ours.configs["default"]
    assert (cfg.method, cfg.r, cfg.projection_prng_key, cfg.d_initial, cfg.save_projection) == \
        ("vera", 16, 11, 0.05, save_projection)
    assert torch.equal(ours.shared["default"].A, pm.base_model.vera_A["default"])
    assert torch.equal(ours.shared["default"].B, pm.base_model.vera_B["default"])
    torch.testing.assert_close(output(ours, ids), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_format_export_loads_in_peft_with_same_outputs(case, save_projection, ids, tmp_path):
    make_base = PEFT_CASES[case][0]
    model = st.attach(make_base(), VeraConfig(r=16, targets=TARGETS[case], projection_prng_key=3,
                                              save_projection=save_projection))
    scramble(model)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(peft.VeraConfig().to_dict()), "exactly PEFT's VeraConfig fields"
    assert written["peft_type"] == "VERA" and written["fan_in_fan_out"] == (case == "gpt2")
    assert written["save_projection"] is save_projection and written["projection_prng_key"] == 3
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    assert torch.equal(pm.base_model.vera_A["default"], model.shared["default"].A)
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_tensor_keys_and_shapes_match_peft_exactly(save_projection, tmp_path):
    make_base, kwargs = PEFT_CASES["gpt2"]
    peft.get_peft_model(make_base(), peft.VeraConfig(r=8, save_projection=save_projection, **kwargs)).save_pretrained(
        tmp_path / "peft")
    st.attach(make_base(), VeraConfig(r=8, targets=TARGETS["gpt2"], save_projection=save_projection)).save(
        tmp_path / "ours", format="peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k  # same init: d = 0.1, b = 0, same projections


def test_bias_of_the_wrapped_modules_round_trips_through_peft(ids, tmp_path):
    model = st.attach(tiny_gpt2(), VeraConfig(r=8, targets=TARGETS["gpt2"], bias="vera_only"))
    scramble(model)
    biases = [(n, p) for n, p in model.trainable_parameters() if n.startswith("selections.")]
    assert len(biases) == len(layers(model)) == 6 and all("c_fc" not in n for n, _ in biases)
    with torch.no_grad():
        for _, p in biases:
            p.add_(0.2)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=TOL)
    torch.testing.assert_close(output(st.load(tiny_gpt2(), tmp_path), ids), ours, atol=0, rtol=0)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, bad", [("r", 0), ("r", 2.0), ("r", True), ("d_initial", 0), ("d_initial", "0.1"),
                                        ("d_initial", float("nan")), ("projection_prng_key", 1.5),
                                        ("projection_prng_key", 2**64), ("save_projection", "yes"),
                                        ("dropout", 1.0), ("dropout", -0.1), ("bias", "lora_only")])
def test_bad_field_names_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"VeraConfig.{field}={bad!r}: expected")):
        VeraConfig(targets=["q_proj"], **{field: bad})


def test_peft_field_names_get_a_hint_and_other_modules_are_refused():
    with pytest.raises(st.ConfigError, match="Did you mean 'dropout'"):
        st.config_from_dict({"method": "vera", "targets": ["q_proj"], "vera_dropout": 0.1})
    with pytest.raises(NotImplementedError, match=r"VeRA on model.embed_tokens \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), VeraConfig(targets=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match=r"\(Conv2d\) is not implemented"):
        st.attach(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)), VeraConfig(targets=["0"]))
    base = tiny_bert()
    with pytest.raises(NotImplementedError):
        st.attach(base, VeraConfig(targets=["query", "word_embeddings"]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())  # a failed attach leaves the model as it was
