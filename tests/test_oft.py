"""Properties of OFT and BOFT on tiny Llama / GPT-2 models, and HF PEFT interop both ways (Llama: PEFT 0.21's
OFT and BOFT wrap nn.Linear only, not GPT-2's Conv1D)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

import slimtune as st
from slimtune.bases import sizes as features
from slimtune.layer import AdapterLayer
from slimtune.methods.oft import Boft, BoftConfig, Oft, OftConfig, butterfly_perm, cayley
from tests.conftest import MODELS, assert_rows_match_alone, fit, output, tiny_gpt2, tiny_llama

TOL = 1e-5  # fp32, logits ~ O(1): merged vs unmerged, PEFT vs ours (absolute)
W_TOL = 1e-6  # unmerge: W' (R^T)^-1 (a solve) or diag(1/s) W' M, against the weights before the merge
ORTHO_TOL = 1e-5  # ||R^T R - I||_max
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
CONFIGS = {  # name -> config kwargs minus targets (hidden 64 / GPT-2 c_proj d_in 256: every size divides)
    "oft": ("oft", dict(block_size=8)),
    "oft_neumann": ("oft", dict(block_size=8, neumann=True)),
    "oft_share": ("oft", dict(r=4, block_size=0, block_share=True)),
    "boft": ("boft", dict(block_size=8)),
    "boft_butterfly": ("boft", dict(block_size=4, n_butterfly_factor=3)),
}


def cfg_of(kind: str, arch: str = "llama", **extra):
    method, kwargs = CONFIGS[kind]
    cls = OftConfig if method == "oft" else BoftConfig
    return cls(targets=TARGETS[arch], **{**kwargs, **extra})


def with_biases(model):
    """Non-zero biases (GPT-2 starts them at 0), so that BOFT's bias handling is seen."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make(arch: str):
    return with_biases(MODELS[arch]())


def scramble(model, seed: int = 1, scale: float = 0.1) -> None:
    """Q / A ~ scale * N(0, 1), s = 1 + 0.1 N(0, 1): non-trivial, so merge / save checks cannot pass at R = I."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.1 * noise if name.endswith(".s") else scale * noise)


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def adapters(model):
    return [(n, m.adapters["default"], m.base_layer) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


# -- the math -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("neumann", [False, True])
def test_rotation_is_orthogonal_for_random_q(neumann):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 5)
    model = st.attach(torch.nn.Sequential(lin), OftConfig(targets=["0"], block_size=8, neumann=neumann))
    oft = model.model[0].adapters["default"]
    with torch.no_grad():  # exact Cayley: any skew Q; the series: small Q (its error grows as ||Q||^5)
        oft.Q.copy_(torch.randn(oft.Q.shape) * (0.01 if neumann else 1.0))
    R = oft.rotation().detach()
    assert R.shape == (32, 32) and (R - torch.eye(32)).abs().max() > (1e-3 if neumann else 0.1)
    torch.testing.assert_close(R.T @ R, torch.eye(32), atol=ORTHO_TOL, rtol=0)
    assert torch.equal(R[:8, 8:], torch.zeros(8, 24))  # block-diagonal


def test_neumann_series_is_peft_s_and_approximates_the_inverse_transpose():
    torch.manual_seed(0)
    A = torch.randn(3, 6, 6) * 0.01
    S = A - A.transpose(-2, -1)
    eye = torch.eye(6)
    exact = (eye - S) @ torch.linalg.inv(eye + S)
    torch.testing.assert_close(cayley(S), exact, atol=1e-6, rtol=0)
    series = cayley(S, neumann=True, terms=5)
    torch.testing.assert_close(series, eye + 2 * S + 2 * S @ S + 2 * S @ S @ S + S @ S @ S @ S, atol=1e-7, rtol=0)
    torch.testing.assert_close(series, exact.transpose(-2, -1), atol=1e-4, rtol=0)  # (I + S)(I - S)^-1
    torch.testing.assert_close(cayley(S, True, 3), cayley(S, True, 4), atol=0, rtol=0)  # PEFT's loop: both stop at S^3
    torch.testing.assert_close(cayley(S, True, 2), eye + 2 * S, atol=0, rtol=0)


def test_boft_rotation_is_orthogonal_and_a_product_of_permuted_block_diagonals():
    torch.manual_seed(0)
    model = st.attach(torch.nn.Sequential(torch.nn.Linear(16, 3)), BoftConfig(targets=["0"], block_size=2,
                                                                               n_butterfly_factor=3))
    boft = model.model[0].adapters["default"]
    with torch.no_grad():
        boft.A.normal_()
    M = boft.rotation().detach()
    torch.testing.assert_close(M.T @ M, torch.eye(16), atol=ORTHO_TOL, rtol=0)
    eye = torch.eye(2)
    expected = torch.eye(16)
    for i in range(3):  # M = B2 B1 B0, B_i = P_i D_i P_i^T with P_i[a, perm[a]] = 1
        S = 0.5 * (boft.A[i] - boft.A[i].transpose(-2, -1)).detach()
        D = torch.block_diag(*[(eye - s) @ torch.linalg.inv(eye + s) for s in S])
        P = torch.eye(16)[butterfly_perm(16, 8 // 2 ** i, 1, 2)]
        expected = (P @ D @ P.T) @ expected
    torch.testing.assert_close(M, expected, atol=1e-5, rtol=0)
    # three butterfly factors of 2 x 2 blocks mix groups of 2 * 2^2 = 8 features (PEFT's effective block size)
    assert (M[:8, :8].abs() > 1e-6).all() and (M[8:, 8:].abs() > 1e-6).all()
    assert torch.equal(M[:8, 8:], torch.zeros(8, 8)) and torch.equal(M[8:, :8], torch.zeros(8, 8))


def test_forward_is_the_formula_on_one_layer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Linear(8, 5))
    x = torch.randn(4, 12)
    model = st.attach(net, OftConfig(targets=["0"], block_size=4))
    model.add(BoftConfig(targets=["1"], block_size=4), name="b")
    model.use(["default", "b"])
    scramble(model)
    oft, boft = model.model[0].adapters["default"], model.model[1].adapters["b"]
    eye = torch.eye(4)
    Qs = [oft.skew(oft.Q.detach())[j] for j in range(3)]
    R = torch.block_diag(*[(eye - q) @ torch.linalg.inv(eye + q) for q in Qs])  # exact Cayley, x @ R
    first, second = model.model[0].base_layer, model.model[1].base_layer
    h = first(x @ R)
    M, s = boft.rotation().detach(), boft.s.detach().view(-1)
    expected = s * ((h @ M) @ second.weight.T) + second.bias
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("share", [False, True])
def test_coft_projects_q_into_peft_s_radius_and_bounds_r_minus_i(share):
    torch.manual_seed(0)
    eps = 1e-2
    model = st.attach(torch.nn.Sequential(torch.nn.Linear(32, 4)),
                      OftConfig(targets=["0"], block_size=8, coft=True, eps=eps, block_share=share))
    oft = model.model[0].adapters["default"]
    with torch.no_grad():
        oft.Q.copy_(torch.randn(oft.Q.shape))
        oft.Q[0].mul_(1e-5)  # already inside: left as it is
    inside = oft.Q[0].detach().clone()
    model(torch.randn(2, 32))
    radius = eps / math.sqrt(oft.Q.shape[0])  # PEFT: eps / sqrt(number of stored blocks), Frobenius norm of Q_j
    norms = torch.linalg.matrix_norm(oft.skew(oft.Q.detach()))
    assert (norms <= radius * (1 + 1e-5)).all()
    if not share:
        assert torch.equal(oft.Q[0].detach(), inside) and (norms[1:] > radius * (1 - 1e-5)).all()
    R = oft.blocks().detach()
    bound = 2 * radius / (1 - radius)  # R - I = -2Q(I + Q)^-1 and ||Q||_2 <= ||Q||_F
    assert (torch.linalg.matrix_norm(R - torch.eye(8), ord=2) <= bound).all()
    version = oft.Q._version
    model(torch.randn(2, 32))
    assert oft.Q._version == version  # nothing outside the radius any more: Q is not rewritten


# -- contract ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("kind", ["oft", "oft_share", "boft_butterfly"])
def test_identity_at_init(kind, arch, ids):
    base = make(arch)
    ref = output(base, ids)
    model = st.attach(base, cfg_of(kind, arch))
    torch.testing.assert_close(output(model, ids), ref, atol=0, rtol=0)


MERGE_CASES = [("oft", "llama"), ("oft_neumann", "gpt2"), ("oft_share", "llama"), ("boft", "gpt2"),
               ("boft_butterfly", "llama"), ("boft_butterfly", "gpt2")]


@pytest.mark.parametrize("kind, arch", MERGE_CASES)
def test_merge_matches_unmerged_and_unmerge_restores_weights(kind, arch, ids):
    model = st.attach(make(arch), cfg_of(kind, arch))
    scramble(model)
    adapted = output(model, ids)
    with model.disabled():
        assert not torch.allclose(output(model, ids), adapted, atol=1e-3)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    after = base_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(".weight"))
    assert all(torch.equal(after[n], before[n]) for n in before if n.endswith(".bias"))  # biases stay
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_delta_weight_is_the_merged_change(kind):
    model = st.attach(make("gpt2"), cfg_of(kind, "gpt2"))
    scramble(model)
    _, adapter, base = adapters(model)[0]
    W = base.weight.T.clone()  # Conv1D: (d_in, d_out) stored
    delta = adapter.delta_weight(base)
    model.merge()
    torch.testing.assert_close(base.weight.T, W + delta, atol=1e-6, rtol=0)


def _expected_count(kind: str, d_in: int, d_out: int) -> int:
    method, kw = CONFIGS[kind]
    if method == "oft":
        b = kw["block_size"] or d_in // kw["r"]
        return b * (b - 1) // 2 * (1 if kw.get("block_share") else d_in // b)
    b, m = kw["block_size"], kw.get("n_butterfly_factor", 1)
    return m * (d_in // b) * b * b + d_out


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("kind", CONFIGS)
def test_param_count_is_the_formula(kind, arch):
    model = st.attach(make(arch), cfg_of(kind, arch))
    expected = sum(_expected_count(kind, *features(base)) for _, _, base in adapters(model))
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert model.adapter_parameter_count("default") == expected
    assert _expected_count(kind, 64, 32) == {"oft": 8 * 28, "oft_neumann": 8 * 28, "oft_share": 120,
                                             "boft": 8 * 64 + 32, "boft_butterfly": 3 * 16 * 16 + 32}[kind]


@pytest.mark.parametrize("order", [["lora", "default"], ["default", "lora"]])
@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_with_lora_on_the_same_layers_merged_equals_unmerged(kind, order, ids):
    """Either order: BOFT's output scale folds at its place in the order, its rotation after every adapter."""
    model = st.attach(tiny_llama(), st.LoraConfig(r=4, targets=["v_proj"]), name="lora")
    model.add(cfg_of(kind), name="default")
    scramble(model)
    model.use(order)
    adapted = output(model, ids)
    before = base_tensors(model)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=TOL, rtol=1e-4)
    model.unmerge()
    for n, p in base_tensors(model).items():
        torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL)


def test_mixed_batch_rows_equal_each_adapter_alone(ids):
    model = st.attach(make("gpt2"), cfg_of("oft", "gpt2"), name="a")
    model.add(cfg_of("boft_butterfly", "gpt2"), name="b")
    scramble(model)
    names = ["a", "b", None, "b", "a", None]
    batch = torch.cat([ids, ids.flip(0)])
    assert_rows_match_alone(model, batch, names, atol=TOL)


def test_dropout_sets_blocks_to_identity_in_training_only():
    torch.manual_seed(0)
    model = st.attach(torch.nn.Sequential(torch.nn.Linear(16, 4)), OftConfig(targets=["0"], block_size=4, dropout=0.5))
    oft = model.model[0].adapters["default"]
    scramble(model)
    model.eval()
    full = oft.blocks().detach()
    model.train()
    dropped = oft.blocks().detach()
    same = [torch.equal(dropped[j], full[j]) for j in range(4)]
    identity = [torch.equal(dropped[j], torch.eye(4)) for j in range(4)]
    assert sum(identity) == 2 and all(s != i for s, i in zip(same, identity, strict=True))


def test_bias_option_trains_the_wrapped_biases():
    model = st.attach(tiny_gpt2(), BoftConfig(targets=["c_attn"], block_size=8, bias="boft_only"))
    keys = list(model.adapter_state_dict())
    assert sum(k.endswith("c_attn.base_layer.bias") for k in keys) == 2  # the two c_attn biases
    assert not any("c_fc" in k or "ln_" in k for k in keys)
    assert sum(p.numel() for _, p in model.trainable_parameters()) == 2 * (8 * 64 + 192 + 192)


@pytest.mark.parametrize("kind", ["oft_neumann", "boft_butterfly"])
def test_half_precision_base_keeps_its_dtype_and_merges(kind):
    model = st.attach(tiny_llama().to(torch.bfloat16), cfg_of(kind))
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = output(model, ids)
    assert ref.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for _, p in model.trainable_parameters())
    scramble(model, scale=0.05)
    adapted = output(model, ids)
    model.merge()
    torch.testing.assert_close(output(model, ids), adapted, atol=0.1, rtol=0.05)  # bf16: ~3 significant digits


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_training_lowers_the_loss(kind):
    model = st.attach(tiny_llama(), cfg_of(kind))
    data = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=6, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05, losses


def test_coft_training_keeps_q_inside_the_radius():
    model = st.attach(tiny_llama(), cfg_of("oft", coft=True, eps=0.05))
    data = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = fit(model, data, steps=2, lr=0.5)  # large steps: the projection has to act
    assert losses[-1] != losses[0] and all(math.isfinite(v) for v in losses)
    model.eval()
    model(input_ids=data)
    for _, oft, _ in adapters(model):
        radius = 0.05 / math.sqrt(oft.Q.shape[0])
        norms = torch.linalg.matrix_norm(oft.skew(oft.Q.detach()))
        assert (norms <= radius * (1 + 2e-6)).all() and (norms > radius * 0.5).any()


# -- HF PEFT interop --------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


class _BlockDiag:
    """Stand-in for PEFT's CUDA `fbd_cuda` kernel (block_diag per factor): without it PEFT silently builds
    one butterfly factor; with it, PEFT's own n_butterfly_factor > 1 path runs on the CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*f.unbind(0)) for f in x.unbind(0)])]


@pytest.fixture
def peft_butterfly(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiag)


PEFT_CASES = {  # name -> (PEFT config class name, kwargs); sizes for hidden 64 (q_proj 64 -> 64, v_proj 64 -> 32)
    "oft": ("OFTConfig", dict(oft_block_size=8, use_cayley_neumann=False)),
    "oft_neumann": ("OFTConfig", dict(oft_block_size=8)),  # PEFT's default: the series, 5 terms
    "oft_neumann_3": ("OFTConfig", dict(oft_block_size=16, num_cayley_neumann_terms=3)),
    "oft_r_share": ("OFTConfig", dict(r=4, oft_block_size=0, block_share=True)),
    "oft_coft": ("OFTConfig", dict(oft_block_size=8, coft=True, eps=1e-2)),
    "oft_adjusted": ("OFTConfig", dict(oft_block_size=24)),  # not a divisor of 64: both use 16
    "boft": ("BOFTConfig", dict(boft_block_size=8)),
    "boft_num": ("BOFTConfig", dict(boft_block_size=0, boft_block_num=4)),
    "boft_butterfly": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=3)),
}


def _peft_model(case: str):
    cls, kwargs = PEFT_CASES[case]
    config = getattr(peft, cls)(target_modules=TARGETS["llama"], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on the block-size adjustment / missing CUDA extension
        return peft.get_peft_model(tiny_llama(), config)


def _scramble_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "boft_s" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", PEFT_CASES)
def test_load_adapter_saved_by_peft_gives_peft_outputs(case, ids, tmp_path, peft_butterfly):
    pm = _peft_model(case)
    _scramble_peft(pm)
    pm.eval()
    expected = output(pm, ids)
    assert not torch.allclose(expected, output(tiny_llama(), ids), atol=1e-3)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = st.load(tiny_llama(), tmp_path)
    assert ours.configs["default"].method == PEFT_CASES[case][0][:-6].lower()
    assert any("using block_size=16" in str(w.message) for w in caught) == (case == "oft_adjusted")
    torch.testing.assert_close(output(ours, ids), expected, atol=TOL, rtol=TOL)
    if case == "oft_coft":  # both projected Q the same way in their first forward
        ours_q = {n.removeprefix("model."): a.Q for n, a, _ in adapters(ours)}
        for name, p in pm.named_parameters():
            if "oft_R" in name:
                module = name.removeprefix("base_model.model.").split(".oft_R")[0]
                torch.testing.assert_close(ours_q[module], p, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", ["OFTConfig", "BOFTConfig"])
def test_peft_interop_on_linears_with_biases(method, ids, tmp_path):
    def base():
        return with_biases(tiny_llama(attention_bias=True))

    kwargs = dict(oft_block_size=8) if method == "OFTConfig" else dict(boft_block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base(), getattr(peft, method)(target_modules=TARGETS["llama"], **kwargs))
    _scramble_peft(pm)
    expected = output(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = st.load(base(), tmp_path / "peft")
    torch.testing.assert_close(output(ours, ids), expected, atol=TOL, rtol=TOL)
    ours.save(tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(back, ids), expected, atol=TOL, rtol=TOL)


EXPORT_CASES = {
    "oft": OftConfig(targets=["q_proj", "v_proj"], block_size=8),
    "oft_neumann_share": OftConfig(targets=["q_proj", "v_proj"], r=2, block_size=0, neumann=True, neumann_terms=6,
                                   block_share=True),
    "oft_coft": OftConfig(targets=["q_proj", "v_proj"], block_size=8, coft=True, eps=0.05),
    "oft_layer1": OftConfig(targets="all-linear", block_size=16, layers=[1]),
    "boft": BoftConfig(targets=["q_proj", "v_proj"], block_num=8, block_size=0),
    "boft_butterfly": BoftConfig(targets=["q_proj", "v_proj"], block_size=4, n_butterfly_factor=2),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_peft_format_export_loads_in_peft_with_same_outputs(case, ids, tmp_path, peft_butterfly):
    cfg = EXPORT_CASES[case]
    model = st.attach(tiny_llama(), cfg)
    scramble(model)
    ours = output(model, ids)
    model.save(tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_cls = peft.OFTConfig if cfg.method == "oft" else peft.BOFTConfig
    assert set(written) == set(peft_cls().to_dict()), f"exactly PEFT's {peft_cls.__name__} fields"
    assert written["peft_type"] == cfg.method.upper()
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=TOL, rtol=TOL)
    assert st.load(tiny_llama(), tmp_path).configs["default"] == (cfg if case != "oft_layer1" else
                                                                   cfg.replace(targets=written["target_modules"],
                                                                               layers=None))


@pytest.mark.parametrize("case", ["oft", "oft_r_share", "boft_num", "boft_butterfly"])
def test_param_count_equals_peft_s_trainable_count(case, peft_butterfly):
    pm = _peft_model(case)
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    cls, kwargs = PEFT_CASES[case]
    data = {**pm.peft_config["default"].to_dict(), "target_modules": TARGETS["llama"]}
    from slimtune.adapter_files import config_from_json

    ours = st.attach(tiny_llama(), config_from_json(json.loads(json.dumps(data, default=list))))
    assert ours.adapter_parameter_count("default") == theirs


def test_peft_tensor_keys_and_shapes_match_peft_exactly(tmp_path, peft_butterfly):
    from safetensors.torch import load_file

    for case, cfg in (("oft_r_share", OftConfig(targets=TARGETS["llama"], r=4, block_size=0, block_share=True)),
                      ("boft_butterfly", BoftConfig(targets=TARGETS["llama"], block_size=4, n_butterfly_factor=3))):
        _peft_model(case).save_pretrained(tmp_path / case / "peft")
        st.attach(tiny_llama(), cfg).save(tmp_path / case / "ours", format="peft")
        theirs = load_file(tmp_path / case / "peft" / "adapter_model.safetensors")
        ours = load_file(tmp_path / case / "ours" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_gpt2_conv1d_export_to_peft_is_refused(tmp_path):
    model = st.attach(tiny_gpt2(), OftConfig(targets=["c_attn"], block_size=8))
    with pytest.raises(NotImplementedError, match="PEFT 0.21's OFT supports Linear only"):
        model.save(tmp_path, format="peft")


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("block_size", -1, "an int >= 0"),
    ("block_size", 1, "an int >= 2"),
    ("block_size", 2.5, "an int >= 0"),
    ("r", 4, "exactly one of r=4 and block_size=32"),  # PEFT's rule: the other must be 0
    ("neumann_terms", 0, "an int >= 1"),
    ("eps", 0, "a number > 0"),
    ("dropout", 1.0, r"a float in \[0, 1\)"),
    ("bias", "lora_only", "'none', 'oft_only' or 'all'"),
    ("coft", "yes", "True or False"),
])
def test_bad_oft_config_names_the_value(field, value, message):
    with pytest.raises(st.ConfigError, match=re.escape(f"OftConfig.{field}={value!r}: expected ") + message):
        OftConfig(targets=["q_proj"], **{field: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), "BoftConfig.block_size=0: expected exactly one of block_size=0 and block_num=0"),
    (dict(block_num=4), "BoftConfig.block_num=4: expected exactly one of block_size=4 and block_num=4"),
    (dict(n_butterfly_factor=0), "BoftConfig.n_butterfly_factor=0: expected an int >= 1"),
    (dict(bias="oft_only"), "BoftConfig.bias='oft_only': expected 'none', 'boft_only' or 'all'"),
])
def test_bad_boft_config_names_the_value(kwargs, message):
    with pytest.raises(st.ConfigError, match=re.escape(message)):
        BoftConfig(targets=["q_proj"], **kwargs)


def test_boft_sizes_that_do_not_fit_the_layer_are_refused_naming_it():
    with pytest.raises(st.ConfigError, match=r"v_proj .*d_in=64.*must be divisible by block_size=6"):
        st.attach(tiny_llama(), BoftConfig(targets=["v_proj"], block_size=6))
    with pytest.raises(st.ConfigError, match=r"block_size \* 2\^\(n_butterfly_factor - 1\) = 128"):
        st.attach(tiny_llama(), BoftConfig(targets=["v_proj"], block_size=32, n_butterfly_factor=3))


def test_peft_field_names_get_a_hint_and_unsupported_bases_are_refused():
    with pytest.raises(st.ConfigError, match="Did you mean 'block_size'"):
        st.config_from_dict({"method": "oft", "targets": ["q_proj"], "oft_block_size": 8})
    with pytest.raises(st.ConfigError, match="Did you mean 'n_butterfly_factor'"):
        st.config_from_dict({"method": "boft", "targets": ["q_proj"], "boft_n_butterfly_factor": 2})
    with pytest.raises(NotImplementedError, match=r"oft on \S+ \(Embedding\) is not implemented"):
        st.attach(tiny_llama(), OftConfig(targets=["embed_tokens"]))
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(NotImplementedError, match=r"boft on \S+ \(Conv2d\) is not implemented"):
        st.attach(conv, BoftConfig(targets=["0"], block_size=2))


def test_layers_are_the_registered_classes():
    model = st.attach(tiny_llama(), cfg_of("oft"))
    model.add(cfg_of("boft"), name="b")
    kinds = {type(m.adapters[n]) for _, m in model.named_modules() if isinstance(m, AdapterLayer) for n in m.adapters}
    assert kinds == {Oft, Boft}


@pytest.mark.parametrize("cfg", [OftConfig(block_size=16, targets=["q_proj"]),
                                 BoftConfig(block_size=4, targets=["q_proj"])])
def test_adapted_model_moves_between_devices_and_dtypes(cfg, ids):
    """`.to()` reaches the adapters (nn.Module._apply must not be shadowed by a method of the adapter)."""
    model = st.attach(tiny_llama(), cfg).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert output(model, ids).dtype == torch.float64
