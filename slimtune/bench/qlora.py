"""`slimtune bench qlora`: QLoRA (LoRA on an NF4 base) against LoRA on the fp32 base, on SmolLM2-135M.

One run, five rows (docs/qlora_bench.md):
- weight memory of the base: bytes of parameters + buffers, fp32 vs NF4 (double-quantised scales);
- peak RSS of a train step (fwd + bwd + AdamW), each case in its own fresh process. Every tensor is first
  copied off the memory-mapped checkpoint (else the file's pages, all read once by quantization, stay
  resident as long as the float embedding maps them), then the peak counter (VmHWM) is reset, so loading
  the fp32 checkpoint before quantizing it does not count and the row is the training peak only;
- step time QLoRA / LoRA, interleaved rounds in one process (noise hits both alike), and the time to
  dequantize every quantized layer once, which bounds the difference on CPU (each step dequantizes every
  layer twice: in forward, and again in backward for the input gradient);
- held-out LM loss on BBC News text (the demo's corpus) of the NF4 base vs the fp32 base;
- demo-task accuracy after QLoRA vs LoRA, read from the reports of `slimtune demo --method qlora` and
  `slimtune demo` (runs/demo-qlora, runs/demo), or made here when missing (~3 + ~6 minutes on 2 cores).
The LoRA in every row is the demo's: r=8, alpha=16 on q_proj, v_proj.

Results: bench/results/qlora.json and a markdown table beside it (qlora.md). `--quick` runs the same code on
a tiny random Llama (seconds), without the demo rows.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA = {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}  # the demo's adapter
QUICK_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=512, vocab_size=128)  # Linear layers dominate, as in a real LM
TARGET_WEIGHT_RATIO = 0.35
DEMO_REPORTS = {"lora": "runs/demo/report.json", "qlora": "runs/demo-qlora/report.json"}


# -- models ------------------------------------------------------------------------------------------------
def load(path: str, quantize: str | None = None) -> nn.Module:
    """The fp32 causal LM at `path`, optionally quantized (`st.quantize`: the head and embeddings stay float)."""
    from slimtune.train.models import load_base_model

    return load_base_model(path, "causal_lm", quantize=quantize).eval()


def with_lora(model: nn.Module) -> nn.Module:
    import slimtune as st

    torch.manual_seed(0)
    return st.attach(model, st.config_from_dict(dict(LORA)))


def tiny_llama_dir(path: Path) -> str:
    """A random Llama of QUICK_SHAPE saved at `path` (for --quick and the tests)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**QUICK_SHAPE, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


# -- rows --------------------------------------------------------------------------------------------------
def weight_row(path: str) -> dict[str, Any]:
    """Bytes of the base's parameters + buffers in fp32 and in NF4, their ratio, NF4's bits per weight."""
    from slimtune.demo import base_weight_bytes
    from slimtune.quant import bits_per_parameter

    fp32, _ = base_weight_bytes(load(path))
    model = load(path, "nf4")
    nf4, as_float = base_weight_bytes(model)
    return {"fp32_bytes": fp32, "nf4_bytes": nf4, "ratio": nf4 / fp32, "nf4_as_float_bytes": as_float,
            "bits_per_weight": bits_per_parameter(model), "target_ratio": TARGET_WEIGHT_RATIO}


def train_step(model: nn.Module, ids: torch.Tensor):
    """One fwd + bwd + AdamW step on the fixed batch `ids` (labels = inputs), as a closure."""
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch(vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def step_time_row(path: str, shape: tuple[int, int], rounds: int) -> dict[str, Any]:
    """Median step seconds of LoRA (fp32 base) and QLoRA (NF4 base), interleaved; and the seconds to
    dequantize every quantized layer of the NF4 base once."""
    from slimtune.bench.lora import timed_rounds
    from slimtune.quant import QuantLinear

    lora, qlora = with_lora(load(path)), with_lora(load(path, "nf4"))
    ids = batch(lora.config.vocab_size, shape)
    times = timed_rounds({"lora": train_step(lora, ids), "qlora": train_step(qlora, ids)}, rounds, warmup=1)
    layers = [m for m in qlora.modules() if isinstance(m, QuantLinear)]
    dequant = []
    for _ in range(max(2, rounds // 2)):
        t0 = time.perf_counter()
        for m in layers:
            m.dequantize()
        dequant.append(time.perf_counter() - t0)
    d = statistics.median(dequant)
    extra = times["qlora"] - times["lora"]
    return {"lora_s": times["lora"], "qlora_s": times["qlora"], "ratio": times["qlora"] / times["lora"],
            "dequantize_all_layers_s": d, "quantized_layers": len(layers),
            "two_dequants_over_extra_time": 2 * d / extra if extra > 0 else None, "batch": list(shape),
            "rounds": rounds}


def heldout_loss_row(path: str, n_blocks: int, block: int) -> dict[str, Any]:
    """Mean next-token loss of the fp32 and the NF4 base on the same held-out BBC News blocks."""
    from slimtune.train.evaluate import lm_loss

    examples, pad = heldout_blocks(path, n_blocks, block)
    out = {}
    for name, quant in (("fp32", None), ("nf4", "nf4")):
        out[name] = lm_loss(load(path, quant), examples, pad)["loss"]
    return {**out, "nf4_minus_fp32": out["nf4"] - out["fp32"], "blocks": len(examples), "block_tokens": block}


def heldout_blocks(path: str, n_blocks: int, block: int) -> tuple[list[dict], int]:
    """`n_blocks` packed blocks of `block` tokens from the held-out split of packaged:bbc_news (as
    examples/qlora.yaml splits it), or random tokens for a tiny model without a tokenizer."""
    if not (Path(path) / "tokenizer_config.json").exists():
        import transformers

        vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
        ids = batch(vocab, (n_blocks, block)).tolist()
        return [{"input_ids": row, "labels": row} for row in ids], 0
    from slimtune.train.config import DataSection
    from slimtune.train.data import load_splits, pack_texts
    from slimtune.train.models import load_tokenizer
    from slimtune.train.setup import pad_id

    tok = load_tokenizer(path)
    _, held = load_splits(DataSection(task="causal_lm", train="packaged:bbc_news", eval_size=0.02, seed=0))
    return pack_texts([r["text"] for r in held], tok, block)[:n_blocks], pad_id(tok)


def memory_row(path: str, shape: tuple[int, int], steps: int) -> dict[str, Any]:
    """Peak RSS of LoRA and QLoRA train steps, each in a fresh process (see `child`)."""
    out = {case: _run_child(case, path, shape, steps) for case in ("lora", "qlora")}
    out["peak_ratio"] = out["qlora"]["peak_train_mb"] / out["lora"]["peak_train_mb"]
    out["peak_saved_mb"] = out["lora"]["peak_train_mb"] - out["qlora"]["peak_train_mb"]
    return out


def _run_child(case: str, path: str, shape: tuple[int, int], steps: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "slimtune.bench.qlora", "--child", case, "--path", path,
           "--batch", str(shape[0]), "--seq", str(shape[1]), "--steps", str(steps)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"bench qlora: the {case} memory process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(case: str, path: str, shape: tuple[int, int], steps: int) -> dict[str, float]:
    """In a fresh process: build the case, release what loading left behind, reset the peak counter, then
    run `steps` train steps. peak_train_mb is VmHWM after them; rest_mb the RSS before the first."""
    model = with_lora(load(path, "nf4" if case == "qlora" else None))
    _own_memory(model)
    step = train_step(model, batch(model.config.vocab_size, shape))
    _release_free_memory()
    rest = _proc_status_mb("VmRSS")
    reset = _reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"rest_mb": rest, "peak_train_mb": _proc_status_mb("VmHWM"), "peak_reset": reset,
            "step_s": statistics.median(times)}


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own (a tied weight stays one tensor), so that no
    tensor maps the checkpoint file any more and its pages can leave the process."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.clone()
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.clone()


def _release_free_memory() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap pages (the fp32 copy) back
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def demo_row(run_missing: bool) -> dict[str, Any]:
    """Accuracy before / after of the LoRA and the QLoRA demo, from their reports (made if missing)."""
    from slimtune.demo import run_demo

    out: dict[str, Any] = {}
    for method, report_path in DEMO_REPORTS.items():
        path = Path(report_path)
        if not path.exists() and run_missing:
            run_demo("topic", output_dir=str(path.parent), method=method)
        if path.exists():
            r = json.loads(path.read_text())
            out[method] = {k: r.get(k) for k in ("before", "after", "n_eval", "steps", "train_seconds",
                                                 "weight_bytes", "base_quantization")} | {"report": str(path)}
    if {"lora", "qlora"} <= set(out):
        out["after_qlora_minus_lora"] = out["qlora"]["after"] - out["lora"]["after"]
    return out


# -- the run -----------------------------------------------------------------------------------------------
def run(path: str, quick: bool, rounds: int, demo: bool) -> dict[str, Any]:
    """Every row on the causal LM at `path`; `demo`: add the demo accuracy row (SmolLM2 only)."""
    shape = (2, 32) if quick else (4, 128)
    result: dict[str, Any] = {"model": path, "lora": LORA, "threads": torch.get_num_threads(),
                              "torch": torch.__version__}
    t0 = time.perf_counter()
    result["weights"] = weight_row(path)
    print(f"  weights: fp32 {_mib(result['weights']['fp32_bytes'])}, nf4 {_mib(result['weights']['nf4_bytes'])}")
    result["peak_rss"] = memory_row(path, shape, steps=2 if quick else 3)
    print(f"  peak RSS: lora {result['peak_rss']['lora']['peak_train_mb']:.0f} MB, "
          f"qlora {result['peak_rss']['qlora']['peak_train_mb']:.0f} MB")
    result["step_time"] = step_time_row(path, shape, rounds)
    print(f"  step time qlora / lora: {result['step_time']['ratio']:.2f}")
    result["heldout_loss"] = heldout_loss_row(path, n_blocks=4 if quick else 16, block=64 if quick else 256)
    print(f"  held-out loss: fp32 {result['heldout_loss']['fp32']:.4f}, nf4 {result['heldout_loss']['nf4']:.4f}")
    result["demo"] = demo_row(run_missing=demo) if demo else {}
    result["seconds"] = time.perf_counter() - t0
    return result


def main(quick: bool = False, out: str = "bench/results/qlora.json", repeats: int | None = None) -> dict:
    """`slimtune bench qlora [--quick]`: write the JSON to `out` and the table beside it (.md)."""
    torch.set_num_threads(int(os.environ.get("SLIMTUNE_BENCH_THREADS", "2")))
    rounds = repeats or (2 if quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            path = tiny_llama_dir(Path(tmp) / "tiny")
        else:
            from slimtune.train.models import smollm2_path

            path = str(smollm2_path())
        print(f"bench qlora: {'tiny llama' if quick else 'SmolLM2-135M'}, {torch.get_num_threads()} threads")
        result = run(path, quick, rounds, demo=not quick)
    result["model"] = "tiny-llama" if quick else "SmolLM2-135M-Instruct"
    from slimtune.io import atomic_write_bytes

    atomic_write_bytes(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    table = markdown(result)
    atomic_write_bytes(Path(out).with_suffix(".md"), table.encode())
    print("\n" + table)
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(r: dict[str, Any]) -> str:
    """The bench table of a result dict."""
    w, m, s, h = r["weights"], r["peak_rss"], r["step_time"], r["heldout_loss"]
    share = s["two_dequants_over_extra_time"]
    rows = [
        ("base weights (params + buffers)", _mib(w["fp32_bytes"]), _mib(w["nf4_bytes"]),
         f"{w['ratio']:.3f}x (target <= {w['target_ratio']}x; {w['bits_per_weight']:.3f} bits per quantized weight)"),
        (f"peak RSS of a train step (batch {s['batch'][0]} x {s['batch'][1]})", f"{m['lora']['peak_train_mb']:.0f} MB",
         f"{m['qlora']['peak_train_mb']:.0f} MB", f"{m['peak_ratio']:.3f}x ({m['peak_saved_mb']:.0f} MB less)"),
        ("RSS at rest (model + adapter built)", f"{m['lora']['rest_mb']:.0f} MB", f"{m['qlora']['rest_mb']:.0f} MB",
         f"{m['qlora']['rest_mb'] / m['lora']['rest_mb']:.3f}x"),
        ("train step (median, interleaved)", f"{s['lora_s']:.3f} s", f"{s['qlora_s']:.3f} s",
         f"{s['ratio']:.2f}x; dequantizing all {s['quantized_layers']} layers once: "
         f"{s['dequantize_all_layers_s']:.3f} s"
         + (f", twice = {share:.0%} of the extra time" if share is not None else "")),
        (f"held-out LM loss ({h['blocks']} x {h['block_tokens']} tokens)", f"{h['fp32']:.4f}", f"{h['nf4']:.4f}",
         f"{h['nf4_minus_fp32']:+.4f}"),
    ]
    d = r.get("demo") or {}
    if {"lora", "qlora"} <= set(d):
        rows.append((f"demo accuracy before -> after ({d['lora']['n_eval']} held-out)",
                     f"{d['lora']['before']:.1%} -> {d['lora']['after']:.1%}",
                     f"{d['qlora']['before']:.1%} -> {d['qlora']['after']:.1%}",
                     f"{d['after_qlora_minus_lora'] * 100:+.1f} points after"))
    lines = [f"bench qlora on {r['model']} ({r['threads']} threads), LoRA r=8 on q_proj, v_proj", "",
             "| row | LoRA, fp32 base | QLoRA, nf4 base | QLoRA / LoRA |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m slimtune.bench.qlora")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results/qlora.json")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)  # one memory case
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("SLIMTUNE_BENCH_THREADS", "2")))
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(child(args.child, args.path, (args.batch, args.seq), args.steps)))
        return
    main(quick=args.quick, out=args.out, repeats=args.repeats)


if __name__ == "__main__":
    _cli()
