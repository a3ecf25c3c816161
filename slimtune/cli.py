"""The `slimtune` command line. Training verbs live in slimtune/train/cli.py; this file holds the
adapter-file verbs (methods, inspect, merge, merge-adapters, export, convert, lorahub) and bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from slimtune.errors import SlimtuneError


def _cmd_methods(args: argparse.Namespace) -> int:
    from slimtune.methods import METHODS

    rows = [(m.name, m.shape, m.category, "yes" if m.mergeable else "no", m.params, m.peft_type or "-", m.paper)
            for m in sorted(METHODS.values(), key=lambda m: (m.category, m.name))]
    _table(["method", "shape", "category", "mergeable", "params", "PEFT type", "paper"], rows)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from slimtune.adapter_files import read_adapter
    from slimtune.io import CONFIG_NAME, WEIGHTS_NAME

    cfg, raw, tensors = read_adapter(args.path)
    path = Path(args.path)
    size = sum(p.stat().st_size for p in (path / WEIGHTS_NAME, path / CONFIG_NAME))
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
    info = {
        "format": "peft" if "peft_type" in raw else "slimtune",
        "method": cfg.method,
        "config": cfg.to_dict(),
        "base_model": raw.get("base_model_name_or_path"),
        "base_model_class": raw.get("base_model_class"),
        "base_fingerprint": raw.get("base_fingerprint"),
        "modules": len(modules),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted(dtypes),
        "size_on_disk_bytes": size,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "config":
            print(f"{key:>18}: {value}")
    print(f"{'config':>18}: {json.dumps(info['config'])}")
    shapes: dict[str, set] = {}
    for k, t in tensors.items():
        shapes.setdefault(k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1], set()).add(
            tuple(t.shape))
    for kind, s in sorted(shapes.items()):
        print(f"{kind:>18}: shapes {sorted(s)}")
    return 0


def _load_base_for(adapter: str, base: str | None):
    """The base model an adapter names (or `base`), loaded from local files only."""
    import transformers

    from slimtune.io import read_adapter_dir

    raw, _ = read_adapter_dir(adapter)
    path = base or raw.get("base_model_name_or_path")
    if not path:
        raise SlimtuneError(f"{adapter}: the adapter does not record its base model; pass --base PATH")
    cls_name = raw.get("base_model_class")
    cls = getattr(transformers, cls_name, None) if cls_name else None
    if cls is None:
        task = raw.get("task_type")
        auto = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
        cls = getattr(transformers, auto)
    return cls.from_pretrained(path)


def _cmd_merge(args: argparse.Namespace) -> int:
    from slimtune.merge_cli import cmd_merge  # also from quantized bases: dequantized or re-quantized

    return cmd_merge(args, _load_base_for)


def _cmd_export(args: argparse.Namespace) -> int:
    import slimtune as st

    model = st.load(_load_base_for(args.adapter, args.base), args.adapter, rank=args.rank)
    model.save(args.out, format=args.format, tokenizer=_saved_tokenizer(args.adapter))
    print(f"{args.format} adapter written to {args.out}")
    return 0


def _cmd_merge_adapters(args: argparse.Namespace) -> int:
    from slimtune.multitask import merge_adapters

    model, names = _load_all(args.adapters, args.base)
    merge_adapters(model, names, args.weights, method=args.method, density=args.density, rank=args.rank,
                   majority_sign_method=args.majority_sign, clamp=args.clamp, seed=args.seed, name="merged")
    if args.full:
        model.use("merged").detach(merge=True).save_pretrained(args.out, safe_serialization=True)
        print(f"{args.method} merge of {len(names)} adapters folded into the base; model written to {args.out}")
        return 0
    model.save(args.out, format=args.format, name="merged")
    print(f"{args.method} merge of {len(names)} adapters written to {args.out} ({args.format} LoRA adapter)")
    return 0


def _rank(text: str) -> int | str:
    return text if text == "full" else int(text)


def _load_all(folders: list[str], base: str | None):
    """The base model with every adapter folder loaded, named after its folder; refuses mixed bases."""
    import re

    import slimtune as st
    from slimtune.io import read_adapter_dir

    prints = {f: read_adapter_dir(f)[0].get("base_fingerprint") for f in folders}
    known = {f: p for f, p in prints.items() if p}
    if len(set(known.values())) > 1:
        first, *_ = known
        other = next(f for f, p in known.items() if p != known[first])
        raise SlimtuneError(f"{first} and {other} were made for different base models (base_fingerprint "
                            f"{known[first]} vs {known[other]}); merged adapters must share one base")
    model, names = _load_base_for(folders[0], base), []
    for folder in folders:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(folder).resolve().name) or "adapter"
        name = name if name[0].isalpha() and name not in names else f"a{len(names)}_{name}"
        model = st.load(model, folder, name=name)
        names.append(name)
    return model, names


def _saved_tokenizer(folder: str):
    """The tokenizer saved beside an adapter (a grown vocabulary), or None."""
    from slimtune.adapter_files import TOKENIZER_FILES

    if not any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _cmd_convert(args: argparse.Namespace) -> int:
    from slimtune.interop.adapterhub import convert_adapterhub

    done = convert_adapterhub(args.adapter, args.out, base=args.base)
    print(f"AdapterHub adapter {args.adapter} ({done.source}) converted: {done.config.method}, {done.tensors} "
          f"tensor(s) written to {done.path}" + (" (test-loaded into --base)" if args.base else ""))
    for note in done.notes:
        print(f"note: {note}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    suite = importlib.import_module(f"slimtune.bench.{args.suite}")
    if args.only and args.suite != "quality":
        raise SystemExit(f"slimtune bench {args.suite}: --only applies to the quality suite (speed ratios are "
                         "compared within one run, so every row runs)")
    kwargs = {"only": args.only.split(",")} if args.only else {}
    suite.main(quick=args.quick, out=args.out or f"bench/results/{args.suite}.json", repeats=args.repeats, **kwargs)
    return 0


def _table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="table of every registered method")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("inspect", help="method, targets, shapes, parameter count, size of an adapter")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    for verb, func, text in (("merge", _cmd_merge, "write the merged full model (safetensors, HF layout)"),
                             ("export", _cmd_export, "re-save an adapter, e.g. in HF PEFT format")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("adapter")
        p.add_argument("--out", required=True)
        p.add_argument("--base", help="base model folder (default: the one the adapter records)")
        if verb == "merge":
            from slimtune.merge_cli import add_arguments

            add_arguments(p)  # --dtype, --base-quant, --requantize
        if verb == "export":
            p.add_argument("--format", default="peft", choices=["peft", "slimtune"])
            p.add_argument("--rank", type=int, default=None,
                           help="cut to this rank first (adapters trained with nested ranks, e.g. dylora)")
        p.set_defaults(func=func)

    p = sub.add_parser("merge-adapters", help="merge adapters of one base into one LoRA adapter (task arithmetic, "
                       "TIES, DARE, SVD, cat; docs/merging.md), or with --full into the base model")
    p.add_argument("adapters", nargs="+", help="adapter folders (ours or HF PEFT's)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="linear", help="linear | cat | ties | dare_linear | dare_ties | "
                   "magnitude_prune | svd | ties_svd | dare_linear_svd | dare_ties_svd | magnitude_prune_svd")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one per adapter (default 1.0 each); "
                   "negative subtracts a task")
    p.add_argument("--density", type=float, default=None, help="fraction kept by ties / dare / magnitude_prune")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="TIES sign election")
    p.add_argument("--rank", type=_rank, default=None,
                   help="SVD methods: rank kept (default: the largest input rank), or 'full' (exact)")
    p.add_argument("--clamp", type=float, default=None, help="SVD methods: clip factors at this quantile")
    p.add_argument("--seed", type=int, default=None, help="DARE's random seed")
    p.add_argument("--base", help="base model folder (default: the one the first adapter records)")
    p.add_argument("--format", default="slimtune", choices=["slimtune", "peft"])
    p.add_argument("--full", action="store_true", help="write the base with the merge folded in (as `merge`)")
    p.set_defaults(func=_cmd_merge_adapters)

    p = sub.add_parser("convert", help="import an AdapterHub adapter folder (bottleneck, Compacter, prefix tuning) "
                       "as a slimtune adapter")
    p.add_argument("adapter", help="the folder AdapterHub's save_adapter() wrote")
    p.add_argument("--out", required=True, help="the slimtune adapter folder to write")
    p.add_argument("--base", help="base model folder: match module names to it and test-load the result")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("bench", help="speed and memory ratios vs the frozen base and HF PEFT")
    p.add_argument("suite", choices=["lora", "methods", "quality", "qlora"], help="lora: the LoRA family in depth; "
                   "methods: speed, one row per method exemplar; quality: accuracy per method on a real task; "
                   "qlora: QLoRA vs LoRA on SmolLM2 (weights, peak RSS, step time, NF4 loss, demo accuracy)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", default=None, help="quality: comma-separated methods to (re)run; their rows replace "
                   "those in the existing result file, the others are kept")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/SUITE.json)")
    p.set_defaults(func=_cmd_bench)

    from slimtune.delta_cli import add_parser as add_compress_delta
    from slimtune.multitask.lorahub import add_parser as add_lorahub_parser

    add_lorahub_parser(sub)
    add_compress_delta(sub)
    try:
        from slimtune.train.cli import add_commands
    except ImportError:
        add_commands = None
    if add_commands is not None:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (SlimtuneError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
