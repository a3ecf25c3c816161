"""`slimtune merge`: fold an adapter into its base and write the full model, also from quantized bases.

    slimtune merge ADAPTER --out DIR [--base PATH] [--dtype fp32|bf16|fp16] [--base-quant auto|none|nf4|...]
                   [--requantize nf4|fp4]

An adapter trained on a quantized base (QLoRA: `model.quantize: nf4`) learned its update against the
dequantized weights dequant(q(W)), not against the float checkpoint W. So the merge first rebuilds that
base: the float checkpoint is quantized exactly as training did (`st.quantize`, the format read from the
run's config.yaml beside the adapter, or `--base-quant`), dequantized to float32, and the adapter is merged
there exactly: W' = dequant(q(W)) + delta_W, which computes what the trained model computed. A base folder
that is itself a 4-bit checkpoint (transformers' `BitsAndBytesConfig`) is dequantized as it stands.

Then either
- the merged model is saved in `--dtype` (HF layout, safetensors); or
- `--requantize nf4|fp4`: it is quantized again (bitsandbytes' NF4/FP4, blocks of 64, double-quantised
  scales, head and embeddings float) and saved as a transformers 4-bit checkpoint, which
  `AutoModelForCausalLM.from_pretrained(DIR)` loads with bitsandbytes. Re-quantizing rounds W' to the 4-bit
  grid, and a small merged update can round away. The added error of every adapted layer is measured,
  printed and written to DIR/requantization_error.json:
      weight: ||q(W') - W'|| / ||W'||          (at most the format's own error, ~0.09 for nf4)
      update: ||q(W') - W'|| / ||W' - W_base|| (relative to the merged update; near or above 1: mostly lost)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.quant import FORMAT_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASE_QUANTS = ("auto", "none", *FORMAT_NAMES)  # st.quantize's formats
REQUANTIZE = ("nf4", "fp4")
ERROR_FILE = "requantization_error.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The merge-only options (ADAPTER, --out and --base are the parser's)."""
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the saved float model "
                   "(with --requantize: of the parts that stay float and of the 4-bit compute)")
    p.add_argument("--base-quant", default="auto", choices=BASE_QUANTS,
                   help="the quantization the adapter was trained on; auto: the run's config.yaml beside the "
                        "adapter (model.quantize), else none. The merge goes into that base, dequantized")
    p.add_argument("--requantize", default=None, choices=REQUANTIZE,
                   help="quantize the merged model again and save a transformers 4-bit checkpoint; the added "
                        "error is printed and written to " + ERROR_FILE)


def cmd_merge(args: argparse.Namespace, load_base) -> int:
    """The `merge` verb; `load_base(adapter, base)` loads the base model the adapter names."""
    trained_on, source = trained_quantization(args.adapter, args.base_quant)
    base = load_base(args.adapter, args.base)
    info = merge(base, args.adapter, args.out, dtype=args.dtype, trained_on=trained_on,
                 requantize=args.requantize)
    where = {"checkpoint": "the base checkpoint's own 4-bit weights, dequantized",
             None: "the float base"}.get(info["merged_into"], f"the dequantized {info['merged_into']} base")
    print(f"merged into {where}" + (f" ({source})" if source and info["merged_into"] == trained_on else ""))
    if args.requantize:
        print(error_summary(info["requantization"]))
        print(f"{args.requantize} model written to {args.out} (per-layer errors in {ERROR_FILE})")
    else:
        print(f"merged model written to {args.out} ({args.dtype})")
    return 0


def trained_quantization(adapter: str | Path, choice: str = "auto") -> tuple[str | None, str | None]:
    """(the quantization the adapter was trained on, where that was read), for `--base-quant choice`."""
    if choice != "auto":
        return (None if choice == "none" else choice), "--base-quant"
    import yaml

    path = Path(adapter)
    for candidate in (path.parent / "config.yaml", path.parent.parent.parent / "config.yaml"):  # run/adapter,
        if candidate.exists():                                                  # run/checkpoints/step-N/adapter
            data = yaml.safe_load(candidate.read_text()) or {}
            quant = (data.get("model") or {}).get("quantize") if isinstance(data, dict) else None
            return quant, (f"model.quantize in {candidate}" if quant else None)
    return None, None


def merge(base: nn.Module, adapter: str | Path, out: str | Path, dtype: str = "fp32", trained_on: str | None = None,
          requantize: str | None = None) -> dict[str, Any]:
    """Merge `adapter` into `base` (rebuilt as dequant(q(W)) when `trained_on` names a format) and save to
    `out`: in `dtype`, or re-quantized to `requantize` with the added error measured. Returns what was done."""
    import slimtune as st
    from slimtune.layer import AdapterLayer

    if dtype not in DTYPES:
        raise ConfigError(f"merge: dtype={dtype!r}; expected one of {list(DTYPES)}")
    if requantize is not None:
        _check_requantize(requantize)
    merged_into = _float_base(base, trained_on)
    tuned = st.load(base, adapter)
    before = {n: m.base_layer.weight.detach().clone() for n, m in tuned.model.named_modules()
              if isinstance(m, AdapterLayer) and isinstance(m.base_layer, nn.Linear)}
    merged = tuned.detach(merge=True)
    info: dict[str, Any] = {"merged_into": merged_into, "dtype": dtype}
    if requantize is None:
        merged.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
        return info
    info["requantization"] = _requantized_save(merged, before, Path(out), requantize, DTYPES[dtype])
    return info


def _float_base(base: nn.Module, trained_on: str | None) -> str | None:
    """Make `base` the float32 model the adapter was trained on; returns what it was merged into."""
    from slimtune.bases import base_kind
    from slimtune.quant import dequantize, quantize

    held = any((k := base_kind(m)) is not None and k.linear and not k.mergeable  # a quantized Linear kind
               for m in base.modules())
    if held:  # a 4-bit checkpoint: the adapter was trained on exactly these weights
        dequantize(base, torch.float32)
        quantizer = getattr(base, "hf_quantizer", None)
        if quantizer is not None:  # transformers' record that the model is 4-bit: it is a float model now
            quantizer.remove_quantization_config(base)
    elif trained_on is not None:
        quantize(base, trained_on)  # as st.Trainer did (model.quantize), deterministic
        dequantize(base, torch.float32)
    base.float()
    return "checkpoint" if held else trained_on


def _check_requantize(fmt: str) -> None:
    if fmt not in REQUANTIZE:
        raise ConfigError(f"merge --requantize {fmt!r}: expected one of {list(REQUANTIZE)} (a transformers 4-bit "
                          "checkpoint); for int8, save the float merge and quantize it where it is served")
    from slimtune.optim import bitsandbytes_available

    if not bitsandbytes_available():
        raise SlimtuneError("merge --requantize writes a bitsandbytes 4-bit checkpoint: `pip install bitsandbytes` "
                            "(or `pip install slimtune[quant]`); or merge without it into a float model")


def _requantized_save(merged: nn.Module, before: dict[str, torch.Tensor], out: Path, fmt: str,
                      dtype: torch.dtype) -> dict[str, Any]:
    """Quantize `merged` with bitsandbytes (through transformers, as its 4-bit checkpoints are written), save it,
    and measure the rounding of every adapted layer against its float merged weight."""
    import transformers

    merged_w = {n: merged.get_submodule(n).weight.detach().float().clone() for n in before}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # the float merge, for transformers' 4-bit loader
        merged.save_pretrained(tmp, safe_serialization=True)
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt,
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = type(merged).from_pretrained(tmp, quantization_config=cfg, dtype=dtype, device_map="cpu")
    layers = {}
    for name, W in merged_w.items():
        q = _dense(model.get_submodule(name))
        if q is None:  # a layer bitsandbytes keeps in float (the head)
            continue
        lost = (q - W).norm()
        layers[name] = {"weight": (lost / W.norm().clamp_min(1e-30)).item(),
                        "update": (lost / (W - before[name].float()).norm().clamp_min(1e-30)).item()}
    model.save_pretrained(out, safe_serialization=True)
    report = {"format": fmt, "double_quant": True, "block_size": 64, "layers": layers, **_summary(layers)}
    (out / ERROR_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _dense(module: nn.Module) -> torch.Tensor | None:
    from slimtune.bases import base_kind

    kind = base_kind(module)
    return kind.weight(module).detach().float() if kind is not None and kind.name == "bnb_linear4bit" else None


def _summary(layers: dict[str, dict[str, float]]) -> dict[str, float]:
    if not layers:
        return {}
    w = [v["weight"] for v in layers.values()]
    u = [v["update"] for v in layers.values()]
    return {"weight_mean": statistics.fmean(w), "weight_max": max(w), "update_mean": statistics.fmean(u),
            "update_max": max(u), "layers_update_mostly_lost": sum(x >= 1.0 for x in u)}


def error_summary(report: dict[str, Any]) -> str:
    """Two lines for the terminal: how much re-quantizing lost, relative to the weights and to the update."""
    n = len(report["layers"])
    if not n:
        return f"re-quantized to {report['format']}: no adapted layer was quantized (nothing to measure)"
    return (f"re-quantized to {report['format']}: over the {n} adapted layers, the rounding is "
            f"{report['weight_mean']:.3f} of the weight (mean; max {report['weight_max']:.3f}) and "
            f"{report['update_mean']:.3f} of the merged update (mean; max {report['update_max']:.3f})\n"
            + (f"warning: in {report['layers_update_mostly_lost']} of {n} layers the rounding is as large as the "
               "update itself: re-quantizing mostly loses it there; keep the float merge (--dtype bf16) or "
               "serve the adapter unmerged on the 4-bit base"
               if report["layers_update_mostly_lost"] else
               "(update error well below 1: the merged update survives re-quantization, with that much noise)"))
