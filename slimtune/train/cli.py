"""Training verbs of the ``slimtune`` command: train, eval, plot, generate, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and progress bars drown our output
    transformers.utils.logging.disable_progress_bar()


def _cmd_train(args: argparse.Namespace) -> int:
    from slimtune.train.config import load_train_config
    from slimtune.train.trainer import Trainer, TrainingAborted

    cfg = load_train_config(args.config, args.set)  # validated before anything heavy
    _quiet_transformers()
    try:
        summary = Trainer(cfg).train(resume=args.resume or False)
    except TrainingAborted as e:
        print(f"error: training aborted: {e}", file=sys.stderr)
        return 3
    ev = summary["eval"]
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the whole group
    if summary["status"] == "interrupted":
        print(f"interrupted at step {summary['steps']}; checkpoint saved in {cfg.output_dir}/checkpoints "
              f"(continue with --resume)")
        return 130
    if ev["base"] is not None and ev["adapted"] is not None:
        print(_side_by_side(ev["base"], ev["adapted"]))
    print(f"done: {summary['steps']} steps in {summary['train_seconds']:.0f} s; adapter in {cfg.output_dir}/adapter")
    return 0


def _side_by_side(base: dict, adapted: dict) -> str:
    keys = [k for k in adapted if k in base and k != "n" and k != "tokens"]
    lines = [f"{'metric':<12} {'base':>10} {'adapted':>10}"]
    lines += [f"{k:<12} {base[k]:>10.4f} {adapted[k]:>10.4f}" for k in keys]
    return "\n".join(lines)


def _run_config(path: Path, overrides: list[str]):
    """The resolved config of a run dir (or of the run an adapter folder sits in)."""
    from slimtune.train.config import load_train_config
    from slimtune.train.errors import TrainConfigError

    for candidate in (path / "config.yaml", path.parent / "config.yaml", path.parent.parent.parent / "config.yaml"):
        if candidate.exists():
            return load_train_config(candidate, overrides)
    raise TrainConfigError(f"{path}: no config.yaml in this folder or its run dir; pass --config CONFIG.yaml")


def _adapter_dir(path: Path) -> Path:
    return path / "adapter" if (path / "adapter" / "adapter_config.json").exists() else path


def _cmd_eval(args: argparse.Namespace) -> int:
    import slimtune as st
    from slimtune.train.config import load_train_config
    from slimtune.train.evaluate import base_vs_adapted
    from slimtune.train.models import load_tokenizer
    from slimtune.train.setup import eval_metrics, load_data, model_kind

    path = Path(args.path)
    cfg = load_train_config(args.config, args.set) if args.config else _run_config(path, args.set)
    _quiet_transformers()
    import torch

    torch.manual_seed(cfg.train.seed)  # as in training: a fresh classification head starts identical
    tok = load_tokenizer(cfg.model.name)
    data = load_data(cfg, tok)
    from slimtune.train.models import load_base_model

    n_labels = cfg.model.num_labels or (len(data.labels) if data.labels else None)
    base = load_base_model(cfg.model.name, model_kind(cfg), num_labels=n_labels, dtype=cfg.model.dtype,
                           quantize=cfg.model.quantize)
    model = st.load(base, _adapter_dir(path))
    result = base_vs_adapted(model, lambda m: eval_metrics(m, cfg, data, tok))
    print(_side_by_side(result["base"], result["adapted"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from slimtune.train.metrics import plot_run

    for p in plot_run(args.run_dir):
        print(p)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from slimtune.train.generate import generate

    _quiet_transformers()
    path = Path(args.adapter)
    names = [n.strip() for n in args.adapters.split(",")] if args.adapters else None
    texts = generate(_adapter_dir(path), args.prompt, model=args.model, adapters=names,
                     max_new_tokens=args.max_new_tokens, chat=not args.no_chat, system=args.system)
    for prompt, name, text in texts:
        print(f"--- [{name or 'base'}] {prompt}\n{text}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimtune.demo import default_output_dir, run_demo

    _quiet_transformers()
    report = run_demo(args.task, output_dir=args.out, steps=args.steps, eval_per_label=args.eval_per_label,
                      method=args.method)
    out = report.get("output_dir") or args.out or default_output_dir(args.task, args.method)
    print((Path(out) / "report.md").read_text())
    if "summary" in report:  # the multi-task demo: one table of rows x tasks, no before/after pair
        print(f"{report['summary']}; report in {out}/report.md")
        return 0
    print(f"accuracy {report['before']:.1%} -> {report['after']:.1%} on {report['n_eval']} held-out examples; "
          f"wall {report['wall_seconds']:.0f} s; report in {out}/report.md")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register train, eval, plot, generate and demo on the ``slimtune`` parser."""
    p = sub.add_parser("train", help="fine-tune an adapter from a YAML config")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run (or the one given)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="metrics of the base vs the adapted model on the eval set")
    p.add_argument("path", help="run dir, or an adapter folder inside one")
    p.add_argument("--config", help="training config to take model and data from (default: the run's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="write plots/*.png of a run from its metrics.jsonl")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("generate", help="generate text with an adapter (or several, as one mixed batch)")
    p.add_argument("adapter", help="adapter folder or run dir")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--adapters", help="comma-separated adapter names to run side by side (use 'base' for none)")
    p.add_argument("--model", help="base model (default: the adapter's recorded base or the run's config)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--system", help="system prompt for the chat template")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.set_defaults(func=_cmd_generate)

    from slimtune.demo import METHODS, TASKS

    p = sub.add_parser("demo", help="the main job: LoRA on a packaged model and data set, before vs after")
    p.add_argument("--task", choices=list(TASKS), default="topic")
    p.add_argument("--method", choices=list(METHODS), default="lora",
                   help="lora: on the float base; qlora: the same LoRA on the base quantized to NF4")
    p.add_argument("--out", help="output folder (default runs/demo, runs/demo-<task>, runs/demo[-<task>]-qlora)")
    p.add_argument("--steps", type=int, help="training steps (default: the task's)")
    p.add_argument("--eval-per-label", type=int, help="held-out examples per label (default: the task's)")
    p.set_defaults(func=_cmd_demo)
