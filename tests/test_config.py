"""Configs: validation messages, JSON/YAML round trips, target selection."""

from __future__ import annotations

import pytest

import slimtune as st
from slimtune.targets import find_targets
from tests.conftest import tiny_gpt2, tiny_llama


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(st.ConfigError, match="has no field 'lora_alpha'.*Did you mean 'alpha'"):
        st.config_from_dict({"method": "lora", "lora_alpha": 4})
    with pytest.raises(st.ConfigError, match="Did you mean 'dropout'"):
        st.config_from_dict({"method": "lora", "dropuot": 0.1})


def test_unknown_method_suggests_a_registered_one():
    with pytest.raises(st.ConfigError, match="Did you mean 'lora'"):
        st.config_from_dict({"method": "lorra"})


@pytest.mark.parametrize("field,value,expected", [
    ("alpha", -1, "a number > 0"), ("dropout", 1.5, r"\[0, 1\)"), ("init", "svd", "pissa_niter_K"),
    ("bias", "some", "lora_only"), ("layers", "3-1", "empty"), ("targets", 5, "list of module names"),
])
def test_bad_values_are_named(field, value, expected):
    with pytest.raises(st.ConfigError, match=expected):
        st.LoraConfig(**{field: value})


def test_json_and_yaml_round_trip(tmp_path):
    import yaml

    cfg = st.DoraConfig(r=6, alpha=12, targets=["q_proj"], layers="0-1", rank_pattern={"q_proj": 3})
    assert st.config_from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert st.load_config(tmp_path / "c.yaml") == cfg == st.load_config(tmp_path / "c.json")


def test_targets_all_linear_excludes_the_output_head():
    names = find_targets(tiny_llama(), st.LoraConfig(targets="all-linear"))
    assert len(names) == 14 and "lm_head" not in names
    gpt2 = find_targets(tiny_gpt2(), st.LoraConfig(targets="all-linear"))
    assert {n.split(".")[-1] for n in gpt2} == {"c_attn", "c_proj", "c_fc"}


def test_targets_regex_layers_and_exclude():
    model = tiny_llama()
    assert find_targets(model, st.LoraConfig(targets=r".*layers\.1\.self_attn\.(q|k)_proj")) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert find_targets(model, st.LoraConfig(targets=["q_proj"], layers=1)) == ["model.layers.1.self_attn.q_proj"]
    assert len(find_targets(model, st.LoraConfig(targets="all-linear", exclude=["mlp.down_proj"]))) == 12
    assert find_targets(model, st.LoraConfig(targets="self_attn.v_proj", layers=[0])) == [
        "model.layers.0.self_attn.v_proj"]


def test_rank_and_alpha_patterns_apply_per_module():
    cfg = st.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={r"layers\.1\..*q_proj": 4})
    model = st.attach(tiny_llama(), cfg)
    attn0, attn1 = (model.model.model.layers[i].self_attn for i in (0, 1))
    assert attn0.v_proj.adapters["default"].r == 2 and attn0.q_proj.adapters["default"].r == 8
    assert attn0.q_proj.adapters["default"].scale == 2.0 and attn1.q_proj.adapters["default"].scale == 0.5


def test_modules_to_save_unknown_name_is_named():
    with pytest.raises(st.ConfigError, match="modules_to_save: no module named 'clasifier'"):
        st.attach(tiny_llama(), st.LoraConfig(targets=["q_proj"], modules_to_save=["clasifier"]))
