"""The method contract, checked for every registered method on every model family it supports.

One table (`EXAMPLES`: an example id -> a base maker, an input and a config) fed to the same checks:
non-trivial adapters change the output; `disabled()` is the base bit for bit; save -> load is exact;
gradients reach exactly the trainable tensors; `.to()` reaches every adapter; merge equals the unmerged
forward and unmerge gives the weights back; `detach(merge=True)` is a plain model with the same output;
`detach()` gives back the untouched base. Per-method files keep only what is specific to a method.
A registered method without an example fails `test_every_registered_method_has_an_example`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import slimtune as st
from slimtune.bases import kind_of
from slimtune.layer import AdapterLayer, SavedModule
from slimtune.methods import METHODS
from slimtune.quant import quantize
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.test_bitdelta import finetuned_dir

MERGE_TOL = 1e-4  # fp32 logits ~ O(1) and float64 after .to(): merged vs unmerged (absolute and relative)
W_TOL = 1e-6  # weights after merge + unmerge (multiplicative merges divide back)
LINEARS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "output.dense"]}
FEEDFORWARD = {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "bert": r".*\.layer\.\d+\.output\.dense"}
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_llama_nf4() -> nn.Module:
    return quantize(tiny_llama(), "nf4")


def tiny_llama_int4() -> nn.Module:
    return quantize(tiny_llama(), "int4", group_size=16)


def with_biases(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The same model with non-zero biases (GPT-2 and BERT start them at 0), so scaling them is seen."""
    def build() -> nn.Module:
        model = make()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model
    return build


def conv_model() -> nn.Sequential:
    """3x3 conv (stride 2, reflect padding), grouped 3x3 and 1x1: UNet-like cases."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 12, 1)).eval()


IMAGES = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(5))


@dataclass
class Example:
    make: Callable[[], nn.Module]
    config: Callable[[], st.MethodConfig]
    images: bool = False  # the model takes IMAGES instead of token ids
    exact_atol: float = 0.0  # disabled() and save -> load are bit-exact, except where the base holds a residual
    data: Callable[[], list[dict]] | None = None  # calibration batches, for methods with needs_data
    #: adapters attached (and perturbed) before the example's, which then runs in `setup(names)` (AdapterFusion)
    children: Callable[[], dict[str, st.MethodConfig]] | None = None
    setup: Callable[[list[str]], object] | None = None


_SOURCES: list[str] = []


def prompt_sources(n: int = 2, p: int = 3, d: int = 64) -> list[str]:
    """n random (p, d) source prompts in .safetensors files (ATTEMPT's frozen sources), written once."""
    if not _SOURCES:
        folder = Path(tempfile.mkdtemp(prefix="slimtune-sources-"))
        g = torch.Generator().manual_seed(4)
        for i in range(n):
            save_file({"prompt_embeddings": torch.randn(p, d, generator=g) * 0.5}, str(folder / f"s{i}.safetensors"))
            _SOURCES.append(str(folder / f"s{i}.safetensors"))
    return list(_SOURCES)


def per_family(config: Callable[[str], st.MethodConfig], families=("llama", "gpt2", "bert"),
               biases: bool = False) -> dict[str, Example]:
    return {fam: Example(with_biases(FAMILIES[fam]) if biases else FAMILIES[fam], lambda f=fam: config(f))
            for fam in families}


def table() -> dict[str, Example]:
    t = {}

    def add(method: str, examples: dict[str, Example]) -> None:
        t.update({f"{method}-{k}": v for k, v in examples.items()})

    add("lora", per_family(lambda f: st.LoraConfig(r=2, targets=LINEARS[f])))
    add("lora", {"pissa": Example(tiny_llama, lambda: st.LoraConfig(r=2, init="pissa", targets=["q_proj"]),
                                  exact_atol=2e-5),  # base = W0 - BA; saved as a rank-2r LoRA against W0
                 "bias_all": Example(with_biases(tiny_gpt2),
                                     lambda: st.LoraConfig(r=2, bias="all", targets=["c_attn"])),
                 "conv": Example(conv_model, lambda: st.LoraConfig(r=2, targets=["0", "4"]), images=True)})
    add("dora", per_family(lambda f: st.DoraConfig(r=2, targets=LINEARS[f])))
    add("lora", {"nf4": Example(tiny_llama_nf4, lambda: st.LoraConfig(r=2, targets=LINEARS["llama"]))})
    add("dora", {"nf4": Example(tiny_llama_nf4, lambda: st.DoraConfig(r=2, targets=LINEARS["llama"]))})
    add("ia3", {"nf4": Example(tiny_llama_nf4, lambda: st.IA3Config(targets=LINEARS["llama"],
                                                                    feedforward=FEEDFORWARD["llama"]))})
    add("adalora", per_family(lambda f: st.AdaLoraConfig(init_r=4, target_r=2, total_step=10, targets=LINEARS[f])))
    add("dylora", per_family(lambda f: st.DyLoraConfig(r=4, r_min=2, targets=LINEARS[f])))
    add("lora", {"int4": Example(tiny_llama_int4, lambda: st.LoraConfig(r=2, targets=LINEARS["llama"]))})
    add("qa_lora", {"int4": Example(tiny_llama_int4, lambda: st.QaLoraConfig(r=2, targets=LINEARS["llama"]))})
    add("peqa", {"int4": Example(tiny_llama_int4, lambda: st.PeqaConfig())})
    add("dylora", {"nf4": Example(tiny_llama_nf4, lambda: st.DyLoraConfig(r=4, r_min=2, targets=LINEARS["llama"]))})
    add("dylora", {"frozen_eval3": Example(tiny_llama, lambda: st.DyLoraConfig(r=4, frozen_lower=True, eval_rank=3,
                                                                                targets=LINEARS["llama"]))})
    add("sora", per_family(lambda f: st.SoraConfig(r=2, targets=LINEARS[f])))
    add("sora", {"rslora": Example(tiny_gpt2, lambda: st.SoraConfig(r=3, alpha=5.0, rslora=True,
                                                                     targets=LINEARS["gpt2"]))})
    add("periodic_lora", per_family(lambda f: st.PeriodicLoraConfig(r=2, period=2, targets=LINEARS[f])))
    add("lora_sp", per_family(lambda f: st.LoraSPConfig(r=2, targets=LINEARS[f])))
    add("aflora", per_family(lambda f: st.AfloraConfig(r=2, total_step=10, targets=LINEARS[f])))
    add("ia3", per_family(lambda f: st.IA3Config(targets=LINEARS[f], feedforward=FEEDFORWARD[f]), biases=True))
    add("vera", per_family(lambda f: st.VeraConfig(r=8, targets=LINEARS[f])))
    add("vera", {"no_projection": Example(tiny_llama, lambda: st.VeraConfig(r=8, save_projection=False,
                                                                             targets=LINEARS["llama"]))})
    for method, config in (("loha", st.LohaConfig), ("lokr", st.LokrConfig)):
        add(method, per_family(lambda f, c=config: c(r=2, targets=LINEARS[f]), families=("llama", "gpt2")))
        add(method, {"conv": Example(conv_model, lambda c=config: c(r=2, targets=["0", "2", "4"]), images=True),
                     "conv_effective": Example(conv_model, lambda c=config: c(r=2, targets=["0", "2", "4"],
                                                                              effective_conv2d=True), images=True)})
    add("oft", per_family(lambda f: st.OftConfig(block_size=16, targets=LINEARS[f])))
    add("oft", {"neumann": Example(tiny_gpt2, lambda: st.OftConfig(block_size=8, neumann=True, targets=["c_attn"])),
                "share": Example(tiny_gpt2, lambda: st.OftConfig(r=4, block_size=0, block_share=True,
                                                                 targets=LINEARS["gpt2"]))})
    add("boft", per_family(lambda f: st.BoftConfig(block_size=4, targets=LINEARS[f])))
    add("boft", {"butterfly": Example(tiny_llama, lambda: st.BoftConfig(block_size=4, n_butterfly_factor=3,
                                                                         targets=["q_proj"]))})
    add("fourierft", per_family(lambda f: st.FourierFTConfig(n_frequency=50, targets=LINEARS[f])))
    add("hra", per_family(lambda f: st.HRAConfig(r=2, targets=LINEARS[f])))
    add("moelora", per_family(lambda f: st.MoeLoraConfig(num_experts=2, r=4, num_tasks=3, task_embedding_dim=8,
                                                         default_task=1, targets=LINEARS[f])))
    add("poly", per_family(lambda f: st.PolyConfig(r=2, n_tasks=3, n_skills=2, n_splits=2, default_task=1,
                                                   targets=LINEARS[f])))
    add("poly", {"one_task": Example(tiny_llama, lambda: st.PolyConfig(r=2, n_skills=2, targets=LINEARS["llama"]))})
    add("attempt", per_family(lambda f: st.AttemptConfig(sources=prompt_sources(), attn_hidden=8)))
    add("mpt", per_family(lambda f: st.MptConfig(num_virtual_tokens=3)))  # one task: calls without task_ids use it
    add("mpt", {"tasks3": Example(tiny_llama, lambda: st.MptConfig(num_virtual_tokens=3, num_tasks=3, num_ranks=2,
                                                                   default_task=1))})
    # the fine-tuned weights come from a safetensors checkpoint the config points at (init reads <target>.weight)
    add("bitdelta", per_family(lambda f: st.BitDeltaConfig(finetuned=finetuned_dir(f), targets=LINEARS[f], bias=True)))
    add("bitdelta", {"all_linear": Example(tiny_llama, lambda: st.BitDeltaConfig(finetuned=finetuned_dir()))})
    add("moe", per_family(lambda f: st.MoEConfig(expert=st.LoraConfig(r=2), num_experts=3, top_k=2,
                                                 targets=LINEARS[f])))
    add("moe", {f"ia3-{k}": v for k, v in per_family(lambda f: st.MoEConfig(
        expert=st.IA3Config(feedforward=FEEDFORWARD[f]), num_experts=3, top_k=None, targets=LINEARS[f]),
        biases=True).items()})
    add("moe", {"molora": Example(tiny_gpt2, lambda: st.MoEConfig.molora(num_experts=2, r=2, targets=LINEARS["gpt2"])),
                "oft_top2": Example(tiny_gpt2, lambda: st.MoEConfig(expert=st.OftConfig(block_size=16), num_experts=3,
                                                                    targets=LINEARS["gpt2"]))})
    add("mov", per_family(lambda f: st.MoVConfig(num_experts=3, targets=LINEARS[f], feedforward=FEEDFORWARD[f]),
                          biases=True))
    add("hydralora", per_family(lambda f: st.HydraLoraConfig(r=2, num_heads=3, targets=LINEARS[f])))
    add("bottleneck", per_family(lambda f: st.BottleneckConfig.houlsby(layer_norm="both", scaling="learned")))
    def fuse(names: list[str]) -> st.Fuse:
        return st.Fuse(*names, fusion="default")

    add("adapter_fusion", {fam: Example(FAMILIES[fam], lambda: st.FusionConfig(adapters=["a", "b"], dropout=0.0),
                                        children=lambda: {n: st.BottleneckConfig.pfeiffer() for n in "ab"},
                                        setup=fuse) for fam in FAMILIES})
    add("adapter_fusion", {"lora_in_stack": Example(
        tiny_llama, lambda: st.FusionConfig(adapters=["b", "c"], value=False),
        children=lambda: {"a": st.IA3Config(targets=["down_proj"], feedforward=True),
                          **{n: st.LoraConfig(r=2, targets=LINEARS["llama"]) for n in "bc"}},
        setup=lambda names: st.Stack("a", st.Fuse("b", "c", fusion="default")))})
    add("bottleneck", {"pfeiffer_drop": Example(tiny_llama, lambda: st.BottleneckConfig.pfeiffer(drop_layers=1))})
    add("bottleneck", {f"parallel-{k}": v for k, v in per_family(lambda f: st.BottleneckConfig.parallel(),
                                                                   families=("llama", "gpt2")).items()})
    add("bottleneck", {f"residual-{k}": v for k, v in per_family(lambda f: st.BottleneckConfig.houlsby(
        reads="residual", layer_norm="both", scaling="learned")).items()})
    add("bottleneck", {f"parallel_residual-{k}": v for k, v in per_family(lambda f: st.BottleneckConfig.parallel(
        reads="residual", targets=FEEDFORWARD[f])).items()})
    add("bottleneck", {"residual_drop": Example(tiny_llama, lambda: st.BottleneckConfig.pfeiffer(reads="residual",
                                                                                              drop_layers=1))})
    add("compacter", per_family(lambda f: st.CompacterConfig(reduction_factor=16)))  # m = 4 at d = 64
    add("compacter", {"residual": Example(tiny_bert, lambda: st.CompacterConfig(
        variant="compacter++", reduction_factor=16, reads="residual"))})
    add("ssf", per_family(lambda f: st.SsfConfig(targets=LINEARS[f]), biases=True))
    add("ssf", {"all_linear_no_bias": Example(tiny_llama, lambda: st.SsfConfig())})  # merge adds biases
    add("prompt_tuning", per_family(lambda f: st.PromptTuningConfig(num_virtual_tokens=3)))
    add("p_tuning", per_family(lambda f: st.PTuningConfig(num_virtual_tokens=3)))
    add("p_tuning", {"lstm": Example(tiny_llama, lambda: st.PTuningConfig(num_virtual_tokens=3, encoder="lstm",
                                                                         encoder_hidden_size=8)),
                     "direct": Example(tiny_gpt2, lambda: st.PTuningConfig(num_virtual_tokens=3, encoder=None))})
    add("prefix_tuning", per_family(lambda f: st.PrefixTuningConfig(num_virtual_tokens=3)))
    add("prefix_tuning", {"projection": Example(tiny_llama, lambda: st.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8))})
    add("adaption_prompt", per_family(lambda f: st.AdaptionPromptConfig(adapter_len=3), families=("llama", "gpt2")))
    add("adaption_prompt", {"top1": Example(tiny_llama, lambda: st.AdaptionPromptConfig(adapter_len=3,
                                                                                       adapter_layers=1))})
    # token ids that occur in the `ids` fixture, so the adapted output differs from the base
    add("trainable_tokens", per_family(lambda f: st.TrainableTokensConfig(token_indices=[382, 789, 102])))
    add("trainable_tokens", {"tied": Example(lambda: tiny_llama(tie_word_embeddings=True),
                                             lambda: st.TrainableTokensConfig(token_indices=[382, 789, 102]))})
    add("bitfit", per_family(lambda f: st.BitFitConfig(), families=("gpt2", "bert"), biases=True))
    add("ln_tuning", per_family(lambda f: st.LnTuningConfig(), biases=True))
    add("freeze", per_family(lambda f: st.FreezeConfig(trainable_layers=1), biases=True))
    add("freeze", {"mlp_extra": Example(tiny_llama, lambda: st.FreezeConfig(targets=["mlp"], extra=["norm"]))})
    add("child_tuning_f", per_family(lambda f: st.ChildTuningFConfig(targets=LINEARS[f])))
    add("diff_pruning", per_family(lambda f: st.DiffPruningConfig(targets=LINEARS[f])))
    for method, config in (("fishmask", lambda: st.FishMaskConfig(density=0.01)),
                           ("child_tuning_d", lambda: st.ChildTuningDConfig(density=0.05))):
        add(method, {f: Example(FAMILIES[f], config, data=lambda f=f: calibration(f)) for f in FAMILIES})
    add("fishmask", {"per_tensor": Example(tiny_llama, lambda: st.FishMaskConfig(density=0.01, scope="per_tensor"),
                                           data=lambda: calibration("llama"))})
    add("lt_sft", per_family(lambda f: st.LtSftConfig(), biases=True))  # phase 1; phase 2 in test_lt_sft.py
    add("lt_sft", {"mlp_layer1": Example(tiny_llama, lambda: st.LtSftConfig(targets=["mlp"], layers=[1]))})
    add("spt", {f: Example(FAMILIES[f], lambda: st.SptConfig(density=0.02, r=2), data=lambda f=f: calibration(f))
                for f in FAMILIES})  # LoRA on some matrices, sparse entries on the rest
    add("hybrid", per_family(lambda f: st.HybridConfig(parts=[
        st.LoraConfig(r=2, targets=LINEARS[f]), st.IA3Config(targets=LINEARS[f], feedforward=FEEDFORWARD[f])]),
        biases=True))
    add("hybrid", {f"unipelt-{k}": v for k, v in per_family(lambda f: st.HybridConfig.unipelt(
        prefix=st.PrefixTuningConfig(num_virtual_tokens=3))).items()})
    add("hybrid", {f"mam-{k}": v for k, v in per_family(lambda f: st.HybridConfig.mam(
        prefix=st.PrefixTuningConfig(num_virtual_tokens=3)), families=("llama", "gpt2")).items()})
    add("hybrid", {"vera_bitfit": Example(with_biases(tiny_gpt2), lambda: st.HybridConfig(
        parts=[st.VeraConfig(r=8, targets=["c_attn"]), st.BitFitConfig()]))})  # shared tensors + selections
    add("adamix", per_family(lambda f: st.AdaMixConfig(num_experts=1)))  # M=1: unpicked experts get no gradient
    add("adamix", {f"lora-{k}": v for k, v in per_family(lambda f: st.AdaMixConfig(
        num_experts=1, expert="lora", r=2, targets=LINEARS[f])).items()})
    add("pasta", per_family(lambda f: st.PastaConfig(token_ids=[102, 721])))  # ids the `ids` fixture holds
    return t


def calibration(family: str) -> list[dict]:
    """Two calibration batches with labels (next tokens for the LMs, classes for BERT)."""
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0]) if family == "bert" else ids
    return [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]


EXAMPLES = table()


def run(model: nn.Module, example: Example, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES.to(next(model.parameters()).dtype)) if example.images else model(input_ids=ids).logits


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(model: st.TunedModel) -> None:
    """Every trainable tensor moved off its init (so no check passes because B = 0 or E = 0)."""
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)


def test_every_registered_method_has_an_example():
    covered = {ex.config().method for ex in EXAMPLES.values()}
    assert covered == {n for n in METHODS if not n.startswith("test_")}


@pytest.mark.parametrize("example_id", EXAMPLES)
def test_contract(example_id, ids, tmp_path):
    ex = EXAMPLES[example_id]
    ref, original = run(ex.make(), ex, ids), base_state(ex.make())
    model = attach_example(ex)
    visited = []
    model.apply(visited.append)  # nn.Module.apply reaches every adapter module (none shadows it)
    assert len(visited) == len(list(model.modules()))
    perturb(model)
    adapted = run(model, ex, ids)
    assert not torch.allclose(adapted, ref)
    with model.disabled():
        torch.testing.assert_close(run(model, ex, ids), ref, atol=ex.exact_atol, rtol=0)
    loaded = save_and_load(model, ex, tmp_path)
    torch.testing.assert_close(run(loaded, ex, ids), adapted, atol=ex.exact_atol, rtol=0)
    check_gradients(model, ex, ids)
    check_fused_paths(model)
    exact = all(kind_of(m.base_layer).mergeable for m in model.modules() if isinstance(m, AdapterLayer))
    if exact and METHODS[model.configs["default"].method].method.is_mergeable(model.configs["default"]):
        # merges into lossy kinds (a 4-bit base re-quantizes) are tested in test_quant.py
        check_merge(model, ex, ids, adapted)
        plain = loaded.detach(merge=True)
        assert not any(isinstance(m, (AdapterLayer, SavedModule)) for m in plain.modules())
        torch.testing.assert_close(run(plain, ex, ids), adapted, atol=MERGE_TOL, rtol=MERGE_TOL)
    if METHODS[model.configs["default"].method].shape == "input" and ex.make in (tiny_llama, tiny_gpt2):
        check_generation(model)
    check_moves(model, ex, ids, adapted)
    plain = model.to(torch.float32).detach()
    assert set(plain.state_dict()) == set(original)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=W_TOL, rtol=W_TOL, msg=k)


def attach_example(ex: Example) -> st.TunedModel:
    if ex.children is None:
        return st.attach(ex.make(), ex.config(), data=ex.data() if ex.data else None)
    children = ex.children()
    model = st.TunedModel(ex.make())
    for name, config in children.items():
        model.add(config, name)
    model.use(list(children))
    perturb(model)
    model.add(ex.config(), "default")
    return model.use(ex.setup(list(children)))


def save_and_load(model: st.TunedModel, ex: Example, tmp_path) -> st.TunedModel:
    if ex.children is None:
        model.save(tmp_path / "a")
        return st.load(ex.make(), tmp_path / "a")
    loaded = st.TunedModel(ex.make())
    for name in model.configs:
        model.save(tmp_path / name, name=name)
        loaded = st.load(loaded, tmp_path / name, name=name)
    return loaded.use(model.setup)


def check_gradients(model: st.TunedModel, ex: Example, ids: torch.Tensor) -> None:
    """Gradients reach every trainable tensor and nothing else; the trainable ones are the adapter's."""
    model.train()
    out = model(IMAGES) if ex.images else model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable and all(_is_adapter(n) for n in trainable), trainable
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    model.zero_grad(set_to_none=True)
    model.eval()


def check_fused_paths(model: st.TunedModel) -> None:
    """Where a layer adapter offers a fused base + adapter node, it equals the unfused forward, gradients too."""
    from slimtune.bases import kind_of

    model.train()
    for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
        base = layer.base_layer
        if not kind_of(base).linear:
            continue
        x = torch.randn(2, 3, kind_of(base).sizes(base)[0], generator=torch.Generator().manual_seed(0))
        for adapter in layer.adapters.values():
            fused = adapter.fused_forward(x, base)
            if fused is None:
                continue
            params = [p for p in adapter.parameters() if p.requires_grad]
            want = adapter.forward(x, base(x), base)
            if not params:  # a frozen adapter (a fused child): outputs only
                torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
                continue
            g_fused = torch.autograd.grad(fused.pow(2).sum(), params, allow_unused=True)
            g_want = torch.autograd.grad(want.pow(2).sum(), params, allow_unused=True)
            torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
            for a, b in zip(g_fused, g_want, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model.eval()


def check_generation(model: st.TunedModel) -> None:
    """Input methods on decoders: generate() with the cache equals generate(use_cache=False), and a
    left-padded row generates what it generates alone."""
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(2, 1000, (1, 8), generator=g), torch.randint(2, 1000, (1, 5), generator=g)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=padded, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **kw))
    alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **kw)
    assert torch.equal(cached[1, 8:], alone[0, 5:])


def _is_adapter(name: str) -> bool:
    return any(part in name for part in (".adapters.", "shared.", "inputs.", "selections.", ".modules_to_save."))


def check_merge(model: st.TunedModel, ex: Example, ids: torch.Tensor, adapted: torch.Tensor) -> None:
    before = {n: p.detach().clone() for n, p in model.model.named_parameters() if not _is_adapter(n)}
    model.merge()
    torch.testing.assert_close(run(model, ex, ids), adapted, atol=MERGE_TOL, rtol=MERGE_TOL)
    model.unmerge()
    for n, p in model.model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=W_TOL, rtol=W_TOL, msg=n)
    torch.testing.assert_close(run(model, ex, ids), adapted, atol=MERGE_TOL, rtol=MERGE_TOL)


def check_moves(model: st.TunedModel, ex: Example, ids: torch.Tensor, adapted: torch.Tensor) -> None:
    """`.to()` reaches every adapter tensor, and the adapted model computes the same in float64."""
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    torch.testing.assert_close(run(model, ex, ids).float(), adapted, atol=MERGE_TOL, rtol=MERGE_TOL)
