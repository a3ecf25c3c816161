"""`slimtune compress-delta FINETUNED --base BASE --out DIR`: a fine-tuned model as a BitDelta adapter on its base.

    slimtune compress-delta runs/full-ft --base smollm2 --out deltas/ft --data packaged:bbc_news --steps 100

Loads both causal LMs from local folders (or the packaged "smollm2"), compresses every differing linear weight
to sign bits + one scale (slimtune/delta.py), optionally calibrates the scales on `--batches` batches of
`--data` text, writes the adapter folder and `bitdelta_report.json` beside it, and prints the report.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPORT_NAME = "bitdelta_report.json"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Define the `compress-delta` verb on `subparsers` (slimtune/cli.py's)."""
    p = subparsers.add_parser("compress-delta", help="store a fine-tuned model as 1-bit signs + one scale per matrix "
                              "against its base (BitDelta), scales calibrated by logit distillation")
    p.add_argument("finetuned", help="fine-tuned model folder (HF layout, safetensors)")
    p.add_argument("--base", required=True, help="base model folder, or the packaged 'smollm2'")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--data", default=None, help="calibration text: packaged:bbc_news, or a jsonl/json/csv/text file or "
                   "folder of .txt files (default: no calibration, alpha = mean |delta|)")
    p.add_argument("--steps", type=int, default=100, help="calibration steps (default 100, as the authors' code)")
    p.add_argument("--batches", type=int, default=8, help="calibration batches, cycled over the steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per calibration row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--others", default="save", choices=["save", "error"],
                   help="tensors outside the targets that differ: store them exactly, or refuse")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: FINETUNED's, else BASE's)")
    p.add_argument("--text-field", default="text", help="field of the records holding the text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="order of the calibration records")
    p.set_defaults(func=_cmd_compress_delta)
    return p


def _cmd_compress_delta(args: argparse.Namespace) -> int:
    import transformers

    from slimtune.delta import compress_delta
    from slimtune.errors import ConfigError

    transformers.logging.set_verbosity_error()
    for flag, value, low in (("--steps", args.steps, 0), ("--batches", args.batches, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 2)):
        if value < low:
            raise ConfigError(f"compress-delta {flag}={value}: expected an int >= {low}")
    finetuned, base = (_load(path, args.dtype) for path in (args.finetuned, args.base))
    data = None
    if args.data is not None:
        tokenizer = _tokenizer(args.tokenizer, args.finetuned, args.base)
        data = calibration_batches(args.data, tokenizer, args.batches, args.batch_size, args.max_length,
                                   args.text_field, args.seed)
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t]
    tuned = compress_delta(finetuned, base, targets=targets, data=data, steps=args.steps, lr=args.lr,
                           others=args.others, progress=True)
    report = tuned.delta_reports["default"]
    tuned.save(args.out)
    (Path(args.out) / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.table())
    print(f"BitDelta adapter written to {args.out} (load: st.load(base, {args.out!r}))")
    return 0


def _load(path: str, dtype: str):
    from slimtune.errors import ConfigError
    from slimtune.train.models import load_base_model

    try:
        return load_base_model(path, "causal_lm", dtype=dtype)
    except OSError as e:  # transformers' message for a missing or incomplete folder
        raise ConfigError(f"compress-delta: cannot load a causal LM from {path!r}: {e}") from None


def _tokenizer(explicit: str | None, finetuned: str, base: str):
    from slimtune.train.models import load_tokenizer

    if explicit is not None:
        return load_tokenizer(explicit)
    try:
        return load_tokenizer(finetuned)
    except (OSError, ValueError, TypeError):
        return load_tokenizer(base)


def calibration_batches(source: str, tokenizer, batches: int, batch_size: int, max_length: int,
                        text_field: str = "text", seed: int = 0) -> list[dict]:
    """`batches` batches of `batch_size` rows of `max_length` tokens, packed from the texts of `source`
    (records shuffled with `seed`; read only until enough tokens are there)."""
    from slimtune.train.data import DataError, collate, pack_texts, read_records
    from slimtune.train.setup import pad_id

    records = read_records(source)
    random.Random(seed).shuffle(records)
    need, texts, tokens = batches * batch_size * max_length, [], 0
    for r in records:
        if text_field not in r:
            raise DataError(f"{source}: record has no field {text_field!r} (set --text-field); its fields: "
                            f"{sorted(r)}")
        texts.append(str(r[text_field]))
        tokens += len(tokenizer.encode(texts[-1], add_special_tokens=False)) + 1
        if tokens >= need:
            break
    rows = pack_texts(texts, tokenizer, max_length)[: batches * batch_size]
    return [collate(rows[i : i + batch_size], pad_id(tokenizer)) for i in range(0, len(rows), batch_size)]


__all__ = ["REPORT_NAME", "add_parser", "calibration_batches"]
