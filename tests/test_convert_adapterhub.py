"""AdapterHub interop: converted adapters give AdapterHub's own outputs, on committed fixtures.

tests/fixtures/adapterhub/ was written by bench/adapterhub/make_fixtures.py in a separate venv (adapters 1.3.0,
transformers 4.57.6): tiny random Llama / GPT-2 / BERT bases, AdapterHub adapters with random weights, and the
logits AdapterHub computed with them. Here only our own dependencies run: transformers 5 loads each base, we
convert its adapters and compare logits with AdapterHub's at atol 1e-5 (float32; measured differences ~1e-7).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import slimtune as st
from slimtune.cli import main
from slimtune.errors import AdapterLoadError, ConfigError
from slimtune.interop.adapterhub import convert_adapterhub
from slimtune.io import CONFIG_NAME
from slimtune.layer import AdapterLayer
from tests.conftest import output, randomize, tiny_gpt2, tiny_llama

ROOT = Path(__file__).parent / "fixtures" / "adapterhub"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
CASES = [(arch, name) for arch, entry in MANIFEST["models"].items() for name in entry["adapters"]]
ATOL = 1e-5  # float32; AdapterHub and slimtune compute the same ops, differences measured ~1e-7


def base_model(arch: str) -> torch.nn.Module:
    cls = getattr(transformers, MANIFEST["models"][arch]["class"])
    return cls.from_pretrained(str(ROOT / arch / "base")).eval()


def reference(arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(ROOT / arch / "reference.safetensors"))


def logits(model, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    return output(model, ref["input_ids"], attention_mask=ref["attention_mask"])


def converted(arch: str, name: str, tmp_path: Path, **kw) -> torch.nn.Module:
    convert_adapterhub(ROOT / arch / name, tmp_path / name, **kw)
    return st.load(base_model(arch), tmp_path / name)


def copy_fixture(arch: str, name: str, tmp_path: Path, **changes) -> Path:
    """A copy of a fixture folder with AdapterHub config fields changed."""
    folder = tmp_path / f"ah_{name}"
    shutil.copytree(ROOT / arch / name, folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        (raw if key in ("model_type",) else raw["config"])[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    return folder


# -- the same outputs as AdapterHub ---------------------------------------------------------------------------------
def test_fixtures_are_small_and_recorded_by_adapterhub_1_3():
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total < 2 * 2**20
    assert MANIFEST["adapters_version"] == "1.3.0" and MANIFEST["transformers_version"].startswith("4.57")


@pytest.mark.parametrize("arch", MANIFEST["models"])
def test_base_saved_by_transformers_4_57_is_the_same_model_in_5(arch):
    ref = reference(arch)
    torch.testing.assert_close(logits(base_model(arch), ref), ref["base"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,name", CASES)
def test_converted_adapter_gives_adapterhub_outputs(arch, name, tmp_path):
    ref = reference(arch)
    model = converted(arch, name, tmp_path)
    got = logits(model, ref)
    torch.testing.assert_close(got, ref[name], atol=ATOL, rtol=0)  # every position, the padded ones included
    assert (ref[name] - ref["base"]).abs().max() > 100 * ATOL  # the adapter does change the output


@pytest.mark.parametrize("arch,name,method,fields", [
    ("llama", "seq_bn", "bottleneck", {"placement": "pfeiffer", "reads": "residual", "layer_norm": "none"}),
    ("llama", "double_seq_bn", "bottleneck", {"placement": "houlsby", "reads": "sublayer", "non_linearity": "swish"}),
    ("bert", "par_bn", "bottleneck", {"placement": "parallel", "reads": "residual", "scaling": 4.0, "init": "mam"}),
    ("llama", "bn_options", "bottleneck", {"layer_norm": "both", "layers": [1], "non_linearity": "tanh"}),
    ("llama", "par_bn_learned", "bottleneck", {"scaling": "learned", "layer_norm": "before"}),
    ("gpt2", "compacter", "compacter", {"variant": "compacter", "reads": "sublayer", "shared_phm_rule": True}),
    ("llama", "compacter_unshared", "compacter", {"variant": "compacter++", "reads": "residual",
                                                  "shared_phm_rule": False}),
    ("gpt2", "prefix", "prefix_tuning", {"num_virtual_tokens": 4, "shift_positions": False}),
])
def test_field_mapping(arch, name, method, fields, tmp_path):
    done = convert_adapterhub(ROOT / arch / name, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert saved["config"]["method"] == method and done.config.method == method
    assert {k: saved["config"][k] for k in fields} == fields
    assert saved["converted_from"]["format"] == "adapterhub" and saved["converted_from"]["name"] == name
    assert saved["base_model_class"] == MANIFEST["models"][arch]["class"]


def test_residual_reading_is_what_makes_pfeiffer_match(tmp_path):
    """AdapterHub's SeqBn reads the stream after the residual add: our sublayer-reading placement differs."""
    ref = reference("bert")
    convert_adapterhub(ROOT / "bert" / "seq_bn", tmp_path / "out")
    path = tmp_path / "out" / CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["config"]["reads"] = "sublayer"
    path.write_text(json.dumps(raw))
    got = logits(st.load(base_model("bert"), tmp_path / "out"), ref)
    assert (got - ref["seq_bn"]).abs().max() > 1e-3


def test_prefix_positions_are_adapterhubs_not_shifted(tmp_path):
    """AdapterHub keeps real tokens at positions 0..; with GPT-2's absolute positions a shift changes outputs."""
    ref = reference("gpt2")
    convert_adapterhub(ROOT / "gpt2" / "prefix", tmp_path / "out")
    path = tmp_path / "out" / CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["config"]["shift_positions"] = True
    path.write_text(json.dumps(raw))
    assert (logits(st.load(base_model("gpt2"), tmp_path / "out"), ref) - ref["prefix"]).abs().max() > 1e-3


def test_unshifted_prefix_generates_the_same_with_and_without_cache(tmp_path):
    model = converted("gpt2", "prefix", tmp_path)
    prompt = reference("gpt2")["input_ids"][:1, :4]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(model.generate(prompt, use_cache=True, **kw),
                                   model.generate(prompt, use_cache=False, **kw), atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="shift_positions=False"):
        model.save(tmp_path / "peft", format="peft")


def test_saves_and_reloads_in_our_format(tmp_path):
    ref = reference("llama")
    model = converted("llama", "compacter_pp", tmp_path)
    model.save(tmp_path / "again")
    torch.testing.assert_close(logits(st.load(base_model("llama"), tmp_path / "again"), ref), ref["compacter_pp"],
                               atol=ATOL, rtol=0)


def test_base_given_matches_module_names_and_test_loads(tmp_path):
    """An adapter saved from BertForMaskedLM (keys bert.encoder...) converted for a bare BertModel (encoder...)."""
    bare = transformers.BertModel.from_pretrained(str(ROOT / "bert" / "base")).eval()
    convert_adapterhub(ROOT / "bert" / "seq_bn", tmp_path / "plain")
    with pytest.raises(AdapterLoadError, match="matches nothing"):
        st.load(transformers.BertModel.from_pretrained(str(ROOT / "bert" / "base")), tmp_path / "plain")
    convert_adapterhub(ROOT / "bert" / "seq_bn", tmp_path / "fitted", base=bare)
    raw = json.loads((tmp_path / "fitted" / CONFIG_NAME).read_text())
    assert raw["base_fingerprint"] and raw["base_model_class"] == "BertForMaskedLM"
    model = st.load(transformers.BertModel.from_pretrained(str(ROOT / "bert" / "base")).eval(), tmp_path / "fitted")
    assert "encoder.layer.0.output.dense" in [n for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)]


# -- files: safetensors, pickles read with weights_only, heads ------------------------------------------------------
def test_pickle_only_folder_is_read_with_weights_only(tmp_path, monkeypatch):
    assert sorted(os.listdir(ROOT / "llama" / "compacter")) == ["adapter_config.json", "pytorch_adapter.bin"]
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    done = convert_adapterhub(ROOT / "llama" / "compacter", tmp_path / "out")
    assert calls == [True] and done.source == "pytorch_adapter.bin"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious pytorch_adapter.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_code(writer, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(ROOT / "gpt2" / "seq_bn", folder)
    marker = tmp_path / "ran"
    payload = {"transformer.h.0.output_adapters.adapters.seq_bn.adapter_up.bias": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / "pytorch_adapter.bin")
    else:
        with open(folder / "pytorch_adapter.bin", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(AdapterLoadError, match=r"refused.*weights_only=True"):
        convert_adapterhub(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_of_something_else_than_tensors_is_refused(tmp_path):
    folder = copy_fixture("gpt2", "seq_bn", tmp_path)
    torch.save([torch.zeros(2)], folder / "pytorch_adapter.bin")
    with pytest.raises(AdapterLoadError, match="expected a mapping of names to tensors"):
        convert_adapterhub(folder, tmp_path / "out")


def test_safetensors_are_preferred_and_head_files_noted(tmp_path):
    done = convert_adapterhub(ROOT / "llama" / "seq_bn", tmp_path / "out")
    assert done.source == "adapter.safetensors"
    assert any("head" in note and "not converted" in note for note in done.notes)
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_flex_head_is_noted_as_not_converted(tmp_path):
    folder = copy_fixture("llama", "seq_bn", tmp_path)
    (folder / "head_config.json").write_text(json.dumps({"config": {"head_type": "classification"}}))
    done = convert_adapterhub(folder, tmp_path / "out")
    assert any("prediction head (classification" in note for note in done.notes)


@pytest.mark.parametrize("setup,match", [
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json not found"),
    (lambda f: [p.unlink() for p in f.glob("*adapter.*")], "neither adapter.safetensors nor pytorch_adapter.bin"),
    (lambda f: (f / "adapter_config.json").write_text(json.dumps({"slimtune_version": "0.1.0", "config": {}})),
     "already a slimtune adapter"),
    (lambda f: (f / "adapter_config.json").write_text(json.dumps({"config": "pfeiffer"})),
     "not an AdapterHub adapter config"),
])
def test_folder_problems_are_named(setup, match, tmp_path):
    folder = copy_fixture("gpt2", "double_seq_bn", tmp_path)
    setup(folder)
    with pytest.raises(AdapterLoadError, match=match):
        convert_adapterhub(folder, tmp_path / "out")


# -- configs our methods cannot express are refused, naming the field -------------------------------------------------
@pytest.mark.parametrize("arch,name,changes,match", [
    ("gpt2", "seq_bn", {"original_ln_after": False}, "original_ln_after=False"),
    ("gpt2", "seq_bn", {"residual_before_ln": False}, "residual_before_ln=False"),
    ("gpt2", "double_seq_bn", {"residual_before_ln": "post_add"}, "residual_before_ln='post_add'"),
    ("gpt2", "seq_bn", {"scaling": "channel"}, "scaling='channel'"),
    ("gpt2", "seq_bn", {"use_gating": True}, "use_gating=True"),
    ("gpt2", "seq_bn", {"inv_adapter": "nice"}, "inv_adapter='nice'"),
    ("gpt2", "seq_bn", {"non_linearity": "leakyrelu"}, "non_linearity='leakyrelu'"),
    ("gpt2", "seq_bn", {"reduction_factor": {"0": 4, "1": 8}}, "reduction_factor="),
    ("bert", "seq_bn_ln", {"adapter_residual_before_ln": True}, "adapter_residual_before_ln=True"),
    ("bert", "seq_bn_ln", {"scaling": 2.0}, "scaling=2.0"),
    ("bert", "compacter", {"ln_before": True}, "ln_before=True"),
    ("bert", "compacter", {"factorized_phm_W": False}, "factorized_phm_W=False"),
    ("bert", "compacter", {"shared_W_phm": True}, "shared_W_phm=True"),
    ("gpt2", "prefix", {"leave_out": [0]}, r"leave_out=\[0\]"),
    ("gpt2", "prefix", {"use_gating": True}, "use_gating=True"),
    ("gpt2", "prefix", {"architecture": "lora"}, "architecture='lora'"),
    ("gpt2", "seq_bn", {"model_type": "t5"}, "model_type='t5'"),
])
def test_inexpressible_config_is_refused_naming_the_field(arch, name, changes, match, tmp_path):
    folder = copy_fixture(arch, name, tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        convert_adapterhub(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the CLI verb ---------------------------------------------------------------------------------------------------
def test_cli_convert_prints_what_it_wrote(tmp_path, capsys):
    rc = main(["convert", str(ROOT / "llama" / "seq_bn"), "--out", str(tmp_path / "out"),
               "--base", str(ROOT / "llama" / "base")])
    printed = capsys.readouterr().out
    assert rc == 0 and "bottleneck, 8 tensor(s) written to" in printed and "test-loaded" in printed
    assert "note: head files" in printed
    ref = reference("llama")
    torch.testing.assert_close(logits(st.load(base_model("llama"), tmp_path / "out"), ref), ref["seq_bn"],
                               atol=ATOL, rtol=0)


def test_cli_convert_refusal_is_a_clear_error(tmp_path, capsys):
    folder = copy_fixture("gpt2", "seq_bn", tmp_path, use_gating=True)
    assert main(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "error: AdapterHub use_gating=True cannot be converted" in capsys.readouterr().err


# -- reads="residual" in our bottleneck method --------------------------------------------------------------------
def test_residual_reading_adapter_hooks_come_and_go(ids):
    base = tiny_llama()
    ref = output(base, ids)
    norms = [m for n, m in base.named_modules() if n.endswith("post_attention_layernorm")]
    model = st.attach(base, st.BottleneckConfig.pfeiffer(reads="residual"))
    randomize(model)
    assert all(len(m._forward_pre_hooks) == 1 for m in norms)
    assert (output(model, ids) - ref).abs().max() > 1e-3
    model.add(st.CompacterConfig(variant="compacter++", reduction_factor=16, reads="residual"), "other")
    assert all(len(m._forward_pre_hooks) == 2 for m in norms)
    model.delete("other")
    assert all(len(m._forward_pre_hooks) == 1 for m in norms)
    plain = model.detach()
    assert all(not m._forward_pre_hooks for m in norms)
    torch.testing.assert_close(output(plain, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [st.BottleneckConfig.pfeiffer(reads="residual", layer_norm="both"),
                                 st.BottleneckConfig.parallel(reads="residual", targets=r".*\.mlp\.c_proj"),
                                 st.CompacterConfig(reduction_factor=16, reads="residual", shared_phm_rule=False)])
def test_residual_reading_adapter_saves_loads_and_trains(cfg, ids, tmp_path):
    model = st.attach(tiny_gpt2(), cfg)
    randomize(model)
    model.save(tmp_path / "a")
    torch.testing.assert_close(output(st.load(tiny_gpt2(), tmp_path / "a"), ids), output(model, ids), atol=0, rtol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for _, p in model.trainable_parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_residual_reading_refuses_a_target_without_a_residual_stream():
    with pytest.raises(ConfigError, match="reads='residual' on lm_head"):
        st.attach(tiny_llama(), st.BottleneckConfig(targets=["lm_head"], reads="residual"))


def test_residual_reading_refuses_per_row_routing(ids):
    model = st.attach(tiny_llama(), st.BottleneckConfig.pfeiffer(reads="residual"))
    with pytest.raises(NotImplementedError, match="routing"):
        model(input_ids=ids, adapter_names=["default", None, None])
