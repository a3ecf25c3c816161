"""`slimtune bench lora`: LoRA-family speed and memory as ratios, slimtune and HF PEFT in one run.

Model: Llama architecture from config (hidden 512, 4 layers, 8 heads, intermediate 1408, vocab 4096),
fp32, random weights. Every case is timed in interleaved rounds (one step of each case per round) so
machine noise hits all cases alike; we report medians. Peak RSS of each training case is measured in
a fresh subprocess. Results go to bench/results/lora.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1408, vocab_size=4096)
QUICK_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512)
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(shape: dict, seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def ours(shape: dict, method: str, targets: list[str], r: int = 16):
    import slimtune as st

    cls = st.DoraConfig if method == "dora" else st.LoraConfig
    return st.attach(base_model(shape), cls(r=r, alpha=2 * r, targets=targets))


def theirs(shape: dict, method: str, targets: list[str], r: int = 16):
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=method == "dora")
    return peft.get_peft_model(base_model(shape), cfg)


# -- what one step of each case does -------------------------------------------------------------
def train_step(model, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """Frozen base forward + backward with input gradients only: no LoRA step can beat it."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    embed = model.get_input_embeddings()

    def step() -> None:
        x = embed(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def full_ft_step(model, ids: torch.Tensor) -> Callable[[], None]:
    for p in model.parameters():
        p.requires_grad_(True)
    return train_step(model, ids)


def infer_step(model, ids: torch.Tensor, **kw) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, **kw)

    return step


def timed_rounds(cases: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each case, cases interleaved within every round."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- suites --------------------------------------------------------------------------------------
def train_suite(shape: dict, batch: tuple[int, int], rounds: int) -> dict[str, float]:
    ids = torch.randint(0, shape["vocab_size"], batch)
    cases = {
        "floor": floor_step(base_model(shape), ids),
        "ours_lora_qv": train_step(ours(shape, "lora", QV), ids),
        "peft_lora_qv": train_step(theirs(shape, "lora", QV), ids),
        "ours_lora_all": train_step(ours(shape, "lora", ALL), ids),
        "peft_lora_all": train_step(theirs(shape, "lora", ALL), ids),
        "ours_dora_qv": train_step(ours(shape, "dora", QV), ids),
        "peft_dora_qv": train_step(theirs(shape, "dora", QV), ids),
        "full_ft": full_ft_step(base_model(shape), ids),
    }
    return timed_rounds(cases, rounds)


def inference_suite(shape: dict, batch: tuple[int, int], rounds: int) -> dict[str, float]:
    ids = torch.randint(0, shape["vocab_size"], batch)
    ours_merged, peft_merged = _randomized(ours(shape, "lora", ALL)), _randomized(theirs(shape, "lora", ALL))
    ours_merged.merge()
    peft_merged.merge_adapter()
    cases = {
        "base": infer_step(base_model(shape), ids),
        "ours_unmerged": infer_step(_randomized(ours(shape, "lora", ALL)), ids),
        "ours_merged": infer_step(ours_merged, ids),
        "peft_unmerged": infer_step(_randomized(theirs(shape, "lora", ALL)), ids),
        "peft_merged": infer_step(peft_merged, ids),
    }
    return timed_rounds(cases, rounds)


def mixed_suite(shape: dict, n_adapters: int, batch: tuple[int, int], rounds: int) -> dict[str, float]:
    """One forward (no KV cache) where row i uses adapter i % n_adapters, all-linear r16 adapters."""
    import peft

    import slimtune as st

    ids = torch.randint(0, shape["vocab_size"], batch)
    names = [f"a{i}" for i in range(n_adapters)]
    routing = [names[i % n_adapters] for i in range(batch[0])]
    ours_model = st.TunedModel(base_model(shape))
    peft_model = None
    for name in names:
        ours_model.add(st.LoraConfig(r=16, alpha=32, targets=ALL), name=name)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL)
        if peft_model is None:
            peft_model = peft.get_peft_model(base_model(shape), cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    _randomized(ours_model)
    _randomized(peft_model)
    cases = {
        "base": infer_step(base_model(shape), ids),
        "ours_one_adapter": infer_step(ours_model, ids),
        "ours_mixed": infer_step(ours_model, ids, adapter_names=routing),
        "peft_mixed": infer_step(peft_model, ids, adapter_names=routing),
    }
    return timed_rounds(cases, rounds)


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


# -- peak memory, one fresh process per case -------------------------------------------------------
def peak_rss_mb(case: str, quick: bool) -> dict[str, float]:
    # VmHWM (per address space) rather than ru_maxrss, which survives exec and so would report the
    # parent's peak in the child.
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from slimtune.bench import lora as b\n"
        f"shape = b.QUICK_SHAPE if {quick} else b.SHAPE\n"
        f"ids = torch.randint(0, shape['vocab_size'], {(2, 32) if quick else (4, 256)})\n"
        f"step = b.memory_case({case!r}, shape, ids)\n"
        "before = b.vm_hwm_mb()\n"
        "for _ in range(3): step()\n"
        "print(before, b.vm_hwm_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"peak": peak, "training_delta": peak - before}


def vm_hwm_mb() -> float:
    """This process's peak resident memory in MB (Linux /proc; psutil's peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20


def memory_case(case: str, shape: dict, ids: torch.Tensor) -> Callable[[], None]:
    if case == "floor":
        return floor_step(base_model(shape), ids)
    if case == "full_ft":
        return full_ft_step(base_model(shape), ids)
    lib, method, where = case.split("_")
    make = ours if lib == "ours" else theirs
    return train_step(make(shape, method, QV if where == "qv" else ALL), ids)


# -- report --------------------------------------------------------------------------------------
def ratios(train: dict, infer: dict, mixed: dict[str, dict]) -> dict[str, float]:
    f = train["floor"]
    out = {f"train_{k}_vs_floor": v / f for k, v in train.items() if k != "floor"}
    out["train_ours_dora_over_lora"] = train["ours_dora_qv"] / train["ours_lora_qv"]
    out["train_peft_dora_over_lora"] = train["peft_dora_qv"] / train["peft_lora_qv"]
    out.update({f"infer_{k}_vs_base": v / infer["base"] for k, v in infer.items() if k != "base"})
    for label, m in mixed.items():
        out.update({f"{label}_{k}_vs_base": v / m["base"] for k, v in m.items() if k != "base"})
        out[f"{label}_ours_throughput_over_peft"] = m["peft_mixed"] / m["ours_mixed"]
    return out


TARGETS = {
    "train_ours_lora_qv_vs_floor": ("<=", 1.03),
    "train_ours_lora_all_vs_floor": ("<=", 1.06),
    "infer_ours_merged_vs_base": ("<=", 1.01),
    "infer_ours_unmerged_vs_base": ("<=", 1.08),
    "decode32_ours_throughput_over_peft": (">=", 2.0),
}


def main(quick: bool = False, out: str = "bench/results/lora.json", repeats: int | None = None) -> dict:
    torch.set_num_threads(int(os.environ.get("SLIMTUNE_BENCH_THREADS", "2")))
    shape = QUICK_SHAPE if quick else SHAPE
    rounds = repeats or (3 if quick else 15)
    batch = (2, 32) if quick else (4, 256)
    print(f"bench lora: shape {shape}, batch {batch}, {rounds} interleaved rounds, {torch.get_num_threads()} threads")
    train = train_suite(shape, batch, rounds)
    print("  train done")
    infer = inference_suite(shape, batch, rounds)
    print("  inference done")
    mixed = {
        "decode32": mixed_suite(shape, 32, (32, 1), rounds * 2),
        "decode4": mixed_suite(shape, 4, (4, 1), rounds * 2),
        "prefill32": mixed_suite(shape, 32, (32, 32), rounds),
    }
    print("  mixed batches done")
    memory = {case: peak_rss_mb(case, quick) for case in
              ("floor", "ours_lora_qv", "peft_lora_qv", "ours_lora_all", "peft_lora_all", "full_ft")}
    result = {
        "model": {"arch": "llama", **shape, "dtype": "float32"},
        "batch": batch,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "median_seconds": {"train": train, "inference": infer, **mixed},
        "peak_rss_mb": memory,
        "ratios": ratios(train, infer, mixed),
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
    }
    _write(result, Path(out))
    _print(result)
    return result


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _write(result: dict, path: Path) -> None:
    from slimtune.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())


def _print(result: dict) -> None:
    print(f"\n{'ratio':<48} {'value':>7}  target")
    for key, value in result["ratios"].items():
        target = TARGETS.get(key)
        mark = ""
        if target:
            ok = value <= target[1] if target[0] == "<=" else value >= target[1]
            mark = f"{target[0]} {target[1]}  {'met' if ok else 'MISSED'}"
        print(f"{key:<48} {value:>7.3f}  {mark}")
    print("\npeak RSS MB (growth during 3 steps after building the model):")
    for case, mem in result["peak_rss_mb"].items():
        print(f"  {case:<16} {mem['peak']:>7.0f}  (+{mem['training_delta']:.0f})")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
