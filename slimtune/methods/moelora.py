"""MOELoRA: LoRA experts mixed by a task-ID gate. Liu et al. 2023, "When MOE Meets LLMs: Parameter Efficient
Fine-tuning for Multi-task Medical Applications", arXiv:2310.18339 (SIGIR 2024).

    y = base(x) + s * sum_i w_{t,i} * drop(x) @ A_i.T @ B_i.T      A_i: (r/N, d_in)  B_i: (d_out, r/N)
    w_t = softmax(W_g @ e_t)      e_t = E[t]: (task_embedding_dim,)  W_g: (N, task_embedding_dim)    s = alpha / r
r is the total rank, split evenly over the N experts (rank r/N each), as the paper's code does (MOELoRA-peft,
`MMOELinearA`: r // expert_num; scaling alpha / r), so the experts together cost a rank-r LoRA. t is the row's
task id: `model(**batch, task_ids=t)`, one int per row. Every wrapped layer has its own E and W_g (as in the
reference code). Init (reference code): A_i ~ N(0, 0.01^2), B_i = 0 (the base exactly), E ~ N(0, 1) (an
nn.Embedding's), W_g as an nn.Linear's weight (kaiming-uniform).

Merge per task: the gate does not depend on x, so for task t the update is the rank-r LoRA
    delta_W_t = s * [w_{t,1} B_1 | ... | w_{t,N} B_N] @ [A_1; ...; A_N]
`merge_for_task(model, name, t)` adds it as a plain LoRA adapter (st.LoraConfig(r=r, alpha=alpha)); `merge()`
folds the delta of `default_task`. Params per module: r*(d_in+d_out) + num_tasks*task_embedding_dim
+ N*task_embedding_dim.

This file also holds what Poly (poly.py) shares: `TaskRouted`, a layer adapter reading `task_ids`, and
`merge_for_task`, which works for any TaskRouted adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import sizes
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, register


class TaskIdError(SlimtuneError, ValueError):
    """The task ids of a model call are missing, out of range or malformed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fallback_task(num_tasks: int, default_task: int | None) -> int | None:
    """The task of rows given no task id: `default_task`, else 0 when there is one task, else None."""
    return default_task if default_task is not None else 0 if num_tasks == 1 else None


def check_task_fields(cfg: MethodConfig, tasks_field: str) -> None:
    """`tasks_field` (num_tasks / n_tasks) an int >= 1 and `default_task` None or a task id."""
    n = getattr(cfg, tasks_field)
    check_field(_is_int(n) and n >= 1, cfg, tasks_field, "an int >= 1, the number of tasks")
    d = cfg.default_task
    check_field(d is None or (_is_int(d) and 0 <= d < n), cfg, "default_task",
                f"None or a task id in [0, {n}) ({tasks_field}={n})")


@dataclass
class MoeLoraConfig(MethodConfig):
    """MOELoRA: N LoRA experts of rank r/N, mixed per row by a gate on the row's task embedding.

    Args:
        num_experts: N, experts per module.
        r: total rank, split evenly over the experts (each has rank r / N; r must be a multiple of N).
        alpha: numerator of the scale s = alpha / r.
        num_tasks: task ids run from 0 to num_tasks - 1.
        task_embedding_dim: size of each task's embedding e_t, the gate's input.
        dropout: on the adapter branch input only.
        default_task: the task of calls without `task_ids` (and the task `merge()` folds in); None: such calls
            are refused, unless num_tasks == 1.
    """

    aliases = {**MethodConfig.aliases, "expert_num": "num_experts", "task_num": "num_tasks",
               "lora_alpha": "alpha", "lora_dropout": "dropout"}

    num_experts: int = 4
    r: int = 8
    alpha: float = 16.0
    num_tasks: int = 2
    task_embedding_dim: int = 64
    dropout: float = 0.0
    default_task: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is None:
            raise ConfigError("MoeLoraConfig.targets=None: expected the modules to adapt, e.g. targets=['q_proj', "
                              "'v_proj'] or 'all-linear'")
        check_field(_is_int(self.num_experts) and self.num_experts >= 1, self, "num_experts", "an int >= 1, e.g. 4")
        check_field(_is_int(self.r) and self.r >= 1 and self.r % self.num_experts == 0, self, "r",
                    f"an int >= 1 and a multiple of num_experts={self.num_experts} (the total rank, r / num_experts "
                    "per expert)")
        check_field(isinstance(self.alpha, (int, float)) and self.alpha > 0, self, "alpha", "a number > 0")
        check_field(_is_int(self.task_embedding_dim) and self.task_embedding_dim >= 1, self, "task_embedding_dim",
                    "an int >= 1, e.g. 64")
        check_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, self, "dropout",
                    "a float in [0, 1)")
        check_task_fields(self, "num_tasks")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# -- the task-id plumbing both mixtures share -------------------------------------------------------------
class TaskRouted(LayerAdapter):
    """A layer adapter whose update depends on each row's task id, the `task_ids` argument of the model call.

    Subclasses set `num_tasks`, `default_task`, `lora_rank` / `lora_alpha` (the plain LoRA a task's update is) and
    implement `task_lora(task) -> (A (lora_rank, d_in), B (d_out, lora_rank))` with delta_W = s * B @ A,
    s = lora_alpha / lora_rank.
    """

    num_tasks: int = 1
    default_task: int | None = None
    owner: str = "adapter"  # e.g. "MoeLoraConfig adapter 'default'": set by the method's `attached`
    lora_rank: int = 1
    lora_alpha: float = 1.0

    def task_ids(self, rows: int, device: torch.device) -> Tensor:
        """(rows,) int64 task ids of this call's rows: `task_ids` of the call, else the fallback task."""
        value = self.call_argument("task_ids")
        if value is None and _in_backward():
            raise TaskIdError(f"{self.owner} runs again in backward (activation checkpointing recomputes the layer), "
                              "where the model call's task_ids are gone: task-routed adapters cannot train with "
                              "activation checkpointing yet; turn it off (model.gradient_checkpointing_disable())")
        if value is None:
            value = fallback_task(self.num_tasks, self.default_task)
            if value is None:
                raise TaskIdError(
                    f"{self.owner} needs task ids and this call has none: pass one task id per batch row, "
                    f"model(**batch, task_ids=torch.tensor([...])) or model.generate(..., task_ids=...), ints in "
                    f"[0, {self.num_tasks}); or set default_task in its config for calls without them")
        return _as_task_ids(value, rows, self.num_tasks, self.owner, device)

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> Tensor:
        """`merge()` folds in the update of the default task (every row then computes that task)."""
        task = fallback_task(self.num_tasks, self.default_task)
        if task is None:
            raise NotImplementedError(f"{self.owner}: merge() folds in one task's update and its config has no "
                                      "default_task; set it, or use merge_for_task(model, name, task)")
        A, B = self.task_lora(task)
        return (self.lora_alpha / self.lora_rank) * (B @ A)


def _in_backward() -> bool:
    """Whether autograd's engine is running this code (a checkpointed layer recomputed in backward)."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


def _as_task_ids(value: Any, rows: int, num_tasks: int, owner: str, device: torch.device) -> Tensor:
    if _is_int(value):
        value = torch.tensor(value)
    elif isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        value = torch.tensor(list(value), dtype=torch.long)
    if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TaskIdError(f"task_ids={value!r}: {owner} expects integer task ids, an int or a 1-d int tensor with one "
                          "id per batch row")
    if value.dim() == 0:
        value = value.expand(rows)
    if value.dim() != 1 or value.shape[0] != rows:
        raise TaskIdError(
            f"task_ids of shape {tuple(value.shape)}: {owner} expects one task id per batch row, and this batch has "
            f"{rows} rows (generate with num_beams or num_return_sequences = k repeats each row k times: pass "
            "task_ids.repeat_interleave(k); a mixed batch cuts only tensors to its rows)")
    lo, hi = torch.aminmax(value)
    lo, hi = int(lo), int(hi)  # one host sync, as PEFT's Poly router does
    if lo < 0 or hi >= num_tasks:
        bad = lo if lo < 0 else hi
        raise TaskIdError(f"task_ids holds {bad}: {owner} has {num_tasks} tasks, expected task ids in "
                          f"[0, {num_tasks})")
    return value.to(device=device, dtype=torch.long)


def name_layers(adapter: AdapterView, cfg: MethodConfig) -> None:
    """Let each layer adapter name its adapter in errors (a method's `attached` hook)."""
    for layer in adapter.layers.values():
        layer.owner = f"{type(cfg).__name__} adapter {adapter.name!r}"


def merge_for_task(model: nn.Module, name: str, task: int, new_name: str | None = None) -> nn.Module:
    """Add to `model` the plain LoRA adapter that task-routed adapter `name` (MOELoRA, Poly) computes for `task`.

    The new adapter (`new_name`, default f"{name}_task{task}") is an ordinary st.LoraConfig adapter on the same
    modules (with copies of `name`'s modules_to_save): `model.use(new_name)` gives, without task ids, what `name`
    gives rows of task `task` in eval mode; it merges, saves in HF PEFT's LoRA format, serves in mixed batches.

    Raises:
        ConfigError: `name` is not a task-routed adapter, or `task` is not one of its tasks.
    """
    from slimtune.methods.lora import LoraConfig

    cfg, view = model.configs.get(name), model.view(name)  # view() raises for an unknown name
    layers = view.layers
    if not layers or not all(isinstance(a, TaskRouted) for a in layers.values()):
        raise ConfigError(f"merge_for_task: adapter {name!r} ({cfg.method}) is not a task-routed mixture "
                          "(moelora, poly)")
    first = next(iter(layers.values()))
    if not (_is_int(task) and 0 <= task < first.num_tasks):
        raise ConfigError(f"merge_for_task(task={task!r}): adapter {name!r} has {first.num_tasks} tasks, expected "
                          f"an int in [0, {first.num_tasks})")
    new_name = new_name if new_name is not None else f"{name}_task{task}"
    lora = LoraConfig(r=first.lora_rank, alpha=first.lora_alpha, targets=sorted(layers),
                      modules_to_save=cfg.modules_to_save)
    model.add(lora, new_name, init=False)
    with torch.no_grad():
        for module, source in layers.items():
            A, B = source.task_lora(task)
            target = model.view(new_name).layers[module]
            target.A.copy_(A)
            target.B.copy_(B)
    if cfg.modules_to_save:  # the trained head copies: same on-disk keys in both adapters
        tensors, src = model.adapter_state_dict(new_name), model.adapter_state_dict(name)
        model.load_adapter_state_dict({k: src.get(k, v) for k, v in tensors.items()}, new_name)
    return model


# -- MOELoRA ------------------------------------------------------------------------------------------------
class MoeLora(TaskRouted):
    """N LoRA experts A (N, r/N, d_in), B (N, d_out, r/N) and a task gate E (num_tasks, e), W_g (N, e)."""

    def __init__(self, base: nn.Module, cfg: MoeLoraConfig) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        n, r_e, e = cfg.num_experts, cfg.r // cfg.num_experts, cfg.task_embedding_dim
        self.num_tasks, self.default_task = cfg.num_tasks, cfg.default_task
        self.lora_rank, self.lora_alpha, self.scale = cfg.r, cfg.alpha, cfg.scale
        self.A = nn.Parameter(torch.empty(n, r_e, d_in, **kw).normal_(0.0, 0.01))  # reference code's init
        self.B = nn.Parameter(torch.zeros(n, d_out, r_e, **kw))
        self.E = nn.Parameter(torch.empty(cfg.num_tasks, e, **kw).normal_())  # task embeddings (nn.Embedding init)
        self.W_g = nn.Parameter(torch.empty(n, e, **kw))  # gate (nn.Linear init, no bias)
        nn.init.kaiming_uniform_(self.W_g, a=math.sqrt(5))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def gate(self, tasks: Tensor) -> Tensor:
        """(rows, N) expert weights w_t = softmax(W_g e_t) of each row's task."""
        logits = self.E.index_select(0, tasks) @ self.W_g.T  # (rows, e) -> (rows, N)
        wide = torch.float32 if logits.element_size() < 4 else None  # bf16 / fp16: the softmax in fp32
        return torch.softmax(logits, dim=-1, dtype=wide).to(logits.dtype)

    def _flat(self) -> tuple[Tensor, Tensor]:
        """A (r, d_in) and B (d_out, r) with expert i in rank slots [i*r/N, (i+1)*r/N)."""
        n, d_out, r_e = self.B.shape
        return self.A.reshape(n * r_e, -1), self.B.permute(1, 0, 2).reshape(d_out, n * r_e)

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        rows, n = x.shape[0], self.A.shape[0]
        w = self.gate(self.task_ids(rows, self.E.device))  # (rows, N)
        A, B = self._flat()
        h = x if self.drop is None else self.drop(x)
        h = h.to(A.dtype) @ A.T  # (rows, ..., r)
        h = h.unflatten(-1, (n, -1)) * w.view(rows, *(1,) * (h.dim() - 2), n, 1)  # expert i's slots times w_i
        return base_out + ((h.flatten(-2) @ B.T) * self.scale).to(base_out.dtype)  # (rows, ..., d_out)

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)) of task `task`'s update s * B @ A: expert i's B scaled by w_{t,i}."""
        w = self.gate(torch.tensor([task], device=self.E.device))[0]  # (N,)
        n, d_out, r_e = self.B.shape
        B = (self.B * w.view(n, 1, 1)).permute(1, 0, 2).reshape(d_out, n * r_e)
        return self.A.reshape(n * r_e, -1), B


@register
class MoeLoraMethod(Method):
    name, config, shape = "moelora", MoeLoraConfig, "layer"
    category, paper = "multi-task", "arXiv:2310.18339"
    params = "r*(d_in+d_out) + num_tasks*task_embedding_dim + num_experts*task_embedding_dim"
    mergeable = True  # per task: merge() folds default_task's update; merge_for_task() any task's
    linear_only = True
    call_arguments = ("task_ids",)

    def is_mergeable(self, cfg: MoeLoraConfig) -> bool:
        return fallback_task(cfg.num_tasks, cfg.default_task) is not None

    def build_layer(self, base: nn.Module, cfg: MoeLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return MoeLora(base, cfg)

    def attached(self, adapter: AdapterView, cfg: MoeLoraConfig) -> None:
        name_layers(adapter, cfg)


__all__ = ["MoeLora", "MoeLoraConfig", "MoeLoraMethod", "TaskIdError", "TaskRouted", "merge_for_task"]
