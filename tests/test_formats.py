"""Adapter files: PEFT interop both ways, strict loading, unsafe and corrupt files refused."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from tests.conftest import output, randomize, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

PEFT_CASES = {
    "lora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])),
    "rslora": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"])),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    "bert_save": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"],
                                  task_type="SEQ_CLS")),
}


def _randomize_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, ids, tmp_path):
    make, kwargs = PEFT_CASES[case]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    _randomize_peft(pm)
    pm.eval()
    expected = output(pm, ids)
    pm.save_pretrained(tmp_path)
    ours = st.load(make(), tmp_path)
    torch.testing.assert_close(output(ours, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "gpt2", "bert_save", "pissa"])
def test_peft_format_export_loads_in_peft_with_same_outputs(variant, ids, tmp_path):
    make = {"gpt2": tiny_gpt2, "bert_save": tiny_bert}.get(variant, tiny_llama)
    cfg = {
        "lora": st.LoraConfig(r=4, targets=["q_proj", "v_proj"]),
        "rslora": st.LoraConfig(r=4, rslora=True, targets="all-linear"),
        "dora": st.DoraConfig(r=4, targets=["q_proj", "up_proj"]),
        "gpt2": st.LoraConfig(r=4, targets=["c_attn"]),
        "bert_save": st.LoraConfig(r=4, targets=["query"], modules_to_save=["classifier"]),
        "pissa": st.LoraConfig(r=4, targets=["q_proj"], init="pissa"),
    }[variant]
    model = st.attach(make(), cfg)
    randomize(model)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and "slimtune_version" not in written
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=2e-5, rtol=1e-4)


def test_peft_tensor_keys_match_peft_exactly(tmp_path):
    from safetensors.torch import load_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "peft")
    st.attach(tiny_llama(), st.DoraConfig(r=4, targets=["q_proj"])).save(tmp_path / "ours", format="peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_target_lists_near_matches():
    with pytest.raises(st.TargetNotFoundError) as e:
        st.attach(tiny_llama(), st.LoraConfig(targets=["q_projj"]))
    assert "Did you mean 'q_proj'" in str(e.value) and "v_proj" in str(e.value)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_rank_must_be_a_positive_int(bad):
    with pytest.raises(st.ConfigError, match=rf"LoraConfig.r={bad!r}: expected an int >= 1"):
        st.LoraConfig(r=bad, targets=["q_proj"])


def test_adapter_for_another_base_names_tensor_and_both_shapes(tmp_path):
    st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"])).save(tmp_path)
    other = tiny_llama(hidden_size=32, num_attention_heads=4)
    with pytest.raises(st.AdapterLoadError) as e:
        st.load(other, tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in msg and "(4, 64)" in msg and "(4, 32)" in msg
    assert "fingerprint" in msg
    assert not any(".adapters." in n for n, _ in other.named_parameters())  # nothing left half-attached


def test_truncated_safetensors_is_refused(tmp_path):
    st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"])).save(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(st.AdapterLoadError, match="truncated or corrupt"):
        st.load(tiny_llama(), tmp_path)


def test_pickle_bin_is_refused_without_unpickling(tmp_path):
    st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"])).save(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(st.AdapterLoadError, match="pickle files are refused"):
        st.load(tiny_llama(), tmp_path)
    with pytest.raises(st.AdapterLoadError, match="pickle files are refused"):
        st.load(tiny_llama(), tmp_path / "adapter_model.bin")


def test_adapter_name_clash_is_refused():
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"]))
    with pytest.raises(st.AdapterNameError, match="'default' already exists"):
        model.add(st.LoraConfig(r=2, targets=["v_proj"]))


def test_save_writes_atomically_and_keeps_old_files_on_failure(tmp_path, monkeypatch):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"]))
    model.save(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize(model)
    import slimtune.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OSError):
        model.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_several_adapters_save_and_load_together(tmp_path, ids):
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["q_proj"]), name="one")
    model.add(st.LoraConfig(r=2, targets=["v_proj"]), name="two")
    for n in ("one", "two"):
        model.use(n)
        randomize(model, seed=len(n) * 3 + ord(n[0]))
    expected = output(model, ids, adapter_names=["one", "two", None])
    model.save(tmp_path)
    loaded = st.load(tiny_llama(), tmp_path, name="one")
    assert sorted(loaded.configs) == ["one", "two"]
    torch.testing.assert_close(output(loaded, ids, adapter_names=["one", "two", None]), expected, atol=0, rtol=0)


def test_peft_export_of_a_classifier_without_its_head_loads_in_peft(ids, tmp_path):
    """PEFT's SEQ_CLS models expect the head's tensors; a headless export carries no task type instead."""
    model = st.attach(tiny_bert(), st.LoraConfig(r=4, targets=["query"]))
    randomize(model)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=1e-5, rtol=1e-5)
