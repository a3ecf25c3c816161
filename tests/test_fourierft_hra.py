"""FourierFT and HRA on tiny Llama / GPT-2 / BERT models: properties, method-specific math, HF PEFT interop."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer
from slimtune.methods.base import METHODS as REGISTRY
from slimtune.methods.fourierft import FourierFT, FourierFTConfig, spectral_positions
from slimtune.methods.hra import HRA, HRAConfig
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32, logits ~ O(1): merged vs unmerged, PEFT vs ours (absolute)
W_TOL = 1e-6  # unmerge: W - delta_W + delta_W (FourierFT), W H H^T (HRA)
ID_TOL = 1e-6  # HRA's paired reflections cancel exactly in real arithmetic, to rounding in fp32

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "value"]}
METHODS = {
    "fourierft": lambda arch, **kw: FourierFTConfig(targets=TARGETS[arch],
                                                    **{"n_frequency": 48, "scaling": 20.0, **kw}),
    "hra": lambda arch, **kw: HRAConfig(targets=TARGETS[arch], **{"r": 4, **kw}),
}
CASES = [(m, a) for m in METHODS for a in TARGETS]


def make(method: str, arch: str, **kw):
    return MODELS[arch](), METHODS[method](arch, **kw)


def scramble(model, seed: int = 1) -> None:
    """Non-trivial adapter tensors: spectra ~ N(0, 1) (PEFT's init scale), u ~ N(0, 0.1^2) (no equal pairs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("spectrum") else 0.1))


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def adapters_of(model, kind):
    return [(n, m.adapters["default"], m.base_layer) for n, m in model.named_modules()
            if isinstance(m, AdapterLayer) and isinstance(m.adapters["default"], kind)]


# -- init ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TARGETS)
def test_fourierft_zero_init_is_an_exact_no_op(arch, ids):
    base, cfg = make("fourierft", arch, init="zeros")
    ref = output(base, ids)
    model = st.attach(base, cfg)
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)
    model.merge()  # merging a zero spectrum adds exactly zero
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


def test_fourierft_default_init_is_standard_normal_as_peft(ids):
    torch.manual_seed(0)
    base, cfg = tiny_llama(), FourierFTConfig(targets=["q_proj"], n_frequency=2000)
    ref = output(base, ids)
    model = st.attach(base, cfg)
    values = torch.cat([a.spectrum.detach() for _, a, _ in adapters_of(model, FourierFT)])
    assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1) < 0.05
    assert not torch.allclose(output(model, ids), ref, atol=1e-3)  # the paper's (and PEFT's) start is not the base


@pytest.mark.parametrize("arch", TARGETS)
def test_hra_symmetric_init_is_the_identity(arch, ids):
    base, cfg = make("hra", arch)
    ref = output(base, ids)
    model = st.attach(base, cfg)
    for name, a, _ in adapters_of(model, HRA):
        assert torch.equal(a.u[:, 0::2], a.u[:, 1::2]), name  # u_1 = u_2, u_3 = u_4: each pair cancels
        assert not torch.equal(a.u[:, 0], a.u[:, 2]), name
        eye = torch.eye(a.u.shape[0])
        torch.testing.assert_close(a.householder().detach(), eye, atol=ID_TOL, rtol=0)
    torch.testing.assert_close(output(model, ids), ref, atol=ID_TOL, rtol=0)


# -- method-specific math ------------------------------------------------------------------------------
def test_fourierft_delta_is_the_numpy_idft_of_the_sparse_spectrum():
    lin = torch.nn.Linear(12, 10)
    cfg = FourierFTConfig(targets=["0"], n_frequency=30, scaling=7.5, seed=3)
    model = st.attach(torch.nn.Sequential(lin), cfg)
    scramble(model)
    adapter = model.model[0].adapters["default"]
    c = adapter.spectrum.detach().numpy().astype(np.float64)
    flat = torch.randperm(120, generator=torch.Generator().manual_seed(3))[:30].numpy()  # PEFT's draw
    rows, cols = flat // 12, flat % 12
    F = np.zeros((10, 12), dtype=np.complex128)
    F[rows, cols] = c
    expected = 7.5 * np.fft.ifft2(F).real
    j, k = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")  # and the cosine sum written out
    cosines = sum(ci * np.cos(2 * np.pi * (j * p / 10 + k * q / 12)) for ci, p, q in zip(c, rows, cols, strict=True))
    np.testing.assert_allclose(expected, 7.5 * cosines / 120, atol=1e-12)
    delta = adapter.delta_weight(lin).detach().numpy()
    np.testing.assert_allclose(delta, expected, atol=1e-6, rtol=0)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lin(x) + x @ torch.from_numpy(expected).float().T, atol=1e-6, rtol=0)


def test_fourierft_positions_are_peft_positions_and_the_same_in_another_process():
    here = spectral_positions(24, 40, 50, 777)
    assert here.shape == (2, 50) and len({(int(r), int(c)) for r, c in here.T}) == 50
    assert int(here[0].max()) < 24 and int(here[1].max()) < 40
    torch.manual_seed(12345)  # the global RNG plays no part
    torch.testing.assert_close(spectral_positions(24, 40, 50, 777), here, atol=0, rtol=0)
    assert not torch.equal(spectral_positions(24, 40, 50, 778), here)
    code = ("import torch; torch.manual_seed(99); "  # torch only (fast to start): PEFT's draw, written out
            "flat = torch.randperm(24 * 40, generator=torch.Generator().manual_seed(777))[:50]; "
            "print(torch.stack([flat // 40, flat % 40]).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == here.tolist()


def _reflection_chain(u: torch.Tensor) -> torch.Tensor:
    """H_1 H_2 ... H_r with H_i = I - 2 u_i u_i^T / ||u_i||^2, in float64, one matrix at a time."""
    u = u.detach().double()
    H = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        ui = u[:, i:i + 1]
        H = H @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * ui @ ui.T / (ui.T @ ui))
    return H


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_hra_product_of_reflections_is_orthogonal_and_the_layer_sees_x_times_h_transposed(gram_schmidt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 6)
    model = st.attach(torch.nn.Sequential(lin), HRAConfig(targets=["0"], r=5, init="random",
                                                          gram_schmidt=gram_schmidt))
    adapter = model.model[0].adapters["default"]
    H = adapter.householder().detach()
    torch.testing.assert_close(H @ H.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(H.T @ H, torch.eye(16), atol=1e-5, rtol=0)
    if gram_schmidt:  # I - 2 Q Q^T: one reflection across the span of the u's
        Q, _ = torch.linalg.qr(adapter.u.detach().double())
        expected = torch.eye(16, dtype=torch.float64) - 2 * Q @ Q.T
    else:
        expected = _reflection_chain(adapter.u)
    torch.testing.assert_close(H.double(), expected, atol=1e-5, rtol=0)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (lin.weight @ expected.float()).T + lin.bias, atol=1e-5, rtol=0)


def _orthogonality(layers) -> float:
    """sum over layers of ||U_hat^T U_hat - I||_F^2, in float64, written out."""
    total = 0.0
    for _, a, _ in layers:
        u = a.u.detach().double()
        u = u / u.norm(dim=0)
        total += ((u.T @ u - torch.eye(u.shape[1], dtype=torch.float64)) ** 2).sum().item()
    return total


def test_hra_regularizer_is_differentiable_and_zero_for_orthonormal_u():
    model = st.attach(tiny_llama(), HRAConfig(targets=["q_proj", "v_proj"], r=4, regularization=0.5))
    layers = adapters_of(model, HRA)
    at_init = model.regularization_loss().item()  # equal pairs: two off-diagonal ones per pair, r per layer, at least
    assert at_init >= 0.5 * 4 * len(layers) - 1e-5
    assert at_init == pytest.approx(0.5 * _orthogonality(layers), rel=1e-5)
    scramble(model)
    expected = _orthogonality(layers)
    loss = model.regularization_loss()
    assert loss.requires_grad
    torch.testing.assert_close(loss.double(), torch.tensor(0.5 * expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(a.u.grad is not None and a.u.grad.abs().sum() > 0 for _, a, _ in layers)
    with torch.no_grad():
        for _, a, _ in layers:  # orthogonal columns of any lengths: U_hat^T U_hat = I
            Q, _ = torch.linalg.qr(torch.randn(a.u.shape))
            a.u.copy_(Q * torch.tensor([1.0, 2.0, 0.5, 3.0]))
    torch.testing.assert_close(model.regularization_loss(), torch.tensor(0.0), atol=1e-5, rtol=0)
    off = st.attach(tiny_llama(), HRAConfig(targets=["q_proj"], r=4))
    assert off.regularization_loss() is None  # regularization=0: no term at all


# -- merging ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,arch", CASES)
def test_merge_matches_unmerged_and_unmerge_restores_weights(method, arch, ids):
    base, cfg = make(method, arch)
    model = st.attach(base, cfg)
    scramble(model)
    adapted = output(model, ids)
    with model.disabled():
        assert not torch.allclose(output(model, ids), adapted, atol=1e-4, rtol=0)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    after = base_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(".weight"))
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_with_lora_on_the_same_layers_merged_equals_unmerged(method, ids):
    model = st.attach(tiny_llama(), METHODS[method]("llama"))
    model.add(st.LoraConfig(r=4, targets=["v_proj", "down_proj"]), name="lora")
    scramble(model)  # every adapter tensor, LoRA's B included: both adapters are non-trivial
    model.use(["default", "lora"])
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)


# -- training ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,arch", CASES)
def test_param_count_is_the_formula(method, arch):
    base, cfg = make(method, arch)
    model = st.attach(base, cfg)
    layers = [m.base_layer for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layers
    expected = sum(48 if method == "fourierft" else 4 * features(b)[0] for b in layers)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected


def test_param_count_on_one_d_in_by_d_out_layer():
    fourier = st.attach(torch.nn.Sequential(torch.nn.Linear(9, 5)), FourierFTConfig(targets=["0"], n_frequency=45))
    assert sum(p.numel() for _, p in fourier.trainable_parameters()) == 45  # n (here n = d_in * d_out, the max)
    hra = st.attach(torch.nn.Sequential(torch.nn.Linear(9, 5)), HRAConfig(targets=["0"], r=6))
    assert sum(p.numel() for _, p in hra.trainable_parameters()) == 6 * 9  # r * d_in
    assert tuple(hra.model[0].adapters["default"].u.shape) == (9, 6)  # PEFT's hra_u layout


def test_fourierft_n_frequency_pattern_sets_n_per_module():
    cfg = FourierFTConfig(targets=["q_proj", "v_proj"], n_frequency=10, n_frequency_pattern={"v_proj": 30})
    model = st.attach(tiny_llama(), cfg)
    got = {n.split(".")[-1]: a.spectrum.numel() for n, a, _ in adapters_of(model, FourierFT)}
    assert got == {"q_proj": 10, "v_proj": 30}


@pytest.mark.parametrize("method,lr", [("fourierft", 1e-1), ("hra", 5e-2)])
def test_training_lowers_the_loss(method, lr):
    cfg = METHODS[method]("llama", **({"n_frequency": 200, "scaling": 150.0, "init": "zeros"}
                                      if method == "fourierft" else {}))
    model = st.attach(tiny_llama(), cfg)
    data = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=12, lr=lr)
    assert losses[-1] < losses[0] - 0.1, losses[::5]


def test_fourierft_inference_cache_follows_the_spectrum(ids):
    model = st.attach(tiny_llama(), FourierFTConfig(targets=["q_proj"], n_frequency=64, scaling=20.0))
    first = output(model, ids)
    torch.testing.assert_close(output(model, ids), first, atol=0, rtol=0)
    scramble(model, seed=9)  # in-place change, as an optimizer step or a load does
    changed = output(model, ids)
    assert not torch.allclose(changed, first, atol=1e-4)
    fresh = st.attach(tiny_llama(), FourierFTConfig(targets=["q_proj"], n_frequency=64, scaling=20.0))
    scramble(fresh, seed=9)
    torch.testing.assert_close(output(fresh, ids), changed, atol=0, rtol=0)
    with torch.inference_mode():  # a delta cached in inference mode is not reused outside it
        torch.testing.assert_close(output(model, ids), changed, atol=0, rtol=0)
    with torch.enable_grad():  # training: no stale delta, gradients flow
        model.train()
        model(input_ids=ids).logits.sum().backward()
    assert all(a.spectrum.grad is not None for _, a, _ in adapters_of(model, FourierFT))


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_rows_equal_each_adapter_alone(method, ids):
    base, cfg = make(method, "llama")
    model = st.attach(base, cfg, name="a")
    model.add(cfg, name="b")
    scramble(model, seed=5)
    names = ["a", "b", None, "b", "a", None]
    batch = torch.cat([ids, ids.flip(0)])
    assert_rows_match_alone(model, batch, names, atol=TOL)


# -- files -------------------------------------------------------------------------------------------------

# -- HF PEFT interop -----------------------------------------------------------------------------------
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "fourierft_llama": (tiny_llama, lambda: peft.FourierFTConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], n_frequency=40, scaling=20.0, random_loc_seed=5,
        n_frequency_pattern={"down_proj": 70})),
    "fourierft_gpt2": (tiny_gpt2, lambda: peft.FourierFTConfig(
        target_modules=["c_attn", "mlp.c_proj"], n_frequency=40, scaling=20.0, fan_in_fan_out=True)),
    "hra_llama": (tiny_llama, lambda: peft.HRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4)),
    "hra_gs_llama": (tiny_llama, lambda: peft.HRAConfig(target_modules=["q_proj", "o_proj"], r=3, apply_GS=True,
                                                        init_weights=False)),
}
EXPORT_CASES = {
    "fourierft_llama": (tiny_llama, FourierFTConfig(targets=["q_proj", "v_proj", "down_proj"], n_frequency=40,
                                                    scaling=20.0, seed=11, n_frequency_pattern={"v_proj": 25})),
    "fourierft_zeros_gpt2": (tiny_gpt2, FourierFTConfig(targets=["c_attn", "mlp.c_proj"], n_frequency=40,
                                                        scaling=20.0, init="zeros")),
    "fourierft_layers": (tiny_llama, FourierFTConfig(targets="all-linear", n_frequency=30, scaling=10.0, layers=[1])),
    "hra_llama": (tiny_llama, HRAConfig(targets=["q_proj", "v_proj", "down_proj"], r=4)),
    "hra_gs_llama": (tiny_llama, HRAConfig(targets=["k_proj", "up_proj"], r=3, init="random", gram_schmidt=True)),
}
PEFT_FIELDS = {"fourierft": lambda: peft.FourierFTConfig(), "hra": lambda: peft.HRAConfig()}


def _scramble_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "hra_u" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, ids, tmp_path):
    make_base, peft_cfg = PEFT_CASES[case]
    pm = peft.get_peft_model(make_base(), peft_cfg())
    _scramble_peft(pm)
    pm.eval()
    expected = output(pm, ids)
    with pm.disable_adapter():
        assert not torch.allclose(output(pm, ids), expected, atol=1e-3)
    pm.save_pretrained(tmp_path)
    ours = st.load(make_base(), tmp_path)
    assert ours.configs["default"].method == case.split("_")[0]
    torch.testing.assert_close(output(ours, ids), expected, atol=TOL, rtol=TOL)
    if case.startswith("fourierft"):  # the positions PEFT drew are the ones we rebuilt from the seed
        peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "indices")}
        for name, adapter, _ in adapters_of(ours, FourierFT):
            assert torch.equal(adapter.positions, peft_layers[name.removeprefix("model.")].indices["default"]), name


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_peft_format_export_loads_in_peft_with_same_outputs(case, ids, tmp_path):
    make_base, cfg = EXPORT_CASES[case]
    model = st.attach(make_base(), cfg)
    scramble(model)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    method = case.split("_")[0]
    assert set(written) == set(PEFT_FIELDS[method]().to_dict()), "exactly PEFT's config fields"
    pm = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=TOL)
    if method == "fourierft":
        assert written["fan_in_fan_out"] == case.endswith("gpt2")
        assert written["init_weights"] == (cfg.init == "zeros")


def test_peft_tensor_keys_and_shapes_match_peft_exactly(tmp_path):
    from safetensors.torch import load_file

    for name, (make_base, peft_cfg), cfg in [
        ("fourierft", PEFT_CASES["fourierft_gpt2"], FourierFTConfig(targets=["c_attn", "mlp.c_proj"], n_frequency=40)),
        ("hra", PEFT_CASES["hra_llama"], HRAConfig(targets=["q_proj", "v_proj", "down_proj"], r=4)),
    ]:
        peft.get_peft_model(make_base(), peft_cfg()).save_pretrained(tmp_path / name / "peft")
        st.attach(make_base(), cfg).save(tmp_path / name / "ours", format="peft")
        theirs = load_file(tmp_path / name / "peft" / "adapter_model.safetensors")
        ours = load_file(tmp_path / name / "ours" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name


def test_hra_on_gpt2_conv1d_has_no_peft_export(tmp_path):
    model = st.attach(tiny_gpt2(), HRAConfig(targets=["c_attn"], r=2))
    with pytest.raises(NotImplementedError, match="HF PEFT's HRA takes Linear and Conv2d only"):
        model.save(tmp_path, format="peft")


def test_peft_odd_r_reads_as_random_init():
    cfg = REGISTRY["hra"].method.from_peft({"peft_type": "HRA", "r": 3, "init_weights": True,
                                              "target_modules": ["q_proj"]})
    assert cfg == HRAConfig(targets=["q_proj"], r=3, init="random")


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,bad", [
    ("n_frequency", 0), ("n_frequency", 2.5), ("n_frequency", True), ("scaling", 0), ("scaling", float("nan")),
    ("scaling", "150"), ("seed", -1), ("seed", 1.0), ("init", "gaussian"), ("init", True),
    ("n_frequency_pattern", {"v_proj": 0}), ("n_frequency_pattern", {"(": 3}), ("n_frequency_pattern", ["v_proj"]),
])
def test_fourierft_bad_config_names_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"FourierFTConfig.{field}={bad!r}: expected")):
        FourierFTConfig(targets=["q_proj"], **{field: bad})


@pytest.mark.parametrize("field,bad", [
    ("r", 0), ("r", 2.0), ("r", True), ("gram_schmidt", "yes"), ("init", "zeros"), ("regularization", -1e-3),
    ("regularization", float("inf")), ("regularization", "0.1"),
])
def test_hra_bad_config_names_the_value(field, bad):
    with pytest.raises(st.ConfigError, match=re.escape(f"HRAConfig.{field}={bad!r}: expected")):
        HRAConfig(targets=["q_proj"], **{field: bad})


def test_hra_odd_r_needs_random_init():
    with pytest.raises(st.ConfigError, match=r"HRAConfig.r=3: expected an even int with init='symmetric'"):
        HRAConfig(targets=["q_proj"], r=3)
    HRAConfig(targets=["q_proj"], r=3, init="random")


def test_too_many_frequencies_or_reflections_name_the_layer():
    with pytest.raises(st.ConfigError, match=r"model.layers.0.self_attn.k_proj.*n_frequency=5000: expected at most "
                                             r"d_in \* d_out = 2048"):
        st.attach(tiny_llama(), FourierFTConfig(targets=["k_proj"], n_frequency=5000))
    with pytest.raises(st.ConfigError, match=r"r=80 with gram_schmidt=True: expected r <= d_in = 64"):
        st.attach(tiny_llama(), HRAConfig(targets=["k_proj"], r=80, gram_schmidt=True))


def test_peft_field_names_get_hints_and_embeddings_are_refused():
    with pytest.raises(st.ConfigError, match="Did you mean 'seed'"):
        st.config_from_dict({"method": "fourierft", "targets": ["q_proj"], "random_loc_seed": 1})
    with pytest.raises(st.ConfigError, match="Did you mean 'gram_schmidt'"):
        st.config_from_dict({"method": "hra", "targets": ["q_proj"], "apply_GS": True})
    with pytest.raises(NotImplementedError, match=r"fourierft on \S+ \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), FourierFTConfig(targets=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match=r"hra on \S+ \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), HRAConfig(targets=["embed_tokens"]))


def test_two_input_side_adapters_on_one_layer_merge_in_forward_order(ids):
    """Forward computes W H_b H_a x for active [a, b]: b folds into W before a (layer.py's merge)."""
    model = st.attach(tiny_llama(), HRAConfig(r=2, targets=["q_proj", "v_proj"], init="random"), name="a")
    model.add(HRAConfig(r=4, targets=["q_proj"], init="random"), name="b")
    model.use(["a", "b"])
    unmerged = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-4)
