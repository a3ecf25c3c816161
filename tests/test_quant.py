"""Quantized bases (slimtune/quant): number formats, QuantLinear, QLoRA, merges into 4-bit, LoftQ, bitsandbytes."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import slimtune as st
import slimtune.quant as sq
import tests.test_contract as tc
from slimtune.layer import AdapterLayer
from slimtune.methods import METHODS
from slimtune.quant import formats
from tests.conftest import VOCAB, fit, output, randomize, tiny_llama

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def gaussian(d_out: int = 512, d_in: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def quantized_llama(fmt: str = "nf4", **kw) -> nn.Module:
    return sq.quantize(tiny_llama(), fmt, **kw)


def wrapped(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def rel_mae(fmt: str, double_quant: bool = True) -> float:
    W = gaussian()
    W_hat = formats.dequantize(formats.quantize(W, fmt, 64, double_quant), tuple(W.shape), fmt)
    return ((W - W_hat).abs().mean() / W.abs().mean()).item()


# -- formats -------------------------------------------------------------------------------------------
# Reference values: bitsandbytes 0.50.2 on the same N(0, 1) matrices gives 0.0912 (nf4) and 0.1211 (fp4);
# int8 per-row absmax: step a/127 with a ~ 3.2 sigma (max of 512 draws), MAE = step/4 -> ~0.0080 of E|x|.
@pytest.mark.parametrize(("fmt", "expected", "tol"), [("nf4", 0.0912, 0.002), ("fp4", 0.1211, 0.003),
                                                      ("int8", 0.0080, 0.0008)])
def test_round_trip_error_on_gaussian_weights(fmt, expected, tol):
    assert abs(rel_mae(fmt) - expected) < tol
    if fmt != "int8":  # double quantisation of the scales costs almost nothing
        assert abs(rel_mae(fmt, double_quant=False) - rel_mae(fmt)) < 1e-3


def test_zero_is_exact_and_the_block_max_is_kept():
    W = gaussian(8, 64)
    W[0, :5] = 0.0
    state = formats.quantize(W, "nf4", 64, double_quant=False)
    W_hat = formats.dequantize(state, (8, 64), "nf4")
    assert torch.equal(W_hat[0, :5], torch.zeros(5))
    rows = W.abs().argmax(1)
    torch.testing.assert_close(W_hat[torch.arange(8), rows], W[torch.arange(8), rows], atol=0, rtol=0)


@needs_bnb
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 100), (7, 34), (320, 576)])  # last dims even: bnb compiles odd ones
def test_codes_and_values_identical_to_bitsandbytes(fmt, shape):
    import bitsandbytes.functional as bf

    W = gaussian(*shape) * 0.02
    packed, ref = bf.quantize_4bit(W, blocksize=64, quant_type=fmt, compress_statistics=False)
    ours = formats.quantize_4bit(W, fmt, 64, double_quant=False)
    assert torch.equal(ours["weight"], packed) and torch.equal(ours["absmax"], ref.absmax)
    assert torch.equal(formats.dequantize_4bit_torch(ours, shape, fmt), bf.dequantize_4bit(packed, ref))
    # double quantisation: same 4-bit codes; bitsandbytes reads our nested state to the same values
    ours = formats.quantize_4bit(W, fmt, 64, double_quant=True)
    packed, ref = bf.quantize_4bit(W, blocksize=64, quant_type=fmt, compress_statistics=True)
    assert torch.equal(ours["weight"], packed) and torch.equal(ours["offset"], ref.offset)
    nested = bf.QuantState(absmax=ours["absmax2"], code=formats.code_book("dynamic").clone(), blocksize=256,
                           dtype=torch.float32)
    state = bf.QuantState(absmax=ours["absmax"], shape=torch.Size(shape), code=bf.get_4bit_type(fmt, device="cpu"),
                          blocksize=64, quant_type=fmt, dtype=torch.float32, offset=ours["offset"], state2=nested)
    assert torch.equal(bf.dequantize_4bit(ours["weight"], state), formats.dequantize_4bit_torch(ours, shape, fmt))
    # QuantLinear's dequantization (bitsandbytes' kernel where it runs) is the torch path bit for bit
    assert torch.equal(formats.dequantize_4bit(ours, shape, fmt), formats.dequantize_4bit_torch(ours, shape, fmt))
    # the 8-bit absmax codes are the exact nearest (bitsandbytes' torch backend); its native CPU search
    # (BinSearch Direct2) picks the neighbouring code for ~0.2% of near-zero centred scales
    diff = (ours["absmax"].long() - ref.absmax.long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("shape", [(5, 7), (64, 96)])  # an odd count runs in torch, an even one in bitsandbytes
def test_dequantize_dispatch_equals_the_torch_path(shape):
    ours = formats.quantize_4bit(gaussian(*shape), "nf4", 64, double_quant=True)
    fast = formats.dequantize_4bit(ours, shape, "nf4", dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert torch.equal(fast, formats.dequantize_4bit_torch(ours, shape, "nf4").to(torch.bfloat16))


@needs_bnb
def test_dynamic_map_and_int8_identical_to_bitsandbytes():
    import bitsandbytes.functional as bf

    assert torch.equal(formats.code_book("dynamic"), bf.create_dynamic_map())
    W = gaussian(64, 96)
    codes, stats, _ = bf.int8_vectorwise_quant(W)
    ours = formats.quantize_int8(W)
    assert torch.equal(ours["weight"], codes) and torch.equal(ours["absmax"], stats)
    assert torch.equal(formats.dequantize_int8(ours), bf.int8_vectorwise_dequant(codes, stats))


@pytest.mark.parametrize(("fmt", "double_quant", "bits"), [("nf4", True, 4 + 8 / 64 + 32 / (64 * 256)),
                                                          ("nf4", False, 4.5), ("fp4", True, 4.127),
                                                          ("int8", True, 8 + 32 / 1024)])
def test_stored_bits_per_parameter(fmt, double_quant, bits):
    layer = sq.QuantLinear.from_linear(nn.Linear(1024, 1024, bias=False), fmt, double_quant=double_quant)
    assert layer.bits_per_parameter() == pytest.approx(bits, abs=1e-3)
    assert not any(b.is_floating_point() and b.numel() > 1024 * 1024 // 64 for b in layer.buffers())  # no float copy


# -- QuantLinear and st.quantize -------------------------------------------------------------------------
def test_quantize_keeps_head_and_skip_float_and_checks_its_arguments(ids):
    model = quantized_llama(skip=["down_proj"])
    kinds = {n.split(".")[-1]: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, sq.QuantLinear))}
    assert kinds == {"q_proj": sq.QuantLinear, "k_proj": sq.QuantLinear, "v_proj": sq.QuantLinear,
                     "o_proj": sq.QuantLinear, "gate_proj": sq.QuantLinear, "up_proj": sq.QuantLinear,
                     "down_proj": nn.Linear, "lm_head": nn.Linear}
    with pytest.raises(st.ConfigError, match="Did you mean 'nf4'"):
        sq.quantize(tiny_llama(), "nf5")
    with pytest.raises(st.ConfigError, match="block_size"):
        sq.quantize(tiny_llama(), "nf4", block_size=48)
    with pytest.raises(st.ConfigError, match="no nn.Linear"):
        sq.quantize(model, "nf4", skip=["down_proj"])  # nothing left outside the head and skip


def test_forward_equals_a_float_linear_on_the_dequantized_weight_and_dtype_casts_keep_the_scales():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = sq.QuantLinear.from_linear(linear, "nf4")
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), linear.bias), atol=0, rtol=0)
    scales = {n: b.clone() for n, b in q.named_buffers() if n != "_compute"}
    q.half()
    assert q.compute_dtype == torch.float16 and q.bias.dtype == torch.float16 and q(x.half()).dtype == torch.float16
    assert all(torch.equal(scales[n], b) and scales[n].dtype == b.dtype for n, b in q.named_buffers() if n in scales)


def test_a_bf16_compute_dtype_gives_bf16_adapters_on_an_fp32_model(ids):
    model = st.attach(quantized_llama(compute_dtype=torch.bfloat16), st.LoraConfig(r=4, targets="all-linear"))
    assert {p.dtype for _, p in model.trainable_parameters()} == {torch.bfloat16}
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and all(p.grad is not None for _, p in model.trainable_parameters())


def test_state_dict_round_trip_of_a_quantized_model(ids):
    model = quantized_llama()
    fresh = sq.quantize(tiny_llama(seed=5), "nf4")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(output(fresh, ids), output(model, ids))


# -- QLoRA -------------------------------------------------------------------------------------------------
def _float_twin(model: nn.Module) -> nn.Module:
    """The same model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    return sq.dequantize(copy.deepcopy(model))


def assert_float_path_gradients(quant: st.TunedModel, plain: st.TunedModel, ids: torch.Tensor) -> None:
    """With the same (randomised) adapter tensors, a quantized base's adapter gets the gradients of the same
    adapter on the dequantized float base."""
    randomize(quant)
    plain.load_adapter_state_dict(quant.adapter_state_dict())
    grads = []
    for model in (quant, plain):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.trainable_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("config", [st.LoraConfig(r=4, targets="all-linear"), st.DoraConfig(r=2, targets=["q_proj"])],
                         ids=["lora", "dora"])
def test_qlora_gradients_equal_the_float_path_on_the_dequantized_weights(config, ids):
    base = quantized_llama()
    twin = _float_twin(base)
    quant, plain = st.attach(base, config), st.attach(twin, config)
    assert_float_path_gradients(quant, plain, ids)


def test_gradient_checkpointing_gives_the_same_gradients(ids):
    grads = []
    for checkpointing in (False, True):
        base = quantized_llama()
        if checkpointing:  # transformers 5 renamed it; 4.57 has only the old name
            enable = getattr(base, "activation_checkpointing_enable", None)
            kwargs = {"use_reentrant": False}
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        model = st.attach(base, st.LoraConfig(r=4, targets="all-linear"))
        randomize(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_backward_saves_no_float_copy_of_the_weight():
    q = sq.QuantLinear.from_linear(nn.Linear(256, 256, bias=False), "nf4")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert saved and not any(t.is_floating_point() and t.numel() >= 256 * 256 for t in saved)


def test_save_then_load_is_exact_on_a_quantized_base(ids, tmp_path):
    model = st.attach(quantized_llama(), st.LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    model.save(tmp_path / "a")
    loaded = st.load(quantized_llama(), tmp_path / "a")
    assert torch.equal(output(loaded, ids), output(model, ids))


def test_a_toy_fit_lowers_the_loss_on_a_4bit_base():
    data = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model = st.attach(quantized_llama(), st.LoraConfig(r=8, targets="all-linear"))
    losses = fit(model, data, steps=6, lr=1e-2)  # 6.94 -> 6.22 here
    assert losses[-1] < 0.95 * losses[0] and losses == sorted(losses, reverse=True)


# -- every layer method on a 4-bit base ----------------------------------------------------------------------
def _shape(example_id: str) -> str:
    return METHODS[tc.EXAMPLES[example_id].config().method].shape


# layer and input methods (selective ones train entries of base weights, which a 4-bit base does not have as
# parameters); PeriodicLoRA folds every stage into the base, so it refuses a lossy kind (tested below)
LLAMA_ROWS = [k for k in tc.EXAMPLES if k.endswith("-llama") and _shape(k) != "selective" and "periodic" not in k]


@pytest.mark.parametrize("example_id", LLAMA_ROWS)
def test_every_method_runs_unchanged_on_a_4bit_base(example_id, ids):
    ex = tc.EXAMPLES[example_id]
    ref = output(quantized_llama(), ids)
    model = tc.attach_example(dataclasses.replace(ex, make=quantized_llama))
    tc.perturb(model)
    assert not torch.allclose(output(model, ids), ref)
    with model.disabled():
        assert torch.equal(output(model, ids), ref)
    tc.check_gradients(model, ex, ids)


MERGEABLE_ROWS = [k for k in LLAMA_ROWS if METHODS[tc.EXAMPLES[k].config().method].mergeable and _shape(k) == "layer"
                  and "trainable_tokens" not in k  # trainable tokens wraps the (float) embedding only
                  and not k.startswith("boft")]  # BOFT folds its scale, then its rotation: two writes, two roundings


def test_periodic_lora_refuses_a_base_it_cannot_fold_into_exactly():
    with pytest.raises(NotImplementedError, match="not mergeable"):
        st.attach(quantized_llama(), st.PeriodicLoraConfig(r=2, period=2, targets=["q_proj"]))


@pytest.mark.parametrize("example_id", MERGEABLE_ROWS)
def test_merge_into_a_4bit_base_is_the_float_merge_requantized(example_id):
    model = st.attach(quantized_llama(), tc.EXAMPLES[example_id].config())
    tc.perturb(model)
    exact = sq.dequantize(copy.deepcopy(model)).merge()
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge()
    errors = sq.merge_errors(model)
    for name, layer in wrapped(model).items():
        W = exact.get_submodule(name).base_layer.weight.detach()  # the exact merged weight
        want = formats.quantize(W, "nf4")
        assert torch.equal(layer.base_layer.weight, want["weight"]), name
        lost = (formats.dequantize(want, tuple(W.shape), "nf4") - W).norm()
        assert errors[name + ".base_layer"].weight == pytest.approx((lost / W.norm()).item(), rel=1e-4)


def test_merge_error_reports_how_much_of_a_small_update_is_rounded_away():
    q = sq.QuantLinear.from_linear(nn.Linear(128, 128, bias=False), "nf4")
    kind = st.bases.kind_of(q)
    W = kind.weight(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kind.write_weight(q, W + 1e-4 * gaussian(128, 128))  # far below half a code step
    assert q.merge_error.update > 0.9 and q.merge_error.weight < 1e-2


def test_dequantize_then_merge_is_exact(ids):
    model = st.attach(quantized_llama(), st.LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    adapted = output(model, ids)
    plain = sq.dequantize(model).detach(merge=True)
    assert not any(isinstance(m, sq.QuantLinear) for m in plain.modules())
    torch.testing.assert_close(output(plain, ids), adapted, atol=1e-5, rtol=1e-5)


# -- LoftQ ----------------------------------------------------------------------------------------------------
def test_loftq_error_is_below_the_qlora_init_error():
    W = gaussian(128, 256) * 0.02 + gaussian(128, 8, 1) @ gaussian(8, 256, 2) * 0.01  # weights with a low-rank part
    one, five = sq.loftq_errors(W, rank=8, iters=1), sq.loftq_errors(W, rank=8, iters=5)
    assert one.qlora == five.qlora
    assert five.loftq <= one.loftq < one.qlora


def test_lora_loftq_init_starts_from_the_loftq_factors(ids):
    float_out = output(tiny_llama(), ids)
    qlora = output(quantized_llama(), ids)
    base = quantized_llama(loftq_rank=4, loftq_iter=2)
    report = sq.loftq_report(base)
    assert report and all(loftq < qlora_err for loftq, qlora_err in report.values())
    model = st.attach(base, st.LoraConfig(r=4, alpha=8, init="loftq", targets="all-linear"))
    layer = model.model.model.layers[0].self_attn.q_proj
    adapter, q = layer.adapters["default"], layer.base_layer
    torch.testing.assert_close(adapter.delta_weight(q), q.loftq_P @ q.loftq_R, atol=1e-6, rtol=1e-5)
    assert (output(model, ids) - float_out).norm() < (qlora - float_out).norm()


def test_lora_loftq_init_needs_a_loftq_base_of_its_rank():
    with pytest.raises(st.ConfigError, match="loftq_rank"):
        st.attach(quantized_llama(), st.LoraConfig(r=4, init="loftq", targets=["q_proj"]))
    with pytest.raises(st.ConfigError, match="rank 2"):
        st.attach(quantized_llama(loftq_rank=2), st.LoraConfig(r=4, init="loftq", targets=["q_proj"]))


# -- transformers' BitsAndBytesConfig(load_in_4bit=True) --------------------------------------------------------
@needs_bnb
def test_a_bitsandbytes_4bit_model_takes_lora_trains_and_merges(tmp_path, ids):
    import transformers

    tiny_llama().save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config,
                                                             device_map="cpu")
    assert st.bases.kind_of(base.model.layers[0].self_attn.q_proj).name == "bnb_linear4bit"
    model = st.attach(base, st.LoraConfig(r=4, targets="all-linear"))
    losses = fit(model, ids, steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    adapted = output(model, ids)
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge()
    assert sq.merge_errors(model) and (output(model, ids) - adapted).abs().max() < 0.2 * adapted.abs().max()


# -- slimtune train: model.quantize ------------------------------------------------------------------------------
def test_train_config_quantize_option_and_the_qlora_example(tmp_path):
    from slimtune.train.config import TrainConfig, TrainConfigError, load_train_config
    from slimtune.train.models import load_base_model

    cfg = load_train_config("examples/qlora.yaml")
    assert cfg.model.quantize == "nf4" and cfg.method["targets"] == "all-linear"
    with pytest.raises(TrainConfigError, match="quantize"):
        TrainConfig.from_dict({"model": {"quantize": "nf3"}})
    tiny_llama().save_pretrained(tmp_path / "base")
    model = load_base_model(str(tmp_path / "base"), "causal_lm", quantize="nf4")
    assert isinstance(model.model.layers[0].mlp.up_proj, sq.QuantLinear) and isinstance(model.lm_head, nn.Linear)
