"""The multi-task demo: several tasks posed as generation on one model, one LoRA each, and their combinations.

Tasks (each with its own prompt; the answer is one label word): BBC News topic (the 5 topics of
`slimtune demo`) and Rotten Tomatoes sentence polarity (negative / positive), on SmolLM2-135M-Instruct.
Accuracy is first-token scoring over the task's own label words (slimtune/train/evaluate.py).

1. One LoRA per task (same rank and targets, so they merge), trained by `st.Trainer`.
2. Every row of ROWS on every task: the base, each task LoRA alone, merges of them (st.merge_adapters:
   PEFT-style linear, exact task arithmetic, TIES, DARE), LoRAHub on a held-out few-shot mix of the tasks,
   and one LoRA trained on the mixed data of all tasks (the multi-task baseline).
3. One mixed batch serving every task at once (`model(**batch, adapter_names=[...])`): its predictions
   must equal each adapter's own, and it is timed against one pass per adapter.

A row is one function in ROWS, `fn(ctx) -> list[Row]`, that prepares what it evaluates (merges, trains)
and names per task the adapter(s) to activate (None: the base). A model trained on every task (MOELoRA,
AdapterFusion) is one more function appended to ROWS. Writes report.md, report.json and
plots/accuracy.png; docs/demo_multitask.md has the measured table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.demo import TOPIC_PROMPT, TOPICS
from slimtune.multitask.demo_report import write_report
from slimtune.train.config import TrainConfig
from slimtune.train.data import collate
from slimtune.train.errors import DataError
from slimtune.train.evaluate import accuracy, classify_generative, macro_f1

log = logging.getLogger(__name__)

SENTIMENTS = ["negative", "positive"]
SENTIMENT_PROMPT = ("Review: {text}\n\nIs this movie review negative or positive? "
                    "Answer with one word: negative or positive.")
MONITOR = 16  # held-out examples the Trainer itself scores after training (the table scores all)


@dataclass
class TaskSpec:
    """One task posed as generation; `name` also names its adapter and its column."""

    name: str
    description: str
    train: str  # data source: packaged:NAME or a file (slimtune/train/data.py)
    labels: list[str]  # answer words; their first tokens must differ
    prompt: str  # user turn, with {text}
    eval_per_label: int  # held-out examples per label
    steps: int = 36  # LoRA training steps (one epoch over steps * batch_size examples)
    fewshot: int = 4  # further held-out examples: this task's part of LoRAHub's few-shot mix
    max_text_tokens: int = 64


TASKS = (
    TaskSpec("topic", "BBC News topic (5 labels)", "packaged:bbc_news", TOPICS, TOPIC_PROMPT, eval_per_label=20),
    TaskSpec("sentiment", "Rotten Tomatoes polarity (2 labels)", "packaged:rotten_tomatoes", SENTIMENTS,
             SENTIMENT_PROMPT, eval_per_label=50, steps=72),  # 36 steps stay at chance (54%); 72 reach 82%
)


@dataclass
class Settings:
    """What every task shares: the model, the LoRA, the optimiser, evaluation."""

    model: str = "smollm2"  # packaged name or HF folder
    lora: dict = field(default_factory=lambda: {"method": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]})
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 3
    max_length: int = 256
    eval_batch_size: int = 16
    lorahub_steps: int = 40
    seed: int = 0
    progress: bool = True  # the Trainer's progress bar
    strict: bool = False  # a failing row raises (tests) instead of being reported as failed


@dataclass
class TaskRun:
    """One task's tokenized data, as its adapter's Trainer split it."""

    spec: TaskSpec
    train: list[dict]
    eval: list[dict]
    fewshot: list[dict]
    candidates: list[list[int]]  # answer token ids per label
    summary: dict = field(default_factory=dict)  # training: steps, seconds, parameters


@dataclass
class Row:
    """One line of the table: per task (or for all) the adapter(s) to activate; None is the base."""

    label: str
    adapters: str | list[str] | None | dict[str, str | list[str] | None]
    note: str = ""
    info: dict = field(default_factory=dict)
    available: bool = True

    def setup(self, task: str) -> str | list[str] | None:
        return self.adapters.get(task) if isinstance(self.adapters, dict) else self.adapters


def _load_average() -> float | None:
    """The 1-minute load average (other processes share the CPU, and timings depend on it); None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _loads(samples: list[float]) -> dict[str, float] | None:
    return {"first": samples[0], "max": max(samples), "last": samples[-1]} if samples else None


@dataclass
class Context:
    """What the row functions see: the model with every adapter so far, the tasks' data, the settings."""

    model: Any  # TunedModel holding every adapter
    tokenizer: Any
    settings: Settings
    out: Path
    tasks: dict[str, TaskRun] = field(default_factory=dict)
    passes: dict[tuple[str, str], tuple[list[int], float]] = field(default_factory=dict)  # (adapter, task)
    started: float = field(default_factory=time.perf_counter)
    convert_seconds: float = 0.0  # first-use conversion of the packaged model
    loads: list[float] = field(default_factory=list)  # the machine's load average at each stage: timings depend on it

    def stamp(self) -> float:
        """Seconds since the start; records the machine's load average now (for reading the timings)."""
        load = _load_average()
        if load is not None:
            self.loads.append(load)
        return time.perf_counter() - self.started

    @property
    def pad(self) -> int:
        from slimtune.train.setup import pad_id

        return pad_id(self.tokenizer)


# -- training --------------------------------------------------------------------------------------------
def task_config(spec: TaskSpec, s: Settings, output_dir: Path, steps: int, n_train: int) -> TrainConfig:
    """The Trainer config of one adapter on `spec`'s data (the first `n_train` training examples kept)."""
    return TrainConfig.from_dict({
        "model": {"name": s.model},
        "method": dict(s.lora),
        "data": {"task": "generative_classification", "train": spec.train, "labels": list(spec.labels),
                 "prompt": spec.prompt, "max_text_tokens": spec.max_text_tokens, "max_length": s.max_length,
                 "per_label_eval": spec.eval_per_label, "max_train_samples": n_train, "seed": s.seed},
        "train": {"max_steps": steps, "batch_size": s.batch_size, "lr": s.lr, "warmup_steps": s.warmup_steps,
                  "scheduler": "linear", "grad_clip": 1.0, "seed": s.seed, "eval_before": False, "eval_every": 0,
                  "save_every": 0, "keep_last": 1, "progress": s.progress},
        "output_dir": str(output_dir),
    })


def train_adapter(ctx: Context, name: str, spec: TaskSpec, steps: int | None = None,
                  examples: list[dict] | None = None) -> TaskRun:
    """Add LoRA `name` and train it with st.Trainer on `spec`'s data, or on `examples` when given.

    Returns `spec`'s data as the Trainer split it: train (what it trains on by default), eval, few-shot.
    """
    import slimtune as st
    from slimtune.train.trainer import Trainer

    s = ctx.settings
    steps = steps or spec.steps
    n_train = steps * s.batch_size if examples is None else s.batch_size  # else only its eval split is used
    run_dir = ctx.out / f"train_{name}"
    cfg = task_config(spec, s, run_dir, steps, n_train + spec.fewshot)
    torch.manual_seed(s.seed)
    ctx.model.add(st.config_from_dict(s.lora), name)
    ctx.model.use(name)
    trainer = Trainer(cfg, model=ctx.model, tokenizer=ctx.tokenizer)
    data = trainer.data
    run = TaskRun(spec, data.train[:n_train], list(data.eval), data.train[n_train:], data.candidates)
    _check_first_tokens(run)
    trainer.data.train = run.train if examples is None else examples
    trainer.data.eval = run.eval[:MONITOR]
    summary = trainer.train()
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)  # the Trainer saves every adapter of the model
    ctx.model.save(run_dir / "adapter", name=name)
    run.summary = {"steps": summary["steps"], "examples": len(trainer.data.train), "train_seconds":
                   summary["train_seconds"], "trainable_params": summary["trainable_params"],
                   "adapter": str(run_dir / "adapter")}
    return run


def _check_first_tokens(run: TaskRun) -> None:
    firsts = [c[0] for c in run.candidates]
    if len(set(firsts)) < len(firsts):
        raise DataError(f"task {run.spec.name!r}: labels {run.spec.labels} do not all start with different tokens "
                        "(first-token scoring and the mixed batch need that); choose other label words")


# -- rows ------------------------------------------------------------------------------------------------
def base_row(ctx: Context) -> list[Row]:
    return [Row("base", None, "no adapter")]


def single_rows(ctx: Context) -> list[Row]:
    return [Row(f"{t} LoRA", t, f"trained on {t} only") for t in ctx.tasks]


# (row label, st.merge_adapters method, options, note); every task LoRA enters with weight 1; {rank}: the
# sum of the task LoRAs' ranks, which "cat" gives and the SVD methods keep
MERGES = [
    ("linear merge", "linear", {}, "PEFT's linear: A's and B's summed separately (holds cross terms)"),
    ("task arithmetic", "cat", {}, "exact sum of the deltas (rank {rank})"),
    ("TIES", "ties_svd", {"density": 0.5}, "TIES on the dense deltas (density 0.5), SVD to rank {rank}"),
    ("DARE", "dare_ties_svd", {"density": 0.5, "seed": 0}, "DARE-TIES on the dense deltas (density 0.5, seed 0), "
     "SVD to rank {rank}"),
]


def merge_rows(ctx: Context) -> list[Row]:
    from slimtune.multitask.merging import SVD_METHODS, merge_adapters

    names, rows = list(ctx.tasks), []
    rank = sum(ctx.model.configs[n].r for n in names)
    for label, method, options, note in MERGES:
        name = label.replace(" ", "_")
        extra = {"rank": rank} if method in SVD_METHODS else {}
        t = time.perf_counter()
        merge_adapters(ctx.model, names, [1.0] * len(names), method=method, name=name, **options, **extra)
        info = {"method": method, **options, **extra, "merge_seconds": round(time.perf_counter() - t, 2)}
        rows.append(Row(label, name, note.format(rank=rank), info))
    return rows


def fewshot_batches(ctx: Context) -> list[dict]:
    """The tasks' few-shot examples, interleaved, as one batch with the loss on the answers."""
    examples = [e for _, e in _interleave({t: r.fewshot for t, r in ctx.tasks.items()})]
    device = next(ctx.model.parameters()).device
    return [{k: v.to(device) for k, v in collate(examples, ctx.pad).items()}]


def lorahub_row(ctx: Context) -> list[Row]:
    batches = fewshot_batches(ctx)
    n = sum(len(b["input_ids"]) for b in batches)
    t = time.perf_counter()
    try:
        from slimtune.multitask.lorahub import lorahub

        res = lorahub(ctx.model, list(ctx.tasks), batches, name="lorahub", steps=ctx.settings.lorahub_steps,
                      l1=0.05, bounds=(-1.5, 1.5), seed=ctx.settings.seed, progress=ctx.settings.progress)
    except ImportError as e:  # the module, or its optimiser library `cma`
        return [Row("LoRAHub", None, f"not available ({e})", available=False)]
    weights = {k: round(float(w), 3) for k, w in res.weights.items()}
    info = {"weights": weights, "few_shot_loss": round(float(res.few_shot_loss), 4),
            "uniform_loss": round(float(res.uniform_loss), 4), "objective": round(float(res.loss), 4),
            "fewshot_examples": n, "search_seconds": round(time.perf_counter() - t, 2)}
    note = f"CMA-ES ({ctx.settings.lorahub_steps} steps) on {n} held-out few-shot examples of all tasks"
    return [Row("LoRAHub", "lorahub", note, info)]


def mixture_row(ctx: Context) -> list[Row]:
    runs = list(ctx.tasks.values())
    examples = [e for _, e in _interleave({t: r.train for t, r in ctx.tasks.items()})]
    steps = sum(r.summary["steps"] for r in runs)
    log.info("training LoRA 'mixture' on %d examples of %d tasks (%d steps)", len(examples), len(runs), steps)
    run = train_adapter(ctx, "mixture", runs[0].spec, steps=steps, examples=examples)
    note = f"one LoRA trained on every task's training data ({steps} steps: the task LoRAs' sum)"
    return [Row("mixture LoRA", "mixture", note, run.summary)]


ROWS: list[Callable[[Context], list[Row]]] = [base_row, single_rows, merge_rows, lorahub_row, mixture_row]


# -- evaluation ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _active(model, adapters: str | list[str] | None) -> Iterator[None]:
    if adapters is None:
        with model.disabled():
            yield
    else:
        model.use(adapters)
        yield


def predict(ctx: Context, adapters: str | list[str] | None, run: TaskRun) -> tuple[list[int], float]:
    """Predictions on `run`'s eval examples with `adapters` active, and the seconds they took."""
    ctx.model.eval()
    with _active(ctx.model, adapters):
        t = time.perf_counter()
        preds = classify_generative(ctx.model, run.eval, run.candidates, ctx.pad, ctx.settings.eval_batch_size)
        seconds = time.perf_counter() - t
    if isinstance(adapters, str):
        ctx.passes[(adapters, run.spec.name)] = (preds, seconds)
    return preds, seconds


def evaluate_row(ctx: Context, row: Row) -> dict[str, Any]:
    """A row's accuracy and macro-F1 on every task (None where the row is not available)."""
    out: dict[str, Any] = {"row": row.label, "note": row.note, "available": row.available, "info": row.info,
                           "tasks": {}}
    for name, run in ctx.tasks.items():
        if not row.available:
            out["tasks"][name] = None
            continue
        preds, seconds = predict(ctx, row.setup(name), run)
        golds = [e["label"] for e in run.eval]
        out["tasks"][name] = {"accuracy": round(accuracy(preds, golds), 4), "n": len(golds),
                              "macro_f1": round(macro_f1(preds, golds, len(run.spec.labels)), 4),
                              "seconds": round(seconds, 2)}
    scores = [t["accuracy"] for t in out["tasks"].values() if t is not None]
    out["mean"] = round(sum(scores) / len(scores), 4) if row.available and scores else None
    return out


def run_rows(ctx: Context, rows: list[Callable[[Context], list[Row]]]) -> list[dict[str, Any]]:
    """Prepare and evaluate the rows of every row function in turn; a failing one is reported as failed."""
    results = []
    for fn in rows:
        log.info("[%4.0f s] row %s", ctx.stamp(), fn.__name__)
        try:
            made = fn(ctx)
        except Exception as e:
            if ctx.settings.strict:
                raise
            log.exception("row %s failed", fn.__name__)
            made = [Row(fn.__name__.removesuffix("_row"), None, f"failed: {type(e).__name__}: {e}", available=False)]
        for row in made:
            results.append(evaluate_row(ctx, row))
            accs = {t: v["accuracy"] for t, v in results[-1]["tasks"].items() if v}
            log.info("[%4.0f s]   %-16s %s", ctx.stamp(), row.label, accs or row.note)
    return results


def _interleave(lists: dict[str, list]) -> list[tuple[str, Any]]:
    """(key, item) taking one item of each list in turn until all are used."""
    out, i = [], 0
    while any(i < len(v) for v in lists.values()):
        out += [(k, v[i]) for k, v in lists.items() if i < len(v)]
        i += 1
    return out


@torch.no_grad()
def routed_predictions(model, examples: list[dict], adapter_names: list[str | None], firsts: list[list[int]],
                       pad: int, batch_size: int) -> list[int]:
    """First-token predictions with row i routed to `adapter_names[i]`, scored over its own `firsts[i]`."""
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(examples), batch_size):
        batch = collate([{"input_ids": e["prompt_ids"]} for e in examples[i : i + batch_size]], pad, side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, adapter_names=adapter_names[i : i + batch_size]).logits[:, -1]  # (B, V)
        preds += [int(row[f].argmax()) for row, f in zip(logits, firsts[i : i + batch_size], strict=True)]
    return preds


def mixed_batch(ctx: Context) -> dict[str, Any]:
    """Every task's eval examples interleaved in the same batches, each row routed to its task's LoRA."""
    order = _interleave({t: r.eval for t, r in ctx.tasks.items()})
    names = [t for t, _ in order]
    firsts = [[c[0] for c in ctx.tasks[t].candidates] for t in names]
    ctx.model.eval()
    t0 = time.perf_counter()
    preds = routed_predictions(ctx.model, [e for _, e in order], names, firsts, ctx.pad, ctx.settings.eval_batch_size)
    seconds = time.perf_counter() - t0
    tasks, separate = {}, 0.0
    for t, run in ctx.tasks.items():
        alone, sec = ctx.passes.get((t, t)) or predict(ctx, t, run)
        separate += sec
        mine = [p for name, p in zip(names, preds, strict=True) if name == t]
        golds = [e["label"] for e in run.eval]
        tasks[t] = {"adapter": t, "accuracy": round(accuracy(mine, golds), 4),
                    "accuracy_alone": round(accuracy(alone, golds), 4), "equal_predictions": mine == alone,
                    "n_differ": sum(a != b for a, b in zip(mine, alone, strict=True))}
    equal = all(v["equal_predictions"] for v in tasks.values())
    if not equal:
        log.warning("mixed batch: predictions differ from the single-adapter passes: %s", tasks)
    return {"n": len(order), "batch_size": ctx.settings.eval_batch_size, "seconds": round(seconds, 2),
            "separate_seconds": round(separate, 2), "all_equal": equal, "tasks": tasks}


# -- the demo --------------------------------------------------------------------------------------------
def _load(s: Settings, base: nn.Module | None, tokenizer: Any) -> tuple[Any, Any, float]:
    from slimtune.train.models import load_base_model, load_tokenizer, smollm2_path
    from slimtune.tuned import TunedModel

    convert = 0.0
    if s.model == "smollm2" and base is None:
        t = time.perf_counter()
        smollm2_path()  # converts the packaged GGUF once; cached afterwards
        convert = time.perf_counter() - t
    tok = tokenizer if tokenizer is not None else load_tokenizer(s.model)
    base = base if base is not None else load_base_model(s.model, "causal_lm")
    return TunedModel(base), tok, convert


def run_multitask_demo(output_dir: str | Path = "runs/demo_multitask", steps: int | None = None,
                       eval_per_label: int | None = None, *, tasks: tuple[TaskSpec, ...] | list[TaskSpec] = TASKS,
                       settings: Settings | None = None, base: nn.Module | None = None, tokenizer: Any = None,
                       rows: list[Callable[[Context], list[Row]]] | None = None) -> dict[str, Any]:
    """Train one LoRA per task, evaluate every row on every task, serve a mixed batch; write the report.

    Args:
        steps: training steps per task LoRA (default: each task's); eval_per_label: held-out examples per label.
        tasks, settings: what to run (defaults: TASKS on SmolLM2, Settings()).
        base, tokenizer: a causal LM and its tokenizer to use instead of loading `settings.model`.
        rows: the row functions (default ROWS).
    Returns:
        The report dict (also written to `output_dir`/report.json).
    """
    ctx = prepare(output_dir, steps, eval_per_label, tasks=tasks, settings=settings, base=base, tokenizer=tokenizer)
    return finish(ctx, rows)


def prepare(output_dir: str | Path = "runs/demo_multitask", steps: int | None = None,
            eval_per_label: int | None = None, *, tasks: tuple[TaskSpec, ...] | list[TaskSpec] = TASKS,
            settings: Settings | None = None, base: nn.Module | None = None, tokenizer: Any = None) -> Context:
    """Load the model and train one LoRA per task (first half of `run_multitask_demo`)."""
    wall0 = time.perf_counter()
    s = settings or Settings()
    specs = [replace(t, steps=steps or t.steps, eval_per_label=eval_per_label or t.eval_per_label) for t in tasks]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, convert = _load(s, base, tokenizer)
    ctx = Context(model, tok, s, out, started=wall0, convert_seconds=convert)
    for spec in specs:
        log.info("[%4.0f s] training LoRA %r: %s (%d steps x %d)", ctx.stamp(), spec.name, spec.description,
                 spec.steps, s.batch_size)
        ctx.tasks[spec.name] = train_adapter(ctx, spec.name, spec)
    return ctx


def finish(ctx: Context, rows: list[Callable[[Context], list[Row]]] | None = None) -> dict[str, Any]:
    """Evaluate the rows, serve the mixed batch, write the report (second half of `run_multitask_demo`)."""
    results = run_rows(ctx, ROWS if rows is None else rows)
    log.info("[%4.0f s] mixed batch over %s", ctx.stamp(), list(ctx.tasks))
    mixed = mixed_batch(ctx)
    report = _report(ctx, results, mixed)
    write_report(ctx.out, report)
    return report


def _report(ctx: Context, results: list[dict], mixed: dict) -> dict[str, Any]:
    wall = ctx.stamp()
    tasks = {t: {"description": r.spec.description, "labels": r.spec.labels, "n_eval": len(r.eval),
                 "fewshot": len(r.fewshot), **r.summary} for t, r in ctx.tasks.items()}
    best = max((r for r in results if r["mean"] is not None), key=lambda r: r["mean"], default=None)
    summary = (f"{len(results)} rows x {len(tasks)} tasks; best mean accuracy {best['mean']:.1%} ({best['row']}); "
               f"mixed batch equal to single adapters: {mixed['all_equal']}; wall {wall:.0f} s") if best else ""
    return {"title": "multi-task: " + " + ".join(r["description"] for r in tasks.values()),
            "metric": "accuracy (first-token scoring over each task's own label words)",
            "model": ctx.settings.model, "method": ctx.settings.lora, "tasks": tasks, "rows": results,
            "mixed_batch": mixed, "convert_seconds": round(ctx.convert_seconds, 2), "wall_seconds": round(wall, 2),
            "torch_threads": torch.get_num_threads(), "load_average": _loads(ctx.loads),
            "device": str(next(ctx.model.parameters()).device), "output_dir": str(ctx.out), "summary": summary}
