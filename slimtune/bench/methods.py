"""`slimtune bench methods`: one row per method (its default budget on q,v), slimtune and HF PEFT in one run.

Same model and protocol as `slimtune bench lora` (Llama from config, fp32, interleaved rounds,
medians): train-step time over the frozen floor, trainable parameters, and HF PEFT's implementation
of the same method in the same run where PEFT has one. LoRA q,v is repeated as the reference row.
Results go to bench/results/methods.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from slimtune.bench.lora import QUICK_SHAPE, QV, SHAPE, base_model, floor_step, full_ft_step, timed_rounds

IA3_TARGETS, IA3_FF = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
METHODS = ("lora_qv", "ia3", "prompt_tuning", "bitfit", "vera", "loha", "lokr", "oft", "boft", "fourierft", "hra",
           "adalora", "dylora", "sora", "periodic_lora", "lora_sp", "aflora", "bottleneck", "compacter", "ssf",
           "p_tuning", "prefix_tuning", "adaption_prompt", "trainable_tokens", "ln_tuning", "freeze", "fishmask",
           "child_tuning_d", "child_tuning_f", "diff_pruning", "diff_pruning_refit", "unipelt", "mam", "adamix",
           "pasta", "lt_sft", "lt_sft_winners", "spt", "adapter_fusion", "moelora", "poly", "attempt", "mpt",
           "moe", "mov", "hydralora")
ADALORA_STEPS = 10_000  # a long schedule: every timed step is in the budgeting phase (importance + top-k)
VIRTUAL_TOKENS = 20
PEFT_LACKS = {"bitfit", "dylora", "sora", "periodic_lora", "lora_sp", "aflora",  # methods HF PEFT does not have
              "bottleneck", "compacter", "ssf", "freeze", "fishmask", "child_tuning_d", "child_tuning_f",
              "diff_pruning", "diff_pruning_refit", "unipelt", "mam", "adamix", "pasta", "lt_sft", "lt_sft_winners",
              "spt", "adapter_fusion", "moelora", "attempt", "moe", "mov", "hydralora",
              "poly", "mpt"}  # PEFT has these two, but its forward needs task_ids, which this loop does not pass


def ours(method: str, shape: dict):
    import slimtune as st

    configs = {
        "lora_qv": lambda: st.LoraConfig(r=16, alpha=32, targets=QV),
        "ia3": lambda: st.IA3Config(targets=IA3_TARGETS, feedforward=IA3_FF),
        "prompt_tuning": lambda: st.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS),
        "bitfit": lambda: st.BitFitConfig(),
        "vera": lambda: st.VeraConfig(r=256, targets=QV),
        "loha": lambda: st.LohaConfig(r=8, alpha=8, targets=QV),
        "lokr": lambda: st.LokrConfig(r=8, alpha=8, targets=QV),
        "oft": lambda: st.OftConfig(block_size=32, targets=QV),
        "boft": lambda: st.BoftConfig(block_size=4, targets=QV),
        "fourierft": lambda: st.FourierFTConfig(n_frequency=1000, targets=QV),
        "hra": lambda: st.HRAConfig(r=8, targets=QV),
        "adalora": lambda: st.AdaLoraConfig(init_r=12, target_r=8, total_step=ADALORA_STEPS, targets=QV),
        "dylora": lambda: st.DyLoraConfig(r=16, alpha=32, targets=QV),
        "sora": lambda: st.SoraConfig(r=16, alpha=32, targets=QV),
        "periodic_lora": lambda: st.PeriodicLoraConfig(r=16, alpha=32, period=100, targets=QV),
        "lora_sp": lambda: st.LoraSPConfig(r=16, alpha=32, targets=QV),
        "aflora": lambda: st.AfloraConfig(r=4, total_step=ADALORA_STEPS, targets=QV),  # timed steps score, none freeze
        "bottleneck": lambda: st.BottleneckConfig.pfeiffer(),  # after every down_proj, m = d/16
        "compacter": lambda: st.CompacterConfig(variant="compacter++"),  # after every down_proj, m = d/32, n = 4
        "ssf": lambda: st.SsfConfig(targets=QV),
        "p_tuning": lambda: st.PTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS),
        "prefix_tuning": lambda: st.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS),
        "adaption_prompt": lambda: st.AdaptionPromptConfig(adapter_len=10),
        "trainable_tokens": lambda: st.TrainableTokensConfig(token_indices=list(range(16))),
        "ln_tuning": lambda: st.LnTuningConfig(),
        "freeze": lambda: st.FreezeConfig(trainable_layers=1),  # the last of the 4 blocks
        "fishmask": lambda: st.FishMaskConfig(density=0.005),
        "child_tuning_d": lambda: st.ChildTuningDConfig(density=0.3),
        "child_tuning_f": lambda: st.ChildTuningFConfig(p=0.3),
        "diff_pruning": lambda: st.DiffPruningConfig(),  # the L0 phase, on all linears
        "diff_pruning_refit": lambda: st.DiffPruningConfig(),  # pruned to its density below: the sparse re-fit
        "unipelt": lambda: st.HybridConfig.unipelt(),  # gated prefix (10) + adapter after down_proj + LoRA r=8 q,v
        "mam": lambda: st.HybridConfig.mam(),  # prefix (30) + parallel adapter beside every mlp (d/2, s=4)
        "adamix": lambda: st.AdaMixConfig(),  # 4 adapter experts after every down_proj (d/16); eval: averaged
        "pasta": lambda: st.PastaConfig(),  # bos/eos vectors at every block
        "lt_sft": lambda: st.LtSftConfig(density=0.005),  # phase 1: every tensor trains in full
        "lt_sft_winners": lambda: st.LtSftConfig(density=0.005),  # select_winners below: the sparse phase 2
        "spt": lambda: st.SptConfig(density=0.005),  # LoRA r=8 on the most sensitive matrices + sparse entries
        "adapter_fusion": lambda: st.FusionConfig(adapters=["a", "b"]),  # over two Pfeiffer adapters, only it trains
        "moelora": lambda: st.MoeLoraConfig(num_experts=4, r=16, alpha=32, num_tasks=2, default_task=0, targets=QV),
        "poly": lambda: st.PolyConfig(r=8, n_tasks=2, n_skills=4, default_task=0, targets=QV),
        "attempt": lambda: st.AttemptConfig(sources=_prompt_sources(shape["hidden_size"]),
                                            num_virtual_tokens=VIRTUAL_TOKENS),
        "mpt": lambda: st.MptConfig(num_virtual_tokens=VIRTUAL_TOKENS, num_tasks=2, default_task=0),
        "moe": lambda: st.MoEConfig(expert=st.LoraConfig(r=4, alpha=8), num_experts=4, top_k=2, targets=QV),
        "mov": lambda: st.MoVConfig(num_experts=4, targets=IA3_TARGETS, feedforward=IA3_FF),
        "hydralora": lambda: st.HydraLoraConfig(r=16, alpha=32, num_heads=4, targets=QV),
    }
    base = base_model({**shape, "attention_bias": True, "mlp_bias": True} if method == "bitfit" else shape)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, shape["vocab_size"], (2, 2, 32), generator=gen)]
    if method == "adapter_fusion":
        model = st.attach(base, st.BottleneckConfig.pfeiffer(), name="a").add(st.BottleneckConfig.pfeiffer(), "b")
        return model.add(configs[method](), "f").use(st.Fuse("a", "b", fusion="f"))
    model = st.attach(base, configs[method](), data=data)  # calibration batches: ignored by most methods
    if method == "diff_pruning_refit":
        from slimtune.methods.diff_pruning import prune

        prune(model)
    if method == "lt_sft_winners":
        from slimtune.methods.lt_sft import select_winners

        select_winners(model)
    return model


def _prompt_sources(d: int, n: int = 2) -> list[str]:
    """n random source prompts (ATTEMPT's frozen sources) in a temporary folder."""
    import tempfile

    from slimtune.io import atomic_save_safetensors

    folder = Path(tempfile.mkdtemp(prefix="slimtune-bench-"))
    g = torch.Generator().manual_seed(3)
    paths = [folder / f"source{i}.safetensors" for i in range(n)]
    for path in paths:
        atomic_save_safetensors({"prompt_embeddings": torch.randn(VIRTUAL_TOKENS, d, generator=g) * 0.02}, path)
    return [str(p) for p in paths]


def theirs(method: str, shape: dict):
    import peft

    configs = {
        "lora_qv": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=QV),
        "ia3": lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=QV),
        "loha": lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=QV),
        "lokr": lambda: peft.LoKrConfig(r=8, alpha=8, target_modules=QV),
        "oft": lambda: peft.OFTConfig(oft_block_size=32, r=0, target_modules=QV),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=QV),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=1000, target_modules=QV),
        "hra": lambda: peft.HRAConfig(r=8, target_modules=QV),
        "adalora": lambda: peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=8, lora_alpha=8,
                                              total_step=ADALORA_STEPS, target_modules=QV),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
        "adaption_prompt": lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10,
                                                             adapter_layers=shape["num_hidden_layers"]),
        "trainable_tokens": lambda: peft.TrainableTokensConfig(token_indices=list(range(16))),
        "ln_tuning": lambda: peft.LNTuningConfig(task_type="CAUSAL_LM"),
    }
    return peft.get_peft_model(base_model(shape), configs[method]())


def method_step(model, ids: torch.Tensor, peft_model: bool) -> Callable[[], None]:
    """One AdamW train step including the method's per-step work (AdaLoRA's allocator, ...):
    `model.step()` for ours, PEFT's `update_and_allocate` where it has one; the regulariser in the loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    count = [0]
    allocate = getattr(model.base_model, "update_and_allocate", None) if peft_model else None

    def step() -> None:
        model.train()  # the same model also runs the inference case, in eval mode
        count[0] += 1
        loss = model(input_ids=ids, labels=ids).loss
        extra = None if peft_model else model.regularization_loss()
        (loss if extra is None else loss + extra).backward()
        opt.step()
        if not peft_model:
            model.step(count[0], opt)
        elif allocate is not None:
            allocate(count[0])
        opt.zero_grad(set_to_none=True)

    return step


def inference(model, ids: torch.Tensor) -> Callable[[], None]:
    """One no-grad forward in eval mode (adapters unmerged)."""
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def saved_for_backward_mb(run: Callable[[], None]) -> float:
    """MB of distinct tensors autograd keeps for backward during one step (activations and the frozen
    weights a matmul saves): the memory a method adds on top of the weights, deterministic on CPU."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values()) / 2**20


def saved_bytes(model, name: str | None = None) -> int:
    """Size of the adapter file `model.save()` writes (our format)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp, name=name)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(quick: bool = False, out: str = "bench/results/methods.json", repeats: int | None = None) -> dict:
    torch.set_num_threads(int(os.environ.get("SLIMTUNE_BENCH_THREADS", "2")))
    shape = QUICK_SHAPE if quick else SHAPE
    rounds = repeats or (3 if quick else 11)
    batch = (2, 32) if quick else (4, 256)
    print(f"bench methods: shape {shape}, batch {batch}, {rounds} rounds, {torch.get_num_threads()} threads")
    ids = torch.randint(0, shape["vocab_size"], batch)
    full = base_model(shape)
    cases: dict[str, Callable[[], None]] = {"floor": floor_step(base_model(shape), ids),
                                            "full_ft": full_ft_step(full, ids)}
    infer: dict[str, Callable[[], None]] = {"base": inference(base_model(shape), ids)}
    params: dict[str, int] = {"full_ft": trainable(full)}
    file_bytes: dict[str, int] = {}
    for method in METHODS:
        model = ours(method, shape)
        params[f"ours_{method}"] = trainable(model)
        file_bytes[f"ours_{method}"] = saved_bytes(model, "f" if method == "adapter_fusion" else None)
        cases[f"ours_{method}"] = method_step(model, ids, peft_model=False)
        infer[f"ours_{method}"] = inference(model, ids)
        if method not in PEFT_LACKS:
            model = theirs(method, shape)
            params[f"peft_{method}"] = trainable(model)
            cases[f"peft_{method}"] = method_step(model, ids, peft_model=True)
            infer[f"peft_{method}"] = inference(model, ids)
    memory = {name: saved_for_backward_mb(run) for name, run in cases.items()}
    seconds = timed_rounds({**cases, **{f"infer_{k}": v for k, v in infer.items()}}, rounds)
    result = {
        "model": {"arch": "llama", **shape, "dtype": "float32"},
        "batch": batch,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_seconds": seconds,
        "trainable_params": params,
        "saved_for_backward_mb": memory,
        "adapter_file_bytes": file_bytes,
        "ratios": {f"train_{k}_vs_floor": v / seconds["floor"] for k, v in seconds.items()
                   if k != "floor" and not k.startswith("infer_")},
        "inference_ratios": {f"{k.removeprefix('infer_')}_vs_base": v / seconds["infer_base"]
                             for k, v in seconds.items() if k.startswith("infer_") and k != "infer_base"},
        "notes": {"bitfit": "base built with attention and MLP biases (Llama has none by default)",
                  "prompt_tuning": f"{VIRTUAL_TOKENS} virtual tokens: each step runs {batch[1] + VIRTUAL_TOKENS} "
                                   f"positions instead of {batch[1]}"},
    }
    from slimtune.io import atomic_write_bytes

    atomic_write_bytes(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    print(f"\n{'case':<24} {'params':>10} {'step / floor':>13} {'saved MB':>9} {'infer / base':>13}")
    for key, ratio in result["ratios"].items():
        case = key.removeprefix("train_").removesuffix("_vs_floor")
        latency = result["inference_ratios"].get(f"{case}_vs_base", float("nan"))
        print(f"{case:<24} {params[case]:>10,} {ratio:>13.3f} {memory[case]:>9.1f} {latency:>13.3f}")
    return result
