"""LoHa and LoKr on tiny Llama / GPT-2 and small conv models: properties, PEFT's factor sizes, HF PEFT interop."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer
from slimtune.methods.loha_lokr import LohaConfig, LokrConfig, factorization, lokr_sizes
from tests.conftest import fit, output, randomize, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32, outputs ~ O(1): merged vs unmerged, PEFT vs ours (absolute)
W_TOL = 1e-6  # unmerge: weights restored
CONFIGS = {"loha": LohaConfig, "lokr": LokrConfig}
LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "mlp.c_proj"]
X_CONV = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(5))
X_CONV1D = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(6))


def conv_model(seed: int = 0, padding_mode: str = "reflect") -> nn.Sequential:
    """A 3x3 conv (stride 2, reflect padding), a grouped 3x3 conv and a 1x1 conv: the UNet-ish cases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=padding_mode), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 12, 1)).eval()


def conv1d_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 8, 1)).eval()


CONV = ["0", "2", "4"]
CASES = {  # name: (make base, input maker, config kwargs)
    "llama": (tiny_llama, None, dict(targets=LLAMA, r=4)),
    "gpt2": (tiny_gpt2, None, dict(targets=GPT2, r=4)),
    "conv": (conv_model, X_CONV, dict(targets=CONV, r=2)),
    "conv_effective": (conv_model, X_CONV, dict(targets=CONV, r=2, effective_conv2d=True)),
    "conv1d": (conv1d_model, X_CONV1D, dict(targets=["0", "2"], r=8)),
    "conv1d_effective": (conv1d_model, X_CONV1D, dict(targets=["0", "2"], r=1, effective_conv2d=True)),
}


def run(model, ids, x):
    if x is None:
        return output(model, ids)
    with torch.no_grad():
        return model(x)


def make(method: str, case: str, **extra):
    make_base, x, kwargs = CASES[case]
    return make_base(), x, CONFIGS[method](**{**kwargs, **extra})


def scramble(model, seed: int = 1) -> None:
    """Adapter tensors ~ N(0, 0.4^2): products of two or three factors must still move the outputs."""
    randomize(model, scale=0.4, seed=seed)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


both = pytest.mark.parametrize("method", list(CONFIGS))


# -- the math ---------------------------------------------------------------------------------------
@both
@pytest.mark.parametrize("case", CASES)
def test_identity_at_init(method, case, ids):
    base, x, cfg = make(method, case)
    ref = run(base, ids, x)
    model = st.attach(base, cfg)
    torch.testing.assert_close(run(model, ids, x), ref, atol=0, rtol=0)


def test_lokr_lycoris_init_zeroes_w2_instead_and_is_identity(ids):
    ref = output(tiny_llama(), ids)
    model = st.attach(tiny_llama(), LokrConfig(targets=LLAMA, r=2, init="lycoris"))
    for layer in layers(model).values():
        a = layer.adapters["default"]
        assert a.w1.abs().sum() > 0 and (a.w2_b if hasattr(a, "w2_b") else a.w2).abs().sum() == 0
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model = st.attach(tiny_llama(), LokrConfig(targets=LLAMA, r=2, init="random"))
    assert not torch.allclose(output(model, ids), ref, atol=1e-4)


def test_loha_delta_is_the_hadamard_formula_and_forward_applies_it():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(10, 6)), LohaConfig(targets=["0"], r=3, alpha=6))
    scramble(model)
    a = model.model[0].adapters["default"]
    expected = (a.w1_a @ a.w1_b) * (a.w2_a @ a.w2_b) * 2.0
    torch.testing.assert_close(a.delta_weight(model.model[0].base_layer), expected, atol=0, rtol=0)
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model[0].base_layer(x) + x @ expected.T, atol=1e-6, rtol=1e-6)


def test_loha_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(10, 6)), LohaConfig(targets=["0"], r=3))
    scramble(model)
    a = model.model[0].adapters["default"]
    x = torch.randn(4, 10)
    model(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (a.w1_a, a.w1_b, a.w2_a, a.w2_b)]
    leaves = [p.detach().clone().requires_grad_() for p in (a.w1_a, a.w1_b, a.w2_a, a.w2_b)]
    w1a, w1b, w2a, w2b = leaves
    delta = (w1a @ w1b) * (w2a @ w2b) * a.scale
    (model.model[0].base_layer(x).detach() + x @ delta.T).pow(2).sum().backward()
    for got, leaf in zip(ours, leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_delta_is_the_kronecker_product_and_forward_applies_it(decompose_both):
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(24, 20)),
                      LokrConfig(targets=["0"], r=1, alpha=3, decompose_both=decompose_both))
    scramble(model)
    a = model.model[0].adapters["default"]
    assert a.sizes == ((4, 5), (4, 6))  # d_out 20 = 4*5, d_in 24 = 4*6
    w1 = a.w1 if not decompose_both else a.w1_a @ a.w1_b
    assert tuple(w1.shape) == (4, 4) and hasattr(a, "w1_a") == decompose_both
    expected = torch.kron(w1, a.w2_a @ a.w2_b) * 3.0
    torch.testing.assert_close(a.delta_weight(model.model[0].base_layer), expected, atol=0, rtol=0)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():  # forward never forms delta_W: vec(W1 X W2^T)
        torch.testing.assert_close(model(x), model.model[0].base_layer(x) + x @ expected.T, atol=1e-6, rtol=1e-5)


@both
@pytest.mark.parametrize("case", CASES)
def test_merge_matches_unmerged_and_unmerge_restores_weights(method, case, ids):
    base, x, cfg = make(method, case)
    model = st.attach(base, cfg)
    scramble(model)
    adapted = run(model, ids, x)
    with model.disabled():
        assert not torch.allclose(run(model, ids, x), adapted, atol=1e-3)
    before = base_weights(model)
    model.merge()
    torch.testing.assert_close(run(model, ids, x), adapted, atol=TOL, rtol=1e-4)
    after = base_weights(model)
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(".weight"))
    model.unmerge()
    for n, p in base_weights(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(run(model, ids, x), adapted, atol=TOL, rtol=1e-4)


# -- parameter counts and PEFT's factor sizes -----------------------------------------------------------
def test_loha_param_count_is_2r_din_plus_dout():
    model = st.attach(nn.Sequential(nn.Linear(40, 24)), LohaConfig(targets=["0"], r=5))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == 2 * 5 * (40 + 24)
    model = st.attach(conv_model(), LohaConfig(targets=["0"], r=2))  # Conv2d(4, 6, 3): d_in * k = 36
    assert model.adapter_parameter_count("default") == 2 * 2 * (36 + 6)
    model = st.attach(conv_model(), LohaConfig(targets=["0"], r=2, effective_conv2d=True))
    assert model.adapter_parameter_count("default") == 2 * 2 * (4 + 6) + 2 * 2 * 2 * 9


@pytest.mark.parametrize("d_in,d_out,r,factor,both_", [(40, 24, 2, -1, False), (40, 24, 8, -1, False),
                                                       (128, 64, 2, -1, True), (96, 60, 1, 4, True)])
def test_lokr_param_count_is_the_kronecker_formula(d_in, d_out, r, factor, both_):
    model = st.attach(nn.Sequential(nn.Linear(d_in, d_out)),
                      LokrConfig(targets=["0"], r=r, decompose_factor=factor, decompose_both=both_))
    (a, b), (c, e) = factorization(d_out, factor), factorization(d_in, factor)
    w1 = r * (a + c) if both_ and r < max(a, c) / 2 else a * c
    w2 = r * (b + e) if r < max(b, e) / 2 else b * e
    assert sum(p.numel() for _, p in model.trainable_parameters()) == w1 + w2


@both
def test_whole_model_param_count_equals_the_formula_and_peft(method):
    peft = pytest.importorskip("peft")
    cfg = CONFIGS[method](targets=LLAMA, r=2)
    model = st.attach(tiny_llama(), cfg)
    expected = 0
    for layer in layers(model).values():
        d_in, d_out = features(layer.base_layer)
        if method == "loha":
            expected += 2 * 2 * (d_in + d_out)
        else:
            (a, b), (c, e) = lokr_sizes(d_in, d_out)
            expected += a * c + (2 * (b + e) if 2 < max(b, e) / 2 else b * e)
    assert model.adapter_parameter_count("default") == expected
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    peft_cfg = (peft.LoHaConfig if method == "loha" else peft.LoKrConfig)(target_modules=LLAMA, r=2)
    pm = peft.get_peft_model(tiny_llama(), peft_cfg)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == expected


def test_factorization_equals_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for d in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 7, 8, 16, 64, 1000):
            assert factorization(d, f) == peft_factorization(d, f), (d, f)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("module,r,factor,both_,effective", [
    (lambda: nn.Linear(64, 48), 8, -1, False, False),
    (lambda: nn.Linear(64, 48), 2, -1, True, False),
    (lambda: nn.Linear(96, 60), 1, 4, True, False),
    (lambda: nn.Linear(100, 36), 3, 5, False, False),
    (lambda: nn.Linear(127, 128), 2, -1, True, False),
    (lambda: nn.Conv2d(16, 32, 3), 2, -1, False, False),
    (lambda: nn.Conv2d(16, 32, 3), 2, -1, True, True),
    (lambda: nn.Conv2d(16, 32, 3), 8, 2, False, True),  # full W2 carries the kernel: no CP core
    (lambda: nn.Conv2d(16, 32, 1), 1, -1, False, True),  # 1x1: effective conv is off, as PEFT
    (lambda: nn.Conv2d(8, 12, 3, groups=2), 1, -1, False, False),
    (lambda: nn.Conv1d(12, 18, 5), 1, -1, False, True),
    (lambda: nn.Conv1d(12, 18, 5), 8, -1, False, False),
])
def test_lokr_factor_shapes_equal_peft(module, r, factor, both_, effective):
    peft = pytest.importorskip("peft")
    kw = dict(r=r, decompose_factor=factor, decompose_both=both_)
    ours = st.attach(nn.Sequential(module()), LokrConfig(targets=["0"], effective_conv2d=effective, **kw))
    pm = peft.get_peft_model(nn.Sequential(module()),
                             peft.LoKrConfig(target_modules=["0"], use_effective_conv2d=effective, **kw))
    assert _shapes(ours.adapter_state_dict()) == _shapes(peft.get_peft_model_state_dict(pm))


@pytest.mark.parametrize("module,effective", [(lambda: nn.Linear(30, 20), False), (lambda: nn.Conv2d(6, 8, 3), False),
                                              (lambda: nn.Conv2d(6, 8, 3), True), (lambda: nn.Conv1d(6, 8, 3), True),
                                              (lambda: nn.Conv2d(6, 8, 1), True)])
def test_loha_factor_shapes_equal_peft(module, effective):
    peft = pytest.importorskip("peft")
    ours = st.attach(nn.Sequential(module()), LohaConfig(targets=["0"], r=3, effective_conv2d=effective))
    pm = peft.get_peft_model(nn.Sequential(module()),
                             peft.LoHaConfig(target_modules=["0"], r=3, use_effective_conv2d=effective))
    assert _shapes(ours.adapter_state_dict()) == _shapes(peft.get_peft_model_state_dict(pm))


# -- dropouts ---------------------------------------------------------------------------------------------
@both
def test_rank_dropout_drops_output_rows_in_training_only(method):
    torch.manual_seed(0)
    extra = {"rank_dropout_scale": True} if method == "lokr" else {}
    model = st.attach(nn.Sequential(nn.Linear(16, 64)), CONFIGS[method](targets=["0"], r=4, rank_dropout=0.5, **extra))
    scramble(model)
    x = torch.randn(3, 16)
    base = model.model[0].base_layer
    model.eval()
    with torch.no_grad():
        delta = model(x) - base(x)  # eval: no dropout
        model.train()
        dropped = model(x) - base(x)
    ratio = (dropped / delta)[0]
    kept = ratio.abs() > 1e-3
    assert 0 < kept.sum() < 64
    factor = 64 / kept.sum()  # kept rows rescaled by 1 / (fraction kept)
    torch.testing.assert_close(dropped[:, ~kept], torch.zeros_like(dropped[:, ~kept]), atol=1e-6, rtol=0)
    torch.testing.assert_close(dropped[:, kept], delta[:, kept] * factor, atol=1e-5, rtol=1e-4)


def test_module_dropout_skips_the_whole_adapter_sometimes():
    torch.manual_seed(0)
    model = st.attach(nn.Sequential(nn.Linear(8, 8)), LohaConfig(targets=["0"], r=2, module_dropout=0.5))
    scramble(model)
    model.train()
    x = torch.randn(2, 8)
    with torch.no_grad():
        base = model.model[0].base_layer(x)
        skipped = [torch.equal(model(x), base) for _ in range(40)]
    assert 5 < sum(skipped) < 35


# -- files ---------------------------------------------------------------------------------------------------

@both
def test_mixed_batch_rows_equal_each_adapter_alone(method, ids):
    model = st.attach(tiny_llama(), CONFIGS[method](targets=LLAMA, r=2), name="a")
    model.add(CONFIGS[method](targets=LLAMA[:2], r=4, alpha=2), name="b")
    scramble(model, seed=3)
    names = ["a", None, "b"]
    mixed = output(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            with model.disabled():
                alone = output(model, ids[i:i + 1])
        else:
            alone = output(model.use(name), ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=TOL, rtol=1e-4)


@both
def test_training_lowers_the_loss(method):
    model = st.attach(tiny_llama(), CONFIGS[method](targets=LLAMA, r=4))
    data = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=10, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses[::5]


# -- HF PEFT interop --------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}
def zero_padded(seed: int = 0) -> nn.Sequential:
    """HF PEFT convolves its delta with zero padding whatever the base's padding_mode: compare on zeros."""
    return conv_model(seed, padding_mode="zeros")


PEFT_CASES = {  # name: (make base, input, PEFT config kwargs)
    "llama": (tiny_llama, None, dict(target_modules=LLAMA, r=2, alpha=3, rank_pattern={"v_proj": 4},
                                     alpha_pattern={"down_proj": 5}, rank_dropout=0.1, module_dropout=0.1)),
    "conv": (zero_padded, X_CONV, dict(target_modules=CONV, r=2)),
    "conv_effective": (zero_padded, X_CONV, dict(target_modules=CONV, r=2, use_effective_conv2d=True)),
    "conv1d": (conv1d_model, X_CONV1D, dict(target_modules=["0", "2"], r=8)),  # LoKr: a full 3-d W2
}
LOHA_ONLY = {  # PEFT 0.21's LoKr fails here itself (torch.kron on the CP core's strides)
    "conv1d_effective": (conv1d_model, X_CONV1D, dict(target_modules=["0", "2"], r=1, use_effective_conv2d=True)),
}
LOKR_ONLY = {"lokr_decompose": (tiny_llama, None, dict(target_modules=LLAMA, r=1, decompose_both=True,
                                                        decompose_factor=4, rank_dropout_scale=True))}


def _randomize_peft(pm) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_cases(method: str) -> list:
    return [(method, c) for c in PEFT_CASES] + [(method, c) for c in (LOKR_ONLY if method == "lokr" else LOHA_ONLY)]


ALL_PEFT = _peft_cases("loha") + _peft_cases("lokr")


@pytest.mark.parametrize("method,case", ALL_PEFT)
def test_load_adapter_saved_by_peft_gives_peft_outputs(method, case, ids, tmp_path):
    make_base, x, kwargs = {**PEFT_CASES, **LOKR_ONLY, **LOHA_ONLY}[case]
    pm = peft.get_peft_model(make_base(), PEFT_CONFIGS[method](**kwargs))
    _randomize_peft(pm)
    pm.eval()
    expected = run(pm, ids, x)
    pm.save_pretrained(tmp_path)
    ours = st.load(make_base(), tmp_path).eval()  # new adapter modules start in training mode
    assert ours.configs["default"].method == method
    torch.testing.assert_close(run(ours, ids, x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("method,case", ALL_PEFT)
def test_peft_format_export_loads_in_peft_with_same_outputs(method, case, ids, tmp_path):
    make_base, x, kwargs = {**PEFT_CASES, **LOKR_ONLY, **LOHA_ONLY}[case]
    cfg = st.config_from_dict({"method": method, **_ours(kwargs)})
    model = st.attach(make_base(), cfg).eval()
    scramble(model)
    ours = run(model, ids, x)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(PEFT_CONFIGS[method]().to_dict()), f"exactly PEFT's {method} config fields"
    assert written["peft_type"] == method.upper()
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    torch.testing.assert_close(run(pm, ids, x), ours, atol=TOL, rtol=TOL)


def _ours(kwargs: dict) -> dict:
    names = {"target_modules": "targets", "use_effective_conv2d": "effective_conv2d"}
    return {names.get(k, k): v for k, v in kwargs.items()}


@both
def test_peft_export_of_gpt2_conv1d_is_refused_but_ours_saves(method, tmp_path):
    model = st.attach(tiny_gpt2(), CONFIGS[method](targets=GPT2, r=2))
    with pytest.raises(NotImplementedError, match=r"conv1d_gpt2 modules: HF PEFT's LO(HA|KR) supports Linear"):
        model.save(tmp_path / "p", format="peft")
    model.save(tmp_path / "s")


@both
def test_peft_config_round_trip_keeps_every_field(method):
    from slimtune.methods.base import METHODS, PeftContext

    cfg = CONFIGS[method](targets=["q_proj"], r=3, alpha=5.0, rank_dropout=0.2, module_dropout=0.1,
                          effective_conv2d=True, init="random", rank_pattern={"q": 2}, alpha_pattern={"q": 1.0},
                          **({"decompose_both": True, "decompose_factor": 4, "rank_dropout_scale": True}
                             if method == "lokr" else {}))
    m = METHODS[method].method
    ctx = PeftContext(task_type=None, base_model_name_or_path=None, target_modules=["q_proj"],
                      targets=["q_proj"], target_kinds={"linear"})
    data = m.to_peft(cfg, ctx)
    assert data["init_weights"] is False
    assert m.from_peft(data) == cfg
    assert m.from_peft(PEFT_CONFIGS[method](target_modules=["q_proj"], init_weights=False).to_dict()) \
        == CONFIGS[method](targets=["q_proj"], init="random")


# -- bad input -------------------------------------------------------------------------------------------------
@both
@pytest.mark.parametrize("field,bad", [("r", 0), ("r", 2.0), ("r", True), ("alpha", 0), ("alpha", "8"),
                                       ("rank_dropout", 1.0), ("module_dropout", -0.1), ("init", "gaussian"),
                                       ("effective_conv2d", "yes"), ("rank_pattern", {"q": 0})])
def test_bad_fields_name_the_value(method, field, bad):
    cls = CONFIGS[method]
    with pytest.raises(st.ConfigError, match=re.escape(f"{cls.__name__}.{field}={bad!r}: expected")):
        cls(targets=["q_proj"], **{field: bad})


@pytest.mark.parametrize("field,bad", [("decompose_factor", 0), ("decompose_factor", -2), ("decompose_both", 1),
                                       ("rank_dropout_scale", None)])
def test_bad_lokr_fields_name_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"LokrConfig.{field}={bad!r}: expected")):
        LokrConfig(targets=["q_proj"], **{field: bad})


def test_lycoris_init_is_lokr_only_and_peft_names_get_hints():
    with pytest.raises(st.ConfigError, match=r"LohaConfig.init='lycoris': expected 'default' or 'random'"):
        LohaConfig(targets=["q_proj"], init="lycoris")
    with pytest.raises(st.ConfigError, match="Did you mean 'effective_conv2d'"):
        st.config_from_dict({"method": "lokr", "targets": ["q_proj"], "use_effective_conv2d": True})


@both
def test_embedding_is_refused(method):
    with pytest.raises(NotImplementedError, match=r"on Embedding is not implemented"):
        st.attach(tiny_llama(), CONFIGS[method](targets=["embed_tokens"]))


def test_param_formulas_are_registered():
    from slimtune.methods.base import METHODS

    assert METHODS["loha"].peft_type == "LOHA" and METHODS["lokr"].peft_type == "LOKR"
    assert METHODS["loha"].mergeable and METHODS["lokr"].category == "reparameterized"
    assert math.isclose(LohaConfig(r=4, alpha=6).scale, 1.5)
