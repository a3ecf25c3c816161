"""Merging adapters: every combination type equals HF PEFT's add_weighted_adapter on the same LoRAs,
DARE keeps the scale, negation undoes addition, TIES by hand, other methods via dense deltas, files, CLI."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.multitask import merge_adapters
from slimtune.multitask.merge_math import combine, random_prune
from tests.conftest import output, randomize, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

# "first" and "second": rank 4 on the same modules, different scales; "third": rank 2, other modules too
ADAPTERS = {
    "first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "second": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "third": dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"]),
}
FACTOR_ATOL = 0  # factor methods: the same float ops as PEFT's, in the same order: bitwise equal
SVD_ATOL = 1e-5  # SVD methods: B @ A (|B A| ~ 1) compared, as U, V are unique up to sign only; seen: < 1e-6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The three LoRAs, random, saved by PEFT (the folder holds one subfolder per adapter)."""
    tmp = tmp_path_factory.mktemp("loras")
    names = list(ADAPTERS)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**ADAPTERS[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(**ADAPTERS[n]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp, save_embedding_layers=False)  # "auto" would add the whole embedding matrix
    return tmp


def _both(saved, names):
    pm = peft.PeftModel.from_pretrained(tiny_llama(), saved / names[0], adapter_name=names[0])
    ours = st.load(tiny_llama(), saved / names[0], name=names[0])
    for n in names[1:]:
        pm.load_adapter(saved / n, adapter_name=n)
        st.load(ours, saved / n, name=n)
    return pm.eval(), ours


def _peft_factors(pm, name):
    from peft.tuners.lora import LoraLayer

    out = {}
    for n, m in pm.named_modules():
        if isinstance(m, LoraLayer) and name in m.scaling:
            assert m.scaling[name] == 1.0
            A, B = (m.lora_A[name].weight, m.lora_B[name].weight) if name in m.lora_A else \
                (m.lora_embedding_A[name], m.lora_embedding_B[name])
            out[n.removeprefix("base_model.model.")] = (A.detach(), B.detach())
    return out


def _our_factors(model, name):
    layers = model.view(name).layers
    assert all(a.scale == 1.0 for a in layers.values())
    return {m: (a.A.detach(), a.B.detach()) for m, a in layers.items()}


def _merge_both(saved, names, weights, method, monkeypatch=None, seed=None, **kw):
    pm, ours = _both(saved, names)
    if seed is not None:  # PEFT draws DARE masks from the global RNG right after building the new adapter
        inject = peft.tuners.lora.LoraModel.inject_adapter

        def seeded(self, *args, **kwargs):
            inject(self, *args, **kwargs)
            torch.manual_seed(seed)
        monkeypatch.setattr(peft.tuners.lora.LoraModel, "inject_adapter", seeded)
    peft_kw = {"svd_rank" if k == "rank" else "svd_clamp" if k == "clamp" else k: v for k, v in kw.items()}
    pm.add_weighted_adapter(names, weights, "merged", combination_type=method, **peft_kw)
    merge_adapters(ours, names, weights, method=method, seed=seed, **kw)
    return pm, ours, _peft_factors(pm, "merged"), _our_factors(ours, "merged")


FACTOR_CASES = {
    "linear": ("linear", [1.0, 0.5], {}),
    "linear_negated": ("linear", [1.0, -0.7], {}),
    "cat": ("cat", [0.8, -0.5], {}),
    "ties_total": ("ties", [1.0, 0.6], {"density": 0.5}),
    "ties_frequency": ("ties", [0.7, 1.2], {"density": 0.4, "majority_sign_method": "frequency"}),
    "magnitude_prune": ("magnitude_prune", [1.0, -0.5], {"density": 0.3}),
}


@pytest.mark.parametrize("case", FACTOR_CASES)
def test_factor_methods_equal_peft_add_weighted_adapter(saved, case):
    method, weights, kw = FACTOR_CASES[case]
    _, _, theirs, ours = _merge_both(saved, ["first", "second"], weights, method, **kw)
    assert theirs.keys() == ours.keys()
    for m in theirs:
        torch.testing.assert_close(ours[m][0], theirs[m][0], atol=FACTOR_ATOL, rtol=0)
        torch.testing.assert_close(ours[m][1], theirs[m][1], atol=FACTOR_ATOL, rtol=0)


SVD_CASES = {
    "svd": ("svd", [1.0, 0.5], {}),
    "svd_rank_6_negated": ("svd", [1.0, -0.8], {"rank": 6}),
    "ties_svd": ("ties_svd", [1.0, 0.6], {"density": 0.5}),
    "ties_svd_frequency": ("ties_svd", [0.5, 1.0], {"density": 0.7, "majority_sign_method": "frequency"}),
    "magnitude_prune_svd": ("magnitude_prune_svd", [1.0, 0.5], {"density": 0.3, "rank": 3}),
}


@pytest.mark.parametrize("case", SVD_CASES)
def test_svd_methods_equal_peft_add_weighted_adapter(saved, case, ids):
    method, weights, kw = SVD_CASES[case]
    pm, model, theirs, ours = _merge_both(saved, ["first", "second"], weights, method, **kw)
    assert theirs.keys() == ours.keys()
    for m in theirs:
        assert ours[m][0].shape == theirs[m][0].shape
        torch.testing.assert_close(ours[m][1] @ ours[m][0], theirs[m][1] @ theirs[m][0], atol=SVD_ATOL, rtol=0)
    pm.set_adapter("merged")
    torch.testing.assert_close(output(model.use("merged"), ids), output(pm, ids), atol=1e-5, rtol=1e-5)


def test_svd_clamp_equals_peft(saved):
    _, _, theirs, ours = _merge_both(saved, ["first", "second"], [1.0, 0.5], "svd", clamp=0.9)
    for m in theirs:  # the clamp quantile is sign-invariant only if the SVD signs agree: compare factors
        sign = torch.sign((ours[m][0] * theirs[m][0]).sum(1, keepdim=True))
        torch.testing.assert_close(ours[m][0] * sign, theirs[m][0], atol=SVD_ATOL, rtol=0)
        torch.testing.assert_close(ours[m][1] * sign.T, theirs[m][1], atol=SVD_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_adapters_of_other_ranks_and_modules_equal_peft(saved, method):
    _, _, theirs, ours = _merge_both(saved, ["first", "third"], [1.0, -0.5], method)
    assert theirs.keys() == ours.keys()  # k_proj (third only) included; PEFT pads cat with zero rows, we do not
    for m in theirs:
        torch.testing.assert_close(ours[m][1] @ ours[m][0], theirs[m][1] @ theirs[m][0], atol=SVD_ATOL, rtol=0)


def _tiny_llama_small_vocab():
    return tiny_llama(vocab_size=96)


OTHER_KINDS = {  # PEFT keeps its own layout for these: GPT-2 Conv1D (fan_in_fan_out) and Embedding (transposed)
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "embedding": (_tiny_llama_small_vocab, dict(target_modules=["embed_tokens", "q_proj"])),
}


@pytest.mark.parametrize("method", ["linear", "ties", "ties_svd"])
@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_conv1d_and_embedding_merges_equal_peft(kind, method, tmp_path):
    make, targets = OTHER_KINDS[kind]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=2, **targets), adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, **targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path, save_embedding_layers=False)
    ours = st.load(make(), tmp_path / "first", name="first")
    st.load(ours, tmp_path / "second", name="second")
    kw = {"density": 0.5} if "ties" in method else {}
    pm.add_weighted_adapter(["first", "second"], [1.0, -0.5], "merged", combination_type=method, **kw)
    merge_adapters(ours, ["first", "second"], [1.0, -0.5], method=method, **kw)
    theirs, mine = _peft_factors(pm, "merged"), _our_factors(ours, "merged")
    assert theirs.keys() == mine.keys()
    for m in theirs:
        torch.testing.assert_close(mine[m][1] @ mine[m][0], theirs[m][1] @ theirs[m][0], atol=SVD_ATOL, rtol=0)


DARE_CASES = {
    "dare_linear": ("dare_linear", {"density": 0.5}),
    "dare_ties": ("dare_ties", {"density": 0.6}),
    "dare_linear_svd": ("dare_linear_svd", {"density": 0.5}),
    "dare_ties_svd": ("dare_ties_svd", {"density": 0.4, "majority_sign_method": "frequency"}),
}


@pytest.mark.parametrize("case", DARE_CASES)
def test_dare_on_the_same_random_stream_equals_peft(saved, case, monkeypatch):
    method, kw = DARE_CASES[case]
    _, _, theirs, ours = _merge_both(saved, ["first", "second"], [1.0, 0.7], method, monkeypatch, seed=11, **kw)
    for m in theirs:
        torch.testing.assert_close(ours[m][1] @ ours[m][0], theirs[m][1] @ theirs[m][0], atol=SVD_ATOL, rtol=0)


def test_dare_keeps_the_expected_scale():
    p, n = 0.3, 400
    tau = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    pruned = random_prune(tau, p, g)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - p) < 0.023  # 5 sigma, sigma = sqrt(p (1 - p) / 10^4)
    torch.testing.assert_close(pruned[kept], tau[kept] / p)  # survivors rescaled by 1 / density
    mean = torch.stack([random_prune(tau, p, g) for _ in range(n)]).mean(0)
    z = (mean - tau) / (tau.abs() * ((1 - p) / (p * n)) ** 0.5)  # ~ N(0, 1) per entry iff E[pruned] = tau
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05  # 5 sigma over 10^4 entries
    merged = combine("dare_linear", [tau, -tau], [1.0, 1.0], density=p, generator=g)  # E = 0, not 0 each draw
    assert merged.ne(0).any() and abs(merged.mean().item()) < 0.05


def test_ties_by_hand():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.1])
    t2 = torch.tensor([-1.5, 1.0, 2.0, -0.1, 0.9])
    t3 = torch.tensor([0.0, 0.0, 0.0, 0.0, -5.0])
    # density 0.6 keeps 3 of 5: t1 -> [0, -2, 3, 0, 1.1]; t2 -> [-1.5, 1, 2, 0, 0]; t3 -> [0, 0, 0, 0, -5]
    # total mass: [-1.5, -1, 5, 0, -3.9] -> signs [-, -, +, +, -]: entry 4 keeps t3 alone
    total = combine("ties", [t1, t2, t3], [1.0, 1.0, 1.0], density=0.6)
    torch.testing.assert_close(total, torch.tensor([-1.5, -2.0, 2.5, 0.0, -5.0]))
    # frequency: sign counts [-1, 0, 2, 0, 0] -> [-, +, +, +, +]: entry 1 keeps t2, entry 4 keeps t1
    freq = combine("ties", [t1, t2, t3], [1.0, 2.0, 1.0], density=0.6, majority_sign_method="frequency")
    torch.testing.assert_close(freq, torch.tensor([-3.0, 2.0, 3.5, 0.0, 1.1]))


def _deltas(model, name):
    return {m: a.delta_weight(model.view(name).bases[m]) for m, a in model.view(name).layers.items()}


def test_negation_undoes_addition(saved):
    _, model = _both(saved, ["first", "second"])
    merge_adapters(model, ["first", "second"], [1.0, 1.0], method="cat", name="sum")
    merge_adapters(model, ["sum", "second"], [1.0, -1.0], method="cat", name="back")
    merge_adapters(model, ["sum", "second"], [1.0, -1.0], method="svd", rank=4, name="back_svd")
    first = _deltas(model, "first")
    for name in ("back", "back_svd"):
        back = _deltas(model, name)
        assert back.keys() == first.keys()
        for m in first:
            torch.testing.assert_close(back[m], first[m], atol=1e-5, rtol=0)


def test_ia3_and_lora_merge_through_dense_deltas(ids):
    model = st.attach(tiny_llama(), st.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
                      name="ia3")
    model.add(st.LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="lora")
    randomize(model)
    with pytest.raises(st.ConfigError, match="'ia3' \\(ia3\\) has no such factors.*'ties_svd'"):
        merge_adapters(model, ["ia3", "lora"], [1.0, 0.5], method="ties", density=0.5)
    merge_adapters(model, ["ia3", "lora"], [1.0, 0.5], method="svd", rank="full")
    expected = tiny_llama()  # W0 + 1.0 * (diag(l) W0 - W0) + 0.5 * s B A, module by module (W0 diag(l): down_proj)
    ia3, lora = model.view("ia3").layers, model.view("lora").layers
    with torch.no_grad():
        for m, module in expected.named_modules():
            if m in ia3:
                module.weight.mul_(ia3[m].l)  # l: (d_out, 1) scales rows, (1, d_in) on down_proj columns
            if m in lora:
                module.weight.add_(0.5 * lora[m].delta_weight(None))
    assert set(model.view("merged").layers) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                                                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "mlp.down_proj")}
    torch.testing.assert_close(output(model.use("merged"), ids), output(expected, ids), atol=1e-5, rtol=1e-4)


def test_merged_adapter_saves_and_loads_exactly(saved, ids, tmp_path):
    _, model = _both(saved, ["first", "third"])
    merge_adapters(model, ["first", "third"], [1.0, 0.5], method="ties_svd", density=0.5, rank=3, name="both")
    model.save(tmp_path, name="both")
    loaded = st.load(tiny_llama(), tmp_path)
    assert loaded.configs["default"].r == 3 and loaded.configs["default"].alpha == 3
    for k, v in model.adapter_state_dict("both").items():
        assert torch.equal(loaded.adapter_state_dict("default")[k], v)
    torch.testing.assert_close(output(loaded, ids), output(model.use("both"), ids), atol=0, rtol=0)


def test_bad_inputs_are_named(saved):
    _, model = _both(saved, ["first", "second"])
    with pytest.raises(st.AdapterNameError, match="'frist'.*Did you mean 'first'"):
        merge_adapters(model, ["frist", "second"])
    with pytest.raises(st.ConfigError, match="Did you mean 'ties'"):
        merge_adapters(model, ["first", "second"], method="tie")
    with pytest.raises(st.ConfigError, match="needs density"):
        merge_adapters(model, ["first", "second"], method="dare_ties")
    with pytest.raises(st.ConfigError, match="expected 2 finite numbers"):
        merge_adapters(model, ["first", "second"], [1.0])
    with pytest.raises(st.ConfigError, match="rank= and clamp= apply to the SVD methods"):
        merge_adapters(model, ["first", "second"], method="linear", rank=2)
    model.add(st.PromptTuningConfig(num_virtual_tokens=2), name="prompt")
    with pytest.raises(NotImplementedError, match="'prompt' \\(prompt_tuning, input shape\\) cannot be merged"):
        merge_adapters(model, ["first", "prompt"])
    assert "merged" not in model.configs


def _gpt2_with_biases():
    model = tiny_gpt2()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)  # GPT-2 starts them at 0: IA3's bias scaling would be invisible
    return model


SINGLE_CASES = {  # one adapter merged alone at full rank is the same function
    "ia3_gpt2_bias": (_gpt2_with_biases, st.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"],
                                                      layers=1)),
    "dora": (tiny_llama, st.DoraConfig(r=2, targets=["q_proj", "up_proj"])),
    "loha": (tiny_llama, st.LohaConfig(r=2, targets=["v_proj"])),
    "vera": (tiny_llama, st.VeraConfig(r=4, targets=["q_proj", "v_proj"])),
    "oft": (tiny_llama, st.OftConfig(r=0, block_size=16, targets=["q_proj"])),
    "freeze_full_delta": (tiny_llama, st.FreezeConfig(targets=["mlp"], trainable_layers=1)),
    "pissa": (tiny_llama, st.LoraConfig(r=2, targets=["q_proj", "down_proj"], init="pissa")),
}


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_one_adapter_merged_at_full_rank_is_the_same_function(case, ids):
    make, cfg = SINGLE_CASES[case]
    model = st.attach(make(), cfg, name="task")
    randomize(model, scale=0.2)
    if case == "freeze_full_delta":
        with torch.no_grad():
            for _, p in model.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
    expected = output(model, ids)
    merge_adapters(model, ["task"], method="svd", rank="full")
    if case == "ia3_gpt2_bias":
        assert model.configs["merged"].bias == "lora_only"  # IA3 scales c_attn's bias too
    torch.testing.assert_close(output(model.use("merged"), ids), expected, atol=2e-5, rtol=1e-4)


def test_lora_bitfit_and_saved_heads_merge_as_tensor_deltas(ids):
    model = st.attach(tiny_bert(), st.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]), name="lora")
    model.add(st.BitFitConfig(), name="bitfit")
    model.add(st.LoraConfig(r=2, targets=["value"], modules_to_save=["classifier"]), name="other")
    randomize(model, scale=0.1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # BitFit's biases and the classifier copies move off W0
    merge_adapters(model, ["lora", "bitfit", "other"], [1.0, 1.0, 1.0], method="linear")
    cfg = model.configs["merged"]
    assert cfg.bias == "all" and cfg.modules_to_save == ["classifier"]
    saved = {k: v for k, v in model.adapter_state_dict("merged").items() if "classifier" in k}
    head = model.model.classifier
    w0 = head.original_module.weight
    both = head.modules_to_save["lora"].weight + head.modules_to_save["other"].weight - w0
    assert any(torch.allclose(v, both, atol=1e-6) for v in saved.values())  # W0 + (W1 - W0) + (W2 - W0)
    with torch.no_grad():  # LoRA deltas and biases add; the head is the merged one
        head.modules_to_save["lora"].weight.copy_(both)
        head.modules_to_save["lora"].bias.add_(head.modules_to_save["other"].bias - head.original_module.bias)
    expected = output(model.use(["lora", "bitfit", "other"]), ids)
    torch.testing.assert_close(output(model.use("merged"), ids), expected, atol=1e-5, rtol=1e-4)


def test_what_a_lora_cannot_hold_is_refused_by_name():
    model = st.attach(tiny_llama(), st.LnTuningConfig(), name="ln")
    model.add(st.LoraConfig(r=2, targets=["q_proj"]), name="lora")
    with pytest.raises(st.ConfigError, match="'ln' changes 'model.layers.0.input_layernorm.weight', which a LoRA"):
        merge_adapters(model, ["lora", "ln"])
    assert "merged" not in model.configs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved base and adapter folders made on it (two LoRAs, a prompt), and one made on another base."""
    tmp = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(tmp / "base")
    for i, (name, cfg) in enumerate({"topics": st.LoraConfig(r=4, targets=["q_proj", "v_proj"]),
                                     "sentiment": st.LoraConfig(r=4, alpha=8, targets=["q_proj", "o_proj"]),
                                     "prompt": st.PromptTuningConfig(num_virtual_tokens=2, init="random")}.items()):
        model = st.attach(tiny_llama(), cfg)
        randomize(model, seed=i + 1)
        model.save(tmp / name)
    st.attach(tiny_llama(intermediate_size=96), st.LoraConfig(r=4, targets=["q_proj"])).save(tmp / "other_base")
    return tmp


def _cli_api_model(tmp):
    model = st.load(tiny_llama(), tmp / "topics", name="topics")
    return st.load(model, tmp / "sentiment", name="sentiment")


def test_cli_merge_adapters_writes_a_loadable_adapter(folders, ids, tmp_path):
    from slimtune.cli import main

    args = ["merge-adapters", str(folders / "topics"), str(folders / "sentiment"), "--method", "ties",
            "--weights", "1", "-0.5", "--density", "0.5", "--base", str(folders / "base")]
    assert main([*args, "--out", str(tmp_path / "merged")]) == 0
    model = merge_adapters(_cli_api_model(folders), ["topics", "sentiment"], [1.0, -0.5], method="ties", density=0.5)
    loaded = st.load(tiny_llama(), tmp_path / "merged")
    torch.testing.assert_close(output(loaded, ids), output(model.use("merged"), ids), atol=0, rtol=0)
    assert main([*args, "--out", str(tmp_path / "full"), "--full"]) == 0
    import transformers

    full = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(output(full, ids), output(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["missing", "other_base", "prompt", "bad_method"])
def test_cli_merge_adapters_errors_name_the_bad_input(folders, tmp_path, capsys, case):
    from slimtune.cli import main

    second, extra, expected = {
        "missing": ("nope", [], "nope: no such adapter folder"),
        "other_base": ("other_base", [], "other_base were made for different base models"),
        "prompt": ("prompt", [], "'prompt' (prompt_tuning, input shape) cannot be merged"),
        "bad_method": ("sentiment", ["--method", "dare"], "Did you mean 'dare_ties'?"),
    }[case]
    argv = ["merge-adapters", str(folders / "topics"), str(folders / second), *extra, "--out", str(tmp_path / "o"),
            "--base", str(folders / "base")]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_svd_with_a_rank_recompresses_one_lora(saved):
    _, model = _both(saved, ["first"])
    merge_adapters(model, ["first"], method="svd", rank=2, name="small")
    for m, a in model.view("small").layers.items():
        delta = model.view("first").layers[m].delta_weight(None)
        U, S, Vh = torch.linalg.svd(delta)
        assert a.A.shape[0] == 2
        torch.testing.assert_close(a.delta_weight(None), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=0)


def test_merge_with_per_module_ranks_exports_to_peft(saved, ids, tmp_path):
    _, model = _both(saved, ["first", "third"])
    merge_adapters(model, ["first", "third"], [1.0, -0.5], method="cat")  # ranks 6 (q_proj), 4, 2 (k_proj)
    assert model.configs["merged"].r == 6 and set(model.configs["merged"].rank_pattern.values()) == {2, 4}
    model.save(tmp_path, name="merged", format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), output(model.use("merged"), ids), atol=1e-5, rtol=1e-5)
