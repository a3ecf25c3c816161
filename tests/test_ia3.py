"""Properties of (IA)3 on tiny Llama / GPT-2 / BERT models, and HF PEFT interop both ways."""

from __future__ import annotations

import json
import re

import pytest
import torch

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer
from slimtune.methods.ia3 import IA3Config
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, randomize, tiny_bert, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32, logits ~ O(1): merged vs unmerged, PEFT vs ours (absolute)
W_TOL = 1e-6  # unmerge: weights and biases divided back by the merged scales
FFN_OUT = r".*\.layer\.\d+\.output\.dense"  # BERT's feed-forward output, not attention.output.dense
SPECS = {  # targets, feedforward: PEFT's default (IA)3 targets; BERT's feed-forward narrowed to the FFN output
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], FFN_OUT),
}
FF_NAMES = {"llama": r".*\.mlp\.down_proj", "gpt2": r".*\.mlp\.c_proj", "bert": FFN_OUT}  # wrapped names that are FF


def with_biases(model):
    """Non-zero biases (GPT-2 and BERT start them at 0), so that scaling them is seen."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make(arch: str, **extra):
    targets, feedforward = SPECS[arch]
    return with_biases(MODELS[arch]()), IA3Config(targets=targets, feedforward=feedforward, **extra)


def is_ff(arch: str, name: str) -> bool:
    return re.fullmatch(FF_NAMES[arch], name) is not None


def scramble(model, seed: int = 1) -> None:
    """Vectors l = 1 + 0.1 * N(0, 1): non-trivial, so merge / save checks cannot pass because l = 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and name.endswith(".l"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("arch", SPECS)
def test_identity_at_init(arch, ids):
    base, cfg = make(arch)
    ref = output(base, ids)
    model = st.attach(base, cfg)
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", SPECS)
def test_vectors_have_peft_shapes_and_feedforward_scales_the_input(arch):
    model = st.attach(*make(arch))
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    assert any(is_ff(arch, n) for n in layers) and any(not is_ff(arch, n) for n in layers)
    for name, layer in layers.items():
        d_in, d_out = features(layer.base_layer)
        adapter = layer.adapters["default"]
        assert adapter.transforms_input == is_ff(arch, name), name
        assert tuple(adapter.l.shape) == ((1, d_in) if is_ff(arch, name) else (d_out, 1)), name


def test_forward_is_the_formula_on_one_layer():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    x = torch.randn(2, 5)
    model = st.attach(lin, IA3Config(targets=["0", "1"], feedforward=["1"]))
    scramble(model)
    l0 = model.model[0].adapters["default"].l.detach().view(-1)
    l1 = model.model[1].adapters["default"].l.detach().view(-1)
    expected = model.model[1].base_layer(l1 * (l0 * model.model[0].base_layer(x)))
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", SPECS)
def test_merge_matches_unmerged_and_unmerge_restores_weights_and_biases(arch, ids):
    base, cfg = make(arch)
    model = st.attach(base, cfg)
    scramble(model)
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    after = base_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(".weight"))
    if arch != "llama":  # scaled biases of the output-side targets
        assert any(not torch.equal(after[n], before[n]) for n in before if n.endswith(".bias"))
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


def test_unmerge_restores_slices_whose_scale_is_zero(ids):
    model = st.attach(tiny_gpt2(), IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]))
    scramble(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".l"):
                p.view(-1)[:3] = 0
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)


@pytest.mark.parametrize("arch", SPECS)
def test_param_count_is_d_out_or_d_in_on_feedforward_targets(arch):
    base, cfg = make(arch)
    model = st.attach(base, cfg)
    expected = 0
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)):
        d_in, d_out = features(layer.base_layer)
        expected += d_in if is_ff(arch, name) else d_out
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("order", [["default", "lora"], ["lora", "default"]])
def test_with_lora_on_the_same_layers_merged_equals_unmerged(order, ids):
    model = st.attach(tiny_llama(), IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]))
    model.add(st.LoraConfig(r=4, targets=["v_proj", "down_proj"]), name="lora")
    randomize(model)  # LoRA's A and B
    scramble(model)  # (IA)3's l
    model.use(order)
    adapted = output(model, ids)
    with model.disabled():
        assert not torch.allclose(output(model, ids), adapted, atol=1e-3)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_adapter_alone(arch, ids):
    base, cfg = make(arch)
    model = st.attach(base, cfg, name="a")
    model.add(cfg, name="b")
    model.add(st.LoraConfig(r=2, targets=SPECS[arch][0][:1]), name="c")
    randomize(model, seed=3)  # LoRA's A and B
    scramble(model, seed=5)  # l of "a" and of "b"
    names = ["a", "b", None, "c", "a", "b"]
    batch = torch.cat([ids, ids.flip(0)])
    mixed = assert_rows_match_alone(model, batch, names, atol=TOL)
    with model.disabled():
        assert not torch.allclose(mixed[:1], output(model, batch[:1]), atol=1e-3)


def test_training_lowers_the_loss():
    model = st.attach(tiny_llama(), IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]))
    data = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=30, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses[::5]


# -- HF PEFT interop --------------------------------------------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                             fan_in_fan_out=True)),
    "bert": (tiny_bert, dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                             task_type="SEQ_CLS")),
}
EXPORT_CASES = {
    "llama": (tiny_llama, IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])),
    "llama_no_ff": (tiny_llama, IA3Config(targets=["k_proj", "down_proj"])),  # PEFT's default would make down_proj FF
    "gpt2": (tiny_gpt2, IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"])),
    "bert": (tiny_bert, IA3Config(targets=["key", "value", "output.dense"], feedforward=FFN_OUT,
                                  modules_to_save=["classifier"])),
    "bert_dense": (tiny_bert, IA3Config(targets=["key", "value", "dense"], feedforward=FFN_OUT,  # leaves: all dense
                                        modules_to_save=["classifier"])),
    "all_ff": (tiny_llama, IA3Config(targets="all-linear", feedforward=True, layers=[1])),
}


def _scramble_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, ids, tmp_path):
    make_base, kwargs = PEFT_CASES[case]
    pm = peft.get_peft_model(with_biases(make_base()), peft.IA3Config(**kwargs))
    _scramble_peft(pm)
    pm.eval()
    expected = output(pm, ids)
    pm.save_pretrained(tmp_path)
    ours = st.load(with_biases(make_base()), tmp_path)
    assert ours.configs["default"].method == "ia3"
    torch.testing.assert_close(output(ours, ids), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_peft_format_export_loads_in_peft_with_same_outputs(case, ids, tmp_path):
    make_base, cfg = EXPORT_CASES[case]
    model = st.attach(with_biases(make_base()), cfg)
    scramble(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1)  # the trained classifier copy
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(peft.IA3Config().to_dict()), "exactly PEFT's IA3Config fields"
    assert written["peft_type"] == "IA3" and written["fan_in_fan_out"] == (case == "gpt2")
    pm = peft.PeftModel.from_pretrained(with_biases(make_base()), tmp_path).eval()
    peft_ff = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if getattr(m, "is_feedforward", 0)}
    ours_ff = {n.removeprefix("model.") for n, m in model.named_modules()
               if isinstance(m, AdapterLayer) and m.adapters["default"].transforms_input}
    assert peft_ff == ours_ff
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=TOL)


def test_bert_feedforward_export_names_full_modules(tmp_path):
    _, cfg = EXPORT_CASES["bert"]
    st.attach(tiny_bert(), cfg).save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["feedforward_modules"] == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert len(written["target_modules"]) == 8 and set(written["feedforward_modules"]) < set(written["target_modules"])


def test_export_where_one_target_name_ends_another(tmp_path):
    def stack():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(11)])

    model = st.attach(stack(), IA3Config(targets=["0", "10"], feedforward=["0"]))
    scramble(model)
    x = torch.randn(2, 4)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["feedforward_modules"] == "0"  # a regex: PEFT's suffix rule would take "10" as well
    pm = peft.PeftModel.from_pretrained(stack(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), atol=0, rtol=0)


def test_llama_export_uses_leaf_names_where_they_tell_feedforward_apart(tmp_path):
    _, cfg = EXPORT_CASES["llama"]
    st.attach(tiny_llama(), cfg).save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert written["feedforward_modules"] == ["down_proj"] and written["modules_to_save"] is None


def test_peft_tensor_keys_and_shapes_match_peft_exactly(tmp_path):
    from safetensors.torch import load_file

    make_base, kwargs = PEFT_CASES["gpt2"]
    peft.get_peft_model(make_base(), peft.IA3Config(**kwargs)).save_pretrained(tmp_path / "peft")
    st.attach(make_base(), IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"])).save(
        tmp_path / "ours", format="peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# -- bad input -----------------------------------------------------------------------------------
def test_feedforward_outside_the_targets_is_refused():
    with pytest.raises(st.ConfigError, match=r"IA3Config.feedforward=\['down_proj'\]: expected .*'down_proj'"):
        IA3Config(targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    IA3Config(targets=["mlp.down_proj", "k_proj"], feedforward=["down_proj"])  # names the same modules: fine


def test_feedforward_matching_no_target_module_is_refused_when_built():
    with pytest.raises(st.ConfigError, match=r"IA3Config.feedforward='down_proj\$': 'down_proj\$' matches none"):
        st.attach(tiny_llama(), IA3Config(targets=r".*\.(k|v)_proj", feedforward="down_proj$"))
    with pytest.raises(st.ConfigError, match=r"'c_fc' matches none of the 2 target modules"):
        st.attach(tiny_gpt2(), IA3Config(targets=r".*c_attn", feedforward=["c_fc"]))


@pytest.mark.parametrize("bad", [3, 1.5, [1], [""], [], "(unclosed", {"down_proj": 1}])
def test_feedforward_of_the_wrong_type_names_the_value(bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"IA3Config.feedforward={bad!r}: expected")):
        IA3Config(targets=["down_proj"], feedforward=bad)


def test_peft_field_name_gets_a_hint_and_embedding_is_refused():
    with pytest.raises(st.ConfigError, match="Did you mean 'feedforward'"):
        st.config_from_dict({"method": "ia3", "targets": ["k_proj"], "feedforward_modules": ["k_proj"]})
    with pytest.raises(NotImplementedError, match=r"ia3 on \S+ \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), IA3Config(targets=["embed_tokens"]))
