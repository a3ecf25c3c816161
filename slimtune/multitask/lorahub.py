"""LoRAHub: compose k existing LoRAs of one model for a new task from a few examples, without gradients.

Huang et al. 2023 (COLM 2024), arXiv:2307.13269. With LoRAs (A_i, B_i) sharing rank, targets and scale s:

    A_hat = sum_i w_i A_i        B_hat = sum_i w_i B_i        delta_W = s * B_hat @ A_hat
    w* = argmin_{w in [lo, hi]^k}  L_few-shot(w) + l1 * sum_i |w_i|

A and B are combined separately, element-wise (the product holds cross terms B_i A_j: it is not
sum_i w_i B_i A_i). L is the mean of `loss_fn` over the few-shot batches. The search is CMA-ES (the
`cma` library) started from w = 0 (the official code's init, sail-sg/lorahub) with sigma0 = (hi - lo) / 6,
for a budget of `steps` loss evaluations (the paper's 40 inference steps); the first evaluation is the
start point itself. The result is the best evaluated w, written into a normal LoRA adapter `name`.

    from slimtune.multitask.lorahub import lorahub
    st.load(base, "out/topics", name="topics"); st.load(model, "out/sentiment", name="sentiment")
    result = lorahub(model, ["topics", "sentiment"], batches, name="lorahub", steps=40)
    result.weights, result.loss, result.uniform_loss; model.save("out/hub", name="lorahub")

The official code divides the penalty by k (0.05 * mean |w_i|); here it is the paper's l1 * sum |w_i|
(pass l1=0.05 / k for the code's). docs/lorahub.md has the details and what was measured.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from slimtune.errors import AdapterNameError, ConfigError, did_you_mean
from slimtune.multitask.merging import _read_task
from slimtune.tuned import TunedModel

LossFn = Callable[[TunedModel, dict], Tensor]


@dataclass
class LoraHubResult:
    """What `lorahub` found.

    weights: adapter -> w_i of the composed adapter. loss: its objective (few_shot_loss + l1 * sum |w_i|).
    few_shot_loss: its mean few-shot loss. uniform_loss: the mean few-shot loss at w_i = 1/k (no penalty).
    history: the best objective so far after each evaluation (len = evaluations made, at most `steps`).
    """

    name: str
    weights: dict[str, float]
    loss: float
    few_shot_loss: float
    uniform_loss: float
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lorahub(model: TunedModel, adapters: Sequence[str], batches: Iterable[Mapping[str, Tensor]], *,
            name: str = "lorahub", steps: int = 40, l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
            seed: int | None = 0, loss_fn: LossFn | None = None, progress: bool = True,
            sigma0: float | None = None) -> LoraHubResult:
    """Add (or replace) LoRA adapter `name` = the LoRAHub composition of `adapters`, and make it active.

    Args:
        adapters: two or more plain LoRA adapters of `model`, one rank, targets and scale per module.
        batches: the new task's few-shot examples: dicts of tensors (input_ids, attention_mask, labels).
        steps: loss evaluations CMA-ES may spend (each runs every batch once).
        l1: weight of the penalty l1 * sum |w_i|.
        bounds: (lo, hi) for every w_i.
        seed: CMA-ES's random stream (None: fresh entropy, not reproducible).
        loss_fn: loss_fn(model, batch) -> scalar tensor; default model(**batch).loss.
        sigma0: CMA-ES's initial step size (default (hi - lo) / 6).
    Evaluation runs under torch.no_grad in eval mode; each module's train/eval mode is restored after.
    Raises:
        AdapterNameError: an unknown adapter, or `name` is one of `adapters`.
        ConfigError: bad options, empty batches, a non-LoRA adapter, mismatched ranks/targets/scales.
        ImportError: the `cma` package is missing.
    """
    cma = _import_cma()
    names = _check_adapters(model, adapters, name)
    lo, hi = _check_options(steps, l1, bounds, seed, sigma0)
    sources = _read_sources(model, names)
    batches = _check_batches(batches, next(model.model.parameters()).device)
    loss_fn = loss_fn or _default_loss
    previous = [n for n in model.active if n != name]
    if name in model.configs:
        model.delete(name)
    model.add(model.configs[names[0]].replace(init="default"), name, init=False)
    modes = {m: m.training for m in model.modules()}
    try:
        composer = _Composer(model, name, names[0], sources)
        model.use(name).eval()
        evaluate = _Objective(model, composer, batches, loss_fn, l1)
        uniform = evaluate.few_shot([1.0 / len(names)] * len(names))
        x0 = [min(max(0.0, lo), hi)] * len(names)
        sigma = (hi - lo) / 6 if sigma0 is None else sigma0
        best, history = _search(cma, evaluate, x0, sigma, lo, hi, steps, seed, progress)
        few_shot = evaluate.few_shot(best)  # also leaves w* in the composed adapter
        result = LoraHubResult(name, dict(zip(names, best, strict=True)), history[-1], few_shot, uniform, history)
    except BaseException:
        model.delete(name)
        if previous:
            model.use(previous)
        raise
    finally:
        for module, mode in modes.items():
            module.training = mode
    return result


# -- checks ------------------------------------------------------------------------------------------
def _import_cma():
    try:
        import cma
    except ImportError as e:
        raise ImportError("lorahub needs the CMA-ES library `cma`: pip install cma "
                          "(or pip install 'slimtune[multitask]')") from e
    return cma


def _check_adapters(model: TunedModel, adapters: Sequence[str], name: str) -> list[str]:
    if not isinstance(model, TunedModel):
        raise TypeError(f"lorahub: expected a TunedModel (st.load / st.attach), got {type(model).__name__}")
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or len(adapters) < 2:
        raise ConfigError(f"lorahub: adapters={adapters!r}: expected a list of at least 2 LoRA adapter names")
    names = list(adapters)
    if len(set(names)) != len(names):
        raise ConfigError(f"lorahub: adapters={names!r}: each adapter may appear once")
    for n in names:
        if n not in model.configs:
            raise AdapterNameError(f"lorahub: no adapter named {n!r}; adapters here: {list(model.configs)}."
                                   + did_you_mean(n, model.configs))
        cfg = model.configs[n]
        if cfg.method != "lora":
            raise ConfigError(f"lorahub: adapter {n!r} is {cfg.method!r}; LoRAHub composes plain LoRA adapters "
                              "(method 'lora'). A variant that exports as LoRA can be saved with format='peft' "
                              "and loaded back as one")
        if cfg.init.startswith("pissa") or cfg.init == "olora":
            raise ConfigError(f"lorahub: adapter {n!r} has init={cfg.init!r}, which moved part of W0 into the "
                              "adapter; save it and load it back (it loads as a plain rank-2r LoRA)")
    if name in names:
        raise AdapterNameError(f"lorahub: name={name!r} is one of the source adapters; pass another name=")
    if model._merged_names():
        raise RuntimeError(f"lorahub: adapters {model._merged_names()} are merged into the base weights; "
                           "call model.unmerge() first")
    if model._state.disabled:
        raise RuntimeError("lorahub: called inside model.disabled(), where no adapter acts")
    return names


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(steps, l1, bounds, seed, sigma0) -> tuple[float, float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"lorahub: steps={steps!r}: expected an int >= 1 (loss evaluations; the paper uses 40)")
    if not (_number(l1) and l1 >= 0):
        raise ConfigError(f"lorahub: l1={l1!r}: expected a number >= 0 (the paper uses 0.05)")
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(_number(b) for b in bounds)
    if not ok or bounds[0] >= bounds[1]:
        raise ConfigError(f"lorahub: bounds={bounds!r}: expected (lo, hi) with lo < hi, e.g. (-1.5, 1.5)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"lorahub: seed={seed!r}: expected an int >= 0 or None")
    if sigma0 is not None and not (_number(sigma0) and sigma0 > 0):
        raise ConfigError(f"lorahub: sigma0={sigma0!r}: expected a number > 0")
    return float(bounds[0]), float(bounds[1])


def _check_batches(batches, device: torch.device) -> list[dict]:
    if isinstance(batches, Mapping):
        raise ConfigError("lorahub: batches is one dict; expected a list of batches (dicts of tensors): [batch]")
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ConfigError(f"lorahub: batch {i} is a {type(batch).__name__}; expected a dict of tensors "
                              "(input_ids, attention_mask, labels)")
        out.append({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
    if not out:
        raise ConfigError("lorahub: batches is empty; pass the new task's few-shot examples (a list of dicts of "
                          "tensors with input_ids, attention_mask and labels)")
    return out


# -- the sources and the composed adapter ---------------------------------------------------------------
def _read_sources(model: TunedModel, names: list[str]) -> dict[str, list[tuple[Tensor, Tensor, float]]]:
    """module -> [(A_i, B_i, s_i)] of every source (flat views of its parameters); one rank and scale each."""
    tasks = [_read_task(model, n, 1.0) for n in names]
    for t in tasks:
        extra = sorted(t.tensors) or sorted(t.dense)
        if extra:
            raise ConfigError(f"lorahub: adapter {t.name!r} also changes {extra[:3]} (bias / modules_to_save); "
                              "LoRAHub composes the A and B factors only")
    first = tasks[0]
    for t in tasks[1:]:
        if set(t.lora) != set(first.lora):
            odd = sorted(set(t.lora) ^ set(first.lora))[:3]
            raise ConfigError(f"lorahub: adapters {first.name!r} and {t.name!r} target different modules (e.g. "
                              f"{odd}); LoRAHub adds A's and B's element-wise, so all need the same targets")
        for module, (A, B, s) in t.lora.items():
            A0, B0, s0 = first.lora[module]
            if A.shape != A0.shape or B.shape != B0.shape:
                raise ConfigError(f"lorahub: adapter {t.name!r} has rank {A.shape[0]} at {module}, adapter "
                                  f"{first.name!r} rank {A0.shape[0]}; LoRAHub adds A's and B's element-wise, "
                                  "so all need one rank (re-compress with merge_adapters(..., method='svd', rank=r))")
            if not math.isclose(s, s0, rel_tol=1e-6):
                raise ConfigError(f"lorahub: adapter {t.name!r} has scale alpha/r = {s:g} at {module}, adapter "
                                  f"{first.name!r} {s0:g}; the composition needs one scale (equal alpha and r)")
    return {m: [t.lora[m] for t in tasks] for m in first.lora}


class _Composer:
    """Writes A_hat = sum_i w_i A_i and B_hat = sum_i w_i B_i into adapter `name`'s tensors, in place."""

    def __init__(self, model: TunedModel, name: str, first: str, sources: dict[str, list]) -> None:
        layers = model.view(name).layers
        if set(layers) != set(sources):
            raise ConfigError(f"lorahub: the composed adapter targets {sorted(layers)[:3]}..., adapter {first!r} "
                              f"{sorted(sources)[:3]}...; the model changed since {first!r} was added")
        self.slots = []  # (flat view of A_hat, [A_i]), (flat view of B_hat, [B_i])
        for module, factors in sources.items():
            adapter = layers[module]
            self.slots.append((adapter.A.data.view(adapter.A.shape[0], -1), [A for A, _, _ in factors]))
            self.slots.append((adapter.B.data.view(adapter.B.shape[0], -1), [B for _, B, _ in factors]))

    @torch.no_grad()
    def write(self, weights: Sequence[float]) -> None:
        for target, tensors in self.slots:
            target.copy_(tensors[0] * weights[0])
            for t, w in zip(tensors[1:], weights[1:], strict=True):
                target.add_(t * w)


def _default_loss(model: TunedModel, batch: dict) -> Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ConfigError(f"lorahub: the model returned no loss for a batch with keys {sorted(batch)}; batches "
                          "need `labels` (or pass loss_fn=)")
    return loss


class _Objective:
    """w -> mean few-shot loss + l1 * sum |w_i|, each w written into the composed adapter first."""

    def __init__(self, model: TunedModel, composer: _Composer, batches: list[dict], loss_fn: LossFn,
                 l1: float) -> None:
        self.model, self.composer, self.batches, self.loss_fn, self.l1 = model, composer, batches, loss_fn, l1

    @torch.no_grad()
    def few_shot(self, weights: Sequence[float]) -> float:
        self.composer.write(weights)
        total = 0.0
        for batch in self.batches:
            loss = self.loss_fn(self.model, batch)
            total += float(loss.detach().float()) if isinstance(loss, Tensor) else float(loss)
        mean = total / len(self.batches)
        return mean if math.isfinite(mean) else math.inf

    def __call__(self, weights: Sequence[float]) -> float:
        return self.few_shot(weights) + self.l1 * sum(abs(w) for w in weights)


def _search(cma, objective: _Objective, x0: list[float], sigma0: float, lo: float, hi: float, steps: int,
            seed: int | None, progress: bool) -> tuple[list[float], list[float]]:
    """CMA-ES for `steps` evaluations (the start point first); the best w seen and the best-so-far history."""
    import numpy as np
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)  # our own stream: cma's `seed` option would reseed numpy's global one
    opts = {"bounds": [lo, hi], "seed": math.nan, "randn": lambda lam, n: rng.standard_normal((lam, n)),
            "verbose": -9}
    es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
    best, best_f, history = list(x0), objective(x0), []
    history.append(best_f)
    bar = tqdm(total=steps, initial=1, desc="lorahub", disable=not progress, leave=False)
    try:
        while len(history) < steps and not es.stop():
            candidates = [np.clip(x, lo, hi) for x in es.ask()]
            values = []
            for x in candidates[: steps - len(history)]:  # the last generation may be cut by the budget
                w = [float(v) for v in x]
                values.append(objective(w))
                if values[-1] < best_f:
                    best, best_f = w, values[-1]
                history.append(best_f)
                bar.update(1)
                bar.set_postfix(best=f"{best_f:.4f}")
            if len(values) == len(candidates):
                es.tell(candidates, [v if math.isfinite(v) else 1e30 for v in values])
    finally:
        bar.close()
    return best, history


# -- command line ------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """`slimtune lorahub ADAPTER_DIR... --data FILE --out DIR`: compose LoRAs for a new task's few examples."""
    p = subparsers.add_parser("lorahub", help="compose LoRA adapters for a new task from a few examples "
                              "(LoRAHub, gradient-free CMA-ES; docs/lorahub.md)")
    p.add_argument("adapters", nargs="+", help="LoRA adapter folders of one base (ours or HF PEFT's), 2 or more")
    p.add_argument("--data", required=True, help="few-shot examples: JSONL/JSON/CSV records with input/output, "
                   "instruction/output (alpaca), messages, or text")
    p.add_argument("--out", required=True, help="folder for the composed LoRA adapter and lorahub.json")
    p.add_argument("--base", help="base model folder (default: the one the first adapter records)")
    p.add_argument("--steps", type=int, default=40, help="loss evaluations of CMA-ES (default 40)")
    p.add_argument("--l1", type=float, default=0.05, help="weight of the penalty l1 * sum |w_i| (default 0.05)")
    p.add_argument("--bounds", type=float, nargs=2, default=(-1.5, 1.5), metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch of the few-shot loss")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example")
    p.add_argument("--format", default="slimtune", choices=["slimtune", "peft"])
    p.set_defaults(func=_cmd_lorahub)
    return p


def _cmd_lorahub(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from slimtune.cli import _load_all

    model, names = _load_all(args.adapters, args.base)
    tokenizer = _tokenizer_for(args.adapters[0], args.base)
    batches = few_shot_batches(args.data, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    result = lorahub(model, names, batches, name="lorahub", steps=args.steps, l1=args.l1,
                     bounds=tuple(args.bounds), seed=args.seed)
    model.save(args.out, format=args.format, name="lorahub")
    (Path(args.out) / "lorahub.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    weights = ", ".join(f"{n}={w:+.3f}" for n, w in result.weights.items())
    print(f"lorahub: {weights}; few-shot loss {result.few_shot_loss:.4f} (uniform mix {result.uniform_loss:.4f}); "
          f"{args.format} LoRA adapter written to {args.out}")
    return 0


def _tokenizer_for(adapter: str, base: str | None):
    from transformers import AutoTokenizer

    from slimtune.io import read_adapter_dir

    path = base or read_adapter_dir(adapter)[0].get("base_model_name_or_path")
    if not path:
        raise ConfigError(f"{adapter}: the adapter does not record its base model; pass --base PATH")
    return AutoTokenizer.from_pretrained(path)


def few_shot_batches(source: str, tokenizer, batch_size: int = 8, max_length: int = 512) -> list[dict[str, Tensor]]:
    """Batches of a few-shot file: records with input/output (LoRAHub's format) or instruction records
    (alpaca, messages) take the loss on the answer only; records with `text` on the whole text."""
    from slimtune.train.config import DataSection
    from slimtune.train.data import chat_example, collate, read_records, to_messages

    cfg = DataSection(task="instruction", max_length=max_length)
    examples = []
    for r in read_records(source):
        if "input" in r and "output" in r and "instruction" not in r:
            msgs = [{"role": "user", "content": str(r["input"])}, {"role": "assistant", "content": str(r["output"])}]
            examples.append(chat_example(tokenizer, msgs, cfg))
        elif "text" in r and not {"instruction", "messages", "conversations"} & set(r):
            ids = tokenizer.encode(str(r["text"]), add_special_tokens=False)[:max_length]
            examples.append({"input_ids": ids, "labels": list(ids)})
        else:
            examples.append(chat_example(tokenizer, to_messages(r, cfg), cfg))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [collate(examples[i:i + batch_size], pad) for i in range(0, len(examples), batch_size)]


__all__ = ["LoraHubResult", "add_parser", "few_shot_batches", "lorahub"]
