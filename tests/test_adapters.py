"""Bottleneck adapters (Houlsby, Pfeiffer, parallel), AdapterDrop and Compacter on the tiny models."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune as st
from slimtune.layer import AdapterLayer
from slimtune.methods.adapters import AdapterDrop, BottleneckConfig
from slimtune.methods.base import METHODS
from slimtune.methods.compacter import CompacterConfig, Phm, PhmRule
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, randomize, tiny_llama

D = 64  # hidden size of the tiny models
# largest |adapted - base| of the tiny models' logits at init, measured: bert 3e-3, houlsby 5e-4, compacter 3e-7
NEAR = {"bert": 1e-2, "houlsby": 2e-3, "mam": 0.0, "lora": 0.0}
COMPACTER_NEAR = 1e-5
SUBLAYERS = {  # (attention output, FFN output) of block i
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
}


def wrapped(model) -> list[str]:
    return [n for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)]


def positions(arch: str, which: tuple[int, ...]) -> list[str]:
    return sorted(SUBLAYERS[arch][w].format(i) for i in range(2) for w in which)


def rf16_compacter(**kw) -> CompacterConfig:
    return CompacterConfig(reduction_factor=16, **kw)  # m = 4: divisible by phm_dim 4 at d = 64


# -- placement ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", SUBLAYERS)
@pytest.mark.parametrize("cfg, which", [(BottleneckConfig.houlsby(), (0, 1)), (BottleneckConfig.pfeiffer(), (1,)),
                                        (CompacterConfig(reduction_factor=16), (0, 1)),
                                        (CompacterConfig(variant="compacter++", reduction_factor=16), (1,))])
def test_presets_wrap_the_sublayer_outputs_of_every_family(arch, cfg, which):
    model = st.attach(MODELS[arch](), cfg)
    assert sorted(wrapped(model)) == positions(arch, which)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parallel_wraps_the_ffn_blocks_and_adds_beside_them(arch, ids):
    base = MODELS[arch]()
    ref = output(base, ids)
    model = st.attach(base, BottleneckConfig.parallel())
    block = "model.layers.{}.mlp" if arch == "llama" else "transformer.h.{}.mlp"
    assert wrapped(model) == [block.format(0), block.format(1)]
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)  # mam init: up = 0
    randomize(model)
    layer = model.model.get_submodule(block.format(1))
    adapter = layer.adapters["default"]
    assert adapter.down.weight.shape == (D // 2, D) and adapter.scale == 4.0
    x = torch.randn(2, 5, D)
    expected = layer.base_layer(x) + 4.0 * adapter.up(F.relu(adapter.down(x)))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_parallel_on_bert_finds_no_ffn_block():
    with pytest.raises(st.TargetNotFoundError, match="matched no module"):
        st.attach(MODELS["bert"](), BottleneckConfig.parallel())


def test_parallel_beside_given_linear_targets_reads_their_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    model = st.attach(net, BottleneckConfig.parallel(targets=["0"], init="bert"))
    adapter = model.model[0].adapters["default"]
    assert adapter.down.weight.shape == (4, 8) and adapter.up.weight.shape == (6, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model.model[0].base_layer(x) + 4.0 * adapter.up(F.relu(adapter.down(x)))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


# -- outputs at init and the formula --------------------------------------------------------------------
@pytest.mark.parametrize("arch", SUBLAYERS)
@pytest.mark.parametrize("init", list(NEAR))
def test_outputs_at_init_are_the_base_within_the_stated_tolerance(arch, init, ids):
    ref = output(MODELS[arch](), ids)
    model = st.attach(MODELS[arch](), BottleneckConfig.houlsby(init=init))
    assert (output(model, ids) - ref).abs().max() <= NEAR[init]
    with model.disabled():
        torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", SUBLAYERS)
@pytest.mark.parametrize("variant", ["compacter", "compacter++"])
def test_compacter_starts_near_the_base(arch, variant, ids):
    ref = output(MODELS[arch](), ids)
    model = st.attach(MODELS[arch](), rf16_compacter(variant=variant))
    assert (output(model, ids) - ref).abs().max() <= COMPACTER_NEAR


def test_forward_is_the_formula_on_one_layer():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(8, 16)), BottleneckConfig(
        targets=["0"], reduction_factor=4, non_linearity="swish", scaling="learned", layer_norm="both"))
    randomize(model)
    layer = model.model[0]
    a = layer.adapters["default"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + a.scale * a.ln_after(a.up(F.silu(a.down(a.ln_before(h)))))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_phm_weight_is_a_sum_of_kronecker_products():
    torch.manual_seed(0)
    cfg = CompacterConfig(targets=["x"], phm_dim=2, phm_rank=3, shared_phm_rule=False)
    phm = Phm(8, 6, cfg, None, {})
    with torch.no_grad():
        phm.A.normal_()
    expected = sum(torch.kron(phm.A[i], phm.s[i] @ phm.t[i]) for i in range(2))
    torch.testing.assert_close(phm.weight(), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 8)
    torch.testing.assert_close(phm(x), x @ expected + phm.bias, atol=1e-6, rtol=1e-5)


# -- parameter counts -----------------------------------------------------------------------------------
def bottleneck_params(d: int, m: int, norms: int = 0, learned: bool = False) -> int:
    return 2 * d * m + d + m + 2 * d * norms + learned


def compacter_params(d: int, m: int, rank: int = 1, n: int = 4, shared: bool = True) -> int:
    return 2 * rank * (d + m) + d + m + (0 if shared else 2 * n**3)


@pytest.mark.parametrize("kw, expected", [
    ({}, bottleneck_params(D, 4)),
    ({"layer_norm": "before"}, bottleneck_params(D, 4, norms=1)),
    ({"layer_norm": "both", "scaling": "learned"}, bottleneck_params(D, 4, norms=2, learned=True)),
    ({"reduction_factor": 2.5}, bottleneck_params(D, 25)),
])
def test_param_count_of_one_position_is_the_formula(kw, expected):
    model = st.attach(nn.Sequential(nn.Linear(D, D)), BottleneckConfig(targets=["0"], **kw))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
def test_compacter_param_count_of_one_position_is_the_formula(shared, rank):
    cfg = CompacterConfig(targets=["0"], reduction_factor=16, phm_rank=rank, shared_phm_rule=shared)
    model = st.attach(nn.Sequential(nn.Linear(D, D)), cfg)
    expected = compacter_params(D, 4, rank, shared=shared) + (4**3 if shared else 0)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


@pytest.mark.parametrize("arch", SUBLAYERS)
def test_param_count_of_a_whole_model_is_the_formula(arch):
    cases = [(BottleneckConfig.houlsby(), 4 * bottleneck_params(D, 4)),
             (BottleneckConfig.pfeiffer(layer_norm="after"), 2 * bottleneck_params(D, 4, norms=1)),
             (rf16_compacter(), 4 * compacter_params(D, 4) + 4**3),
             (rf16_compacter(variant="compacter++", shared_phm_rule=False), 2 * compacter_params(D, 4, shared=False))]
    for cfg, expected in cases:
        model = st.attach(MODELS[arch](), cfg)
        assert sum(p.numel() for _, p in model.trainable_parameters()) == expected, cfg
        assert model.adapter_parameter_count("default") == expected, cfg


# -- files, gradients, shared state ----------------------------------------------------------------------
CONFIGS = {
    "houlsby": lambda: BottleneckConfig.houlsby(layer_norm="both", scaling="learned"),
    "pfeiffer": lambda: BottleneckConfig.pfeiffer(),
    "compacter": lambda: rf16_compacter(),
    "compacter_unshared": lambda: rf16_compacter(variant="compacter++", shared_phm_rule=False),
}


@pytest.mark.parametrize("arch", SUBLAYERS)
@pytest.mark.parametrize("case", CONFIGS)
def test_save_then_load_gives_identical_outputs(arch, case, ids, tmp_path):
    model = st.attach(MODELS[arch](), CONFIGS[case]())
    randomize(model)
    adapted = output(model, ids)
    model.save(tmp_path / "a")
    loaded = st.load(MODELS[arch](), tmp_path / "a")
    assert loaded.configs["default"] == model.configs["default"]
    torch.testing.assert_close(output(loaded, ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("arch", SUBLAYERS)
@pytest.mark.parametrize("case", CONFIGS)
def test_gradients_reach_adapter_tensors_only(arch, case, ids):
    model = st.attach(MODELS[arch](), CONFIGS[case]())
    randomize(model)
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():  # (a relu bottleneck may be dead on these few tokens: no > 0 check)
        should_train = ".adapters." in name or name.startswith("shared.")
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name
    assert sum(p.grad.abs().sum() for _, p in model.trainable_parameters()) > 0


def test_compacter_slow_matrices_are_one_tensor_set_per_adapter_saved_once(tmp_path):
    model = st.attach(tiny_llama(), rf16_compacter())
    model.add(rf16_compacter(variant="compacter++"), name="other")
    rule = model.shared["default"]
    assert isinstance(rule, PhmRule) and rule.A.shape == (4, 4, 4)
    phms = [a for layer in model.model.modules() if isinstance(layer, AdapterLayer)
            for a in (layer.adapters["default"].down, layer.adapters["default"].up)]
    assert len(phms) == 8 and all(p.rule() is rule.A and not hasattr(p, "A") for p in phms)
    assert model.shared["other"].A is not rule.A  # its own set
    saved = model.adapter_state_dict("default")
    assert [k for k in saved if "phm_rule" in k or k.endswith(".A")] == ["phm_rule"]
    model.save(tmp_path / "a", name="default")
    loaded = st.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(loaded.shared["default"].A, rule.A, atol=0, rtol=0)


def test_compacter_without_shared_rule_has_one_per_projection():
    model = st.attach(tiny_llama(), rf16_compacter(shared_phm_rule=False))
    assert "default" not in model.shared
    keys = [k for k in model.adapter_state_dict() if k.endswith(".A")]
    assert len(keys) == 2 * 4  # down and up at 4 positions


def test_not_mergeable_and_says_so(ids):
    for name in ("bottleneck", "compacter"):
        assert METHODS[name].mergeable is False
    model = st.attach(tiny_llama(), BottleneckConfig())
    with pytest.raises(NotImplementedError, match=r"'default' \(bottleneck, layer shape\) cannot be merged"):
        model.merge()


# -- AdapterDrop -------------------------------------------------------------------------------------------
def skipped(model, names: list[str], ids: torch.Tensor) -> list[bool]:
    """Per wrapped module: whether it output exactly what its base module gives on the same input."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = [model.model.get_submodule(n) for n in names]
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, layer in zip(names, layers, strict=True)]
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        return [torch.equal(layer.base_layer(seen[n][0]), seen[n][1]) for n, layer in zip(names, layers, strict=True)]


@pytest.mark.parametrize("arch", SUBLAYERS)
def test_adapterdrop_skips_exactly_the_lowest_blocks(arch, ids):
    names = positions(arch, (0, 1))
    base = MODELS[arch]()
    ref = output(base, ids)
    model = st.attach(MODELS[arch](), BottleneckConfig.houlsby(init="mam", drop_layers=1))
    randomize(model)
    assert skipped(model, names, ids) == [".0." in n for n in names]  # block 0 gives the base's sublayer outputs
    assert not torch.allclose(output(model, ids), ref, atol=1e-4)
    frozen = [n for n, p in model.named_parameters() if ".adapters." in n and not p.requires_grad]
    assert frozen and all(".0." in n for n in frozen)
    assert model.adapter_parameter_count("default") == 4 * bottleneck_params(D, 4)  # saved all the same
    assert sum(p.numel() for _, p in model.trainable_parameters()) == 2 * bottleneck_params(D, 4)


def test_random_adapterdrop_skips_the_drawn_blocks_in_training_only(ids):
    names = positions("llama", (0, 1))  # block 0 (two positions), then block 1
    model = st.attach(tiny_llama(), BottleneckConfig.houlsby(init="mam", drop_prob=0.5))
    randomize(model)
    drop = model.shared["default"]
    assert isinstance(drop, AdapterDrop) and drop.n_blocks == 2
    drop.dropped = [False, True]
    model.train()
    assert skipped(model, names, ids) == [False, False, True, True]
    model.eval()
    assert skipped(model, names, ids) == [False] * 4
    torch.manual_seed(0)
    masks = set()
    for step in range(1, 20):
        model.step(step)
        masks.add(tuple(drop.dropped))
    assert len(masks) > 1


def test_adapterdrop_bad_blocks_are_refused():
    with pytest.raises(st.ConfigError, match=r"drop_layers=2: expected fewer than the 2 blocks"):
        st.attach(tiny_llama(), BottleneckConfig(drop_layers=2))
    with pytest.raises(st.ConfigError, match="numbered transformer blocks"):
        st.attach(nn.Sequential(nn.Linear(D, D)), BottleneckConfig(targets=["0"], drop_prob=0.2))


# -- training and mixed batches -------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [BottleneckConfig.pfeiffer(), BottleneckConfig.houlsby(init="mam"),
                                 rf16_compacter(), BottleneckConfig.houlsby(drop_prob=0.3)])
def test_training_lowers_the_loss(cfg):
    model = st.attach(tiny_llama(), cfg)
    data = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=25, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses[::5]


@pytest.mark.parametrize("arch", SUBLAYERS)
def test_mixed_batch_rows_equal_each_adapter_alone(arch, ids):
    model = st.attach(MODELS[arch](), BottleneckConfig.houlsby(), name="a")
    model.add(BottleneckConfig.pfeiffer(layer_norm="before"), name="b")
    model.add(rf16_compacter(), name="c")
    randomize(model, seed=3)
    batch = torch.cat([ids, ids.flip(0)])
    assert_rows_match_alone(model, batch, ["a", "b", None, "c", "a", "b"])


# -- bad config values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, expected", [
    ("placement", "serial", "'houlsby' | 'pfeiffer' | 'parallel'"),
    ("reduction_factor", 0, "a number > 0"),
    ("reduction_factor", "16", "a number > 0"),
    ("non_linearity", "Relu", "'relu' | 'gelu' | 'swish' | 'tanh' Did you mean 'relu'?"),
    ("scaling", "auto", "a finite number"),
    ("scaling", math.nan, "a finite number"),
    ("init", "xavier", "'bert' | 'houlsby' | 'mam' | 'lora'"),
    ("layer_norm", "pre", "'none' | 'before' | 'after' | 'both'"),
    ("drop_layers", -1, "an int >= 0"),
    ("drop_layers", True, "an int >= 0"),
    ("drop_prob", 1.0, "a float in [0, 1)"),
])
def test_bad_bottleneck_values_name_the_field_and_what_was_expected(field, value, expected):
    with pytest.raises(st.ConfigError, match=re.escape(f"BottleneckConfig.{field}={value!r}: expected {expected}")):
        BottleneckConfig(**{field: value})


@pytest.mark.parametrize("field, value, expected", [
    ("variant", "compacter+", "'compacter' | 'compacter++'"),
    ("phm_dim", 0, "an int >= 1"),
    ("phm_rank", 1.5, "an int >= 1"),
    ("shared_phm_rule", "yes", "True or False"),
    ("phm_init_range", 0, "a standard deviation > 0"),
    ("non_linearity", "sigmoid", "'relu' | 'gelu'"),
])
def test_bad_compacter_values_name_the_field_and_what_was_expected(field, value, expected):
    with pytest.raises(st.ConfigError, match=re.escape(f"CompacterConfig.{field}={value!r}: expected {expected}")):
        CompacterConfig(**{field: value})


def test_sizes_that_do_not_fit_are_refused_naming_the_layer():
    with pytest.raises(st.ConfigError, match=r"mlp\.down_proj .*d_out=64.*reduction_factor=128 leaves no bottleneck"):
        st.attach(tiny_llama(), BottleneckConfig(reduction_factor=128))
    with pytest.raises(st.ConfigError, match=r"phm_dim=4 must divide the hidden size d=64 and the bottleneck m = "
                                             r"d // reduction_factor = 2"):
        st.attach(tiny_llama(), CompacterConfig())  # AdapterHub's reduction_factor 32: m = 2 at d = 64
    with pytest.raises(NotImplementedError, match=r"bottleneck on model\.embed_tokens \(Embedding\)"):
        st.attach(tiny_llama(), BottleneckConfig(targets=["embed_tokens"]))


def test_configs_round_trip_through_json():
    for cfg in (BottleneckConfig.parallel(drop_layers=1), rf16_compacter(variant="compacter++")):
        again = st.config_from_dict(cfg.to_dict())
        assert again == cfg and again.targets == cfg.targets


def test_random_adapterdrop_never_skips_every_block():
    """A step with every adapter skipped has nothing to train (backward fails): one block always keeps its own."""
    drop = AdapterDrop(drop_layers=0, drop_prob=0.99, n_blocks=2)
    for _ in range(50):
        drop.redraw()
        assert not all(drop.skips(b, training=True) for b in range(2))
    model = st.attach(tiny_llama(), BottleneckConfig.houlsby(drop_prob=0.99))
    data = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    assert len(fit(model, data, steps=5, lr=1e-2)) == 5  # every step backpropagates
