"""The training loop: an optimizer on the adapter (``train.optimizer``: AdamW by default, 8-bit / paged
AdamW, SGD; LoRA+ groups), deterministic data order, checkpoints, signals, DDP.

Data order is a pure function of (seed, epoch): every epoch is a seeded permutation, and a run's
position is the count of micro-batches consumed. Together with the optimizer state, the torch RNG
(dropout) and an lr that is a pure function of the step, this makes ``resume`` exact on CPU.

Under ``torchrun`` each process takes its slice of every global batch (``batch_size`` rows per
process), DDP averages the gradients of the trainable tensors only, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.train.config import TrainConfig, load_train_config
from slimtune.train.data import collate
from slimtune.train.errors import CheckpointError, TrainConfigError
from slimtune.train.metrics import MetricsLog, plot_run
from slimtune.train.models import load_tokenizer
from slimtune.train.setup import TaskData, build_model, eval_metrics, load_data, pad_id

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * max(0.0, 1 - progress)


def _dist() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def _clear_previous_run(run_dir: Path) -> None:
    """A fresh (not resumed) run replaces the records and checkpoints of an earlier run in the same folder."""
    old = [p for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "summary.json",
                       run_dir / "plots") if p.exists()]
    if old:
        log.warning("%s holds an earlier run; replacing its %s (use --resume to continue it instead)",
                    run_dir, ", ".join(p.name for p in old))
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# train fields that may change between an interrupted run and its resumption without breaking it
_RESUMABLE_CHANGES = {"progress", "log_every", "eval_every", "save_every", "keep_last", "max_bad_steps", "eval_before"}


def _check_same_run(saved: dict | None, cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse to resume a checkpoint into a run whose model, method, data or schedule differ."""
    if saved is None:
        return
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    for section in ("model", "method", "data", "train"):
        old, new = saved.get(section, {}), now[section]
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            if section != "method" and key not in old and new.get(key) == defaults[section].get(key):
                continue  # a field added since the checkpoint was written, left at its default
            if old.get(key) != new.get(key):
                raise CheckpointError(f"{ckpt}: saved with {section}.{key}={old.get(key)!r}, this run has "
                                      f"{new.get(key)!r}; resuming would not continue the same run")


class Trainer:
    """Fine-tune an adapter as described by a :class:`TrainConfig`.

    Args:
        config: a TrainConfig, a dict of its sections, or a path to a YAML file.
        model: optional base model or TunedModel to use instead of loading ``config.model.name``.
        tokenizer: optional tokenizer to use instead of loading one for ``config.model.name``.
    """

    def __init__(self, config: TrainConfig | dict | str | Path, model: nn.Module | None = None,
                 tokenizer: Any = None) -> None:
        if isinstance(config, (str, Path)):
            config = load_train_config(config)
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.rank, self.world = _dist()
        self.device = _device(self.rank)
        torch.manual_seed(config.train.seed)  # adapter init: identical on every rank
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model.name)
        self.data: TaskData = load_data(config, self.tokenizer)
        self.model = build_model(config, self.data, model, pad_id(self.tokenizer)).to(self.device)
        hf_config = getattr(self.model, "config", None)
        if hf_config is not None and getattr(hf_config, "pad_token_id", 0) is None:
            hf_config.pad_token_id = pad_id(self.tokenizer)  # decoder classifiers find the last real token by it
        self._stop: str | None = None

    # -- public --------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Metrics of the adapted model on the eval set."""
        return eval_metrics(self.model, self.config, self.data, self.tokenizer)

    def train(self, resume: bool | str | Path = False) -> dict[str, Any]:
        """Run training; returns a summary (status, steps, train_seconds, eval base/adapted, ...).

        Args:
            resume: True for the latest checkpoint in the run dir, or a checkpoint path.

        Raises:
            TrainingAborted: ``train.max_bad_steps`` non-finite losses in a row.
        """
        cfg, tc = self.config, self.config.train
        main = self.rank == 0
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                _clear_previous_run(self.run_dir)
            cfg.save(self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir) if main else None
        opt = self._make_optimizer()
        per_epoch = len(self.data.train) // (tc.batch_size * self.world)  # micro-batches; last partial dropped
        if per_epoch < tc.grad_accum:
            raise TrainConfigError(
                f"data: {len(self.data.train)} training examples give fewer than one optimizer step "
                f"(batch_size={tc.batch_size} x grad_accum={tc.grad_accum} x {self.world} processes)")
        total = tc.max_steps or max(1, int(tc.epochs * per_epoch) // tc.grad_accum)
        state = {"consumed": 0, "tokens": 0, "train_seconds": 0.0, "base_eval": None}
        step = 0
        if resume:
            ckpt = latest_checkpoint(self.run_dir) if resume is True else Path(resume)
            if ckpt is None:
                raise CheckpointError(f"{self.run_dir}: --resume given but no checkpoint in {self.run_dir}/checkpoints")
            state = load_checkpoint(ckpt, self.model, opt)
            _check_same_run(state.pop("config", None), cfg, ckpt)
            step = state.pop("step")
            log.info("resumed from %s (step %d)", ckpt, step)
            if metrics:
                metrics.truncate_after(step)
        elif tc.eval_before and main:
            with self.model.disabled():
                state["base_eval"] = self.evaluate()
            metrics.write({"step": 0, "split": "eval", "model": "base", **state["base_eval"]})
        ddp = self._wrap_ddp()
        summary = self._loop(ddp, opt, metrics, state, step, total, per_epoch)
        if main:
            metrics.close()
        return summary

    # -- internals -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """``train.optimizer`` over the trainable tensors; with ``train.loraplus_ratio``, LoRA+'s two groups
        (B at lr * ratio, kept through the schedule by the group's ``lr_scale``)."""
        from slimtune.optim import loraplus_groups, make_optimizer

        tc = self.config.train
        if tc.loraplus_ratio is None:
            groups: list = [p for _, p in self.model.trainable_parameters()]
        else:
            groups = loraplus_groups(self.model, tc.lr, tc.loraplus_ratio, tc.weight_decay)
            groups[1]["lr_scale"] = tc.loraplus_ratio
        return make_optimizer(tc.optimizer, groups, lr=tc.lr, weight_decay=tc.weight_decay)

    def _wrap_ddp(self) -> nn.Module:
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        from slimtune.methods import METHODS

        ids = [self.device.index] if self.device.type == "cuda" else None
        freezes = any(METHODS[self.model.configs[n].method].method.changes_trainable for n in self.model.active)
        # registers (and syncs) only params that require grad; a method that freezes some later needs
        # DDP to accept parameters without gradients
        return DDP(self.model, device_ids=ids, find_unused_parameters=freezes)

    def _micro_batch(self, consumed: int, per_epoch: int, perms: dict[int, torch.Tensor]) -> dict:
        tc = self.config.train
        epoch, index = divmod(consumed, per_epoch)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
            perms.clear()
            perms[epoch] = torch.randperm(len(self.data.train), generator=gen)
        start = (index * self.world + self.rank) * tc.batch_size  # this rank's rows of the global batch
        rows = perms[epoch][start : start + tc.batch_size].tolist()
        batch = collate([self.data.train[i] for i in rows], pad_id(self.tokenizer))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        tc = self.config.train
        ctx = contextlib.nullcontext()
        if tc.precision != "fp32":
            dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float16
            ctx = torch.autocast(self.device.type, dtype=dtype)
        with ctx:
            loss = model(**batch).loss
            extra = self.model.regularization_loss()  # methods' own terms (orthogonality, sparsity)
            return loss if extra is None else loss + extra

    def _handle_signal(self, signum: int, frame: Any) -> None:
        self._stop = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a checkpoint", self._stop)

    def _install_signals(self) -> dict:
        old = {}
        if hasattr(signal, "SIGTERM"):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                for s in (signal.SIGINT, signal.SIGTERM):
                    old[s] = signal.signal(s, self._handle_signal)
        return old

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flag)  # any rank signalled: all stop at the same step
        return bool(flag.item())

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def _save(self, opt, state: dict, step: int) -> None:
        if self.rank == 0:
            state = {**state, "config": self.config.to_dict()}
            save_checkpoint(self.run_dir, step, self.model, opt, state, self.config.train.keep_last)

    def _accumulate(self, model: nn.Module, state: dict, per_epoch: int, perms: dict) -> tuple[float, int]:
        """Forward/backward ``grad_accum`` micro-batches; returns (mean loss over ranks, tokens seen)."""
        tc = self.config.train
        losses, tokens = [], 0
        for micro in range(tc.grad_accum):
            batch = self._micro_batch(state["consumed"], per_epoch, perms)
            state["consumed"] += 1
            tokens += int(batch["attention_mask"].sum()) * self.world
            sync = micro == tc.grad_accum - 1 or self.world == 1  # DDP all-reduces on the last one only
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = self._forward(model, batch)
                (loss / tc.grad_accum).backward()
            losses.append(loss.detach().float().item())
        return self._mean_over_ranks(sum(losses) / len(losses)), tokens

    def _optimizer_step(self, opt: torch.optim.Optimizer, lr: float) -> float | None:
        tc = self.config.train
        params = [p for g in opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip).item() if tc.grad_clip > 0 else None
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+'s B group keeps its multiple of the schedule
        opt.step()
        return grad_norm

    def _loop(self, model, opt, metrics, state, step, total, per_epoch) -> dict[str, Any]:
        from tqdm.auto import tqdm

        tc, main = self.config.train, self.rank == 0
        model.train()
        perms: dict[int, torch.Tensor] = {}
        bar = tqdm(total=total, initial=step, disable=not (main and tc.progress), desc="train",
                   unit="step", dynamic_ncols=True)
        old_handlers = self._install_signals()
        bad, status, last_eval = 0, "completed", None
        t_start = time.perf_counter() - state["train_seconds"]
        try:
            while step < total:
                t0 = time.perf_counter()
                loss, tokens = self._accumulate(model, state, per_epoch, perms)
                lr = lr_at(step, total, tc)
                step += 1
                bar.update(1)
                if not math.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    bad += 1
                    log.warning("step %d: non-finite loss (%s), step skipped (%d in a row)", step, loss, bad)
                    if main:
                        metrics.write({"step": step, "loss": None, "skipped": True, "lr": lr})
                    if bad >= tc.max_bad_steps:
                        raise TrainingAborted(f"{bad} non-finite losses in a row at step {step}; last good "
                                              f"checkpoint kept in {self.run_dir / 'checkpoints'}")
                    continue
                bad = 0
                grad_norm = self._optimizer_step(opt, lr)
                self.model.step(step, opt)  # methods' per-step work; gradients still there (AdaLoRA's importance)
                opt.zero_grad(set_to_none=True)
                state["tokens"] += tokens
                dt = time.perf_counter() - t0
                state["train_seconds"] = time.perf_counter() - t_start
                if main and (step % tc.log_every == 0 or step == total):
                    metrics.write({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens / dt,
                                   "grad_norm": grad_norm, "epoch": state["consumed"] / per_epoch,
                                   "elapsed": state["train_seconds"]})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
                if tc.eval_every and step % tc.eval_every == 0 and step < total:
                    t_eval = time.perf_counter()
                    last_eval = self._eval(metrics, step)
                    model.train()
                    t_start += time.perf_counter() - t_eval  # train_seconds counts training only
                stop = self._stop_requested()
                if stop or (tc.save_every and step % tc.save_every == 0):
                    self._save(opt, state, step)
                if stop:
                    status = "interrupted"
                    break
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        state["train_seconds"] = time.perf_counter() - t_start
        if status == "completed":
            if not (tc.save_every and step % tc.save_every == 0):
                self._save(opt, state, step)
            last_eval = self._eval(metrics, step)
        return self._finish(status, step, state, last_eval)

    def _eval(self, metrics: MetricsLog | None, step: int) -> dict[str, float] | None:
        if self.rank != 0:
            self._barrier()
            return None
        result = self.evaluate()
        metrics.write({"step": step, "split": "eval", "model": "adapted", **result})
        self._barrier()
        return result

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _finish(self, status: str, step: int, state: dict, last_eval: dict | None) -> dict[str, Any]:
        summary = {"status": status, "steps": step, "train_seconds": round(state["train_seconds"], 2),
                   "tokens": state["tokens"], "trainable_params": sum(p.numel() for _, p in
                                                                      self.model.trainable_parameters()),
                   "eval": {"base": state.get("base_eval"), "adapted": last_eval},
                   "run_dir": str(self.run_dir)}
        if self.rank == 0:
            if status == "completed":
                self.model.save(self.run_dir / "adapter")
            try:
                plot_run(self.run_dir)
            except Exception as e:  # plots are a convenience; never fail a finished run on them
                log.warning("plotting failed: %s", e)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(config: TrainConfig | dict | str | Path, resume: bool | str | Path = False, **kwargs: Any) -> dict[str, Any]:
    """Build a :class:`Trainer` for ``config`` and run it; returns the run summary."""
    return Trainer(config, **kwargs).train(resume=resume)
