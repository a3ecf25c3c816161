"""Multitask prompt tuning (Wang et al. 2023, ICLR, arXiv:2303.02861), as HF PEFT's MULTITASK_PROMPT_TUNING.

    P_k = P* ∘ (U_k V_k)     P*: (p, d) shared;  U_k = prefix_task_cols[k]: (p, r);  V_k = prefix_task_rows[k]: (r, d)
    X'  = [P_{t(x)}; E(x)]   t(x): the row's task id, `model(**batch, task_ids=t)` (one id per row, or one for all)

The paper's rank-one u_k v_kᵀ is r = num_ranks = 1. params: p·d + num_tasks·r·(p + d). The prompt is placed
as prompt tuning places its own (slimtune/methods/prompt_tuning.py), so forward, padding and `generate()`
(`task_ids=` too) behave the same. Not mergeable. A call without task_ids uses `default_task`; None: task 0
when num_tasks == 1, else the call is refused.

Init (PEFT's): U, V ~ N(0, 0.02); P* from "sample_vocab" / "text" / "random" as prompt tuning, or from a source
MPT adapter `init_from` (ours or PEFT's folder, or PEFT's .safetensors state dict): "average_source_tasks"
(P*, and U, V averaged over the source tasks), "exact_source_task" (P*, and task `init_task`'s U, V),
"only_source_shared" (P* only). PEFT requires num_tasks = 1 for the first two; here every task starts from them.
The paper's source stage (distilling P* from per-task teacher prompts) is left to the user's training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.io import read_adapter_dir, read_safetensors
from slimtune.methods.base import PEFT_SHORT_PREFIX, Method, PeftContext, register
from slimtune.methods.prompt_tuning import PromptTuningConfig, SoftPrompt, _initial_prompt, _input_embeddings
from slimtune.methods.prompt_tuning import prompt_learning_fields as _prompt_learning_fields

_PROMPT_INITS = ("sample_vocab", "text", "random")
_SOURCE_INITS = ("average_source_tasks", "exact_source_task", "only_source_shared")
_KEYS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")  # PEFT's tensor names, ours on disk too


@dataclass
class MptConfig(MethodConfig):
    """Multitask prompt tuning.

    Args:
        num_virtual_tokens: p.
        num_tasks: the number of tasks (U_k, V_k pairs).
        num_ranks: r, the rank of each task's multiplicative factor U_k V_k (the paper: 1).
        init: "sample_vocab" | "text" | "random" (P*; U, V random), or from a source MPT adapter:
            "average_source_tasks" | "exact_source_task" | "only_source_shared".
        init_text, tokenizer: as prompt tuning's, for init="text".
        init_from: the source MPT adapter (folder, or PEFT's .safetensors state dict) for the source inits.
        init_task: the source task copied by init="exact_source_task".
        default_task: the task of calls without task_ids; None: 0 when num_tasks == 1, else such calls raise.
    """

    aliases = {**MethodConfig.aliases, "prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text",
               "tokenizer_name_or_path": "tokenizer", "prompt_tuning_init_state_dict_path": "init_from",
               "prompt_tuning_init_task": "init_task"}

    num_virtual_tokens: int = 20
    num_tasks: int = 1
    num_ranks: int = 1
    init: str = "sample_vocab"
    init_text: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    init_task: int = 0
    default_task: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: multitask prompt tuning wraps no module")
        for name in ("num_virtual_tokens", "num_tasks", "num_ranks"):
            check_field(_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "an int >= 1")
        check_field(self.init in (*_PROMPT_INITS, *_SOURCE_INITS), self, "init",
                    "'sample_vocab', 'text', 'random', 'average_source_tasks', 'exact_source_task' or "
                    "'only_source_shared'")
        if self.init_from is not None and not isinstance(self.init_from, str):
            self.init_from = str(self.init_from)  # a Path
        check_field(self.init not in _SOURCE_INITS or bool(self.init_from), self, "init_from",
                    f"the path of a source MPT adapter when init={self.init!r}")
        check_field(_int(self.init_task) and self.init_task >= 0, self, "init_task", "an int >= 0")
        task = self.default_task
        check_field(task is None or (_int(task) and 0 <= task < self.num_tasks), self, "default_task",
                    f"None or a task id in [0, {self.num_tasks - 1}] (num_tasks={self.num_tasks})")
        if self.init == "text":
            PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, init="text", init_text=self.init_text,
                               tokenizer=self.tokenizer)  # the same checks, named by prompt tuning's fields

    def task_when_missing(self) -> int | None:
        """The task id of a call without task_ids, or None (refused)."""
        return self.default_task if self.default_task is not None else (0 if self.num_tasks == 1 else None)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MptPrompt(SoftPrompt):
    """Prompt tuning's soft prompt, per task: P* ∘ (U_k V_k) for the row's task k."""

    def __init__(self, model: nn.Module, cfg: MptConfig, init: bool = True) -> None:
        super().__init__(model, cfg, init=False)  # self.embedding (p, d) is the shared P*
        factory = {"dtype": self.embedding.dtype, "device": self.embedding.device}
        d, r, n = self.embedding.shape[1], cfg.num_ranks, cfg.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.zeros(n, self.p, r, **factory))
        self.prefix_task_rows = nn.Parameter(torch.zeros(n, r, d, **factory))
        self.num_tasks, self.default_task = n, cfg.task_when_missing()
        if init:
            with torch.no_grad():
                self._initialise(model, cfg)

    def _initialise(self, model: nn.Module, cfg: MptConfig) -> None:
        for t in (self.prefix_task_cols, self.prefix_task_rows):  # PEFT: N(0, 0.02), drawn in float32
            t.copy_(torch.normal(0.0, 0.02, size=t.shape))
        if cfg.init in _PROMPT_INITS:
            words = _input_embeddings(model)
            self.embedding.copy_(_initial_prompt(words, PromptTuningConfig(
                num_virtual_tokens=self.p, init=cfg.init, init_text=cfg.init_text, tokenizer=cfg.tokenizer)))
            return
        source = read_mpt_tensors(cfg.init_from)
        _check_source(cfg, source, tuple(self.embedding.shape))
        self.embedding.copy_(source["prompt_embeddings"])
        cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
        if cfg.init == "average_source_tasks":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        elif cfg.init == "exact_source_task":
            cols, rows = cols[cfg.init_task:cfg.init_task + 1], rows[cfg.init_task:cfg.init_task + 1]
        else:  # only_source_shared
            return
        self.prefix_task_cols.copy_(cols.expand_as(self.prefix_task_cols))
        self.prefix_task_rows.copy_(rows.expand_as(self.prefix_task_rows))

    def task_prompt(self, task: int) -> Tensor:
        """P_task (p, d) = P* ∘ (U_task V_task)."""
        return self.embedding * (self.prefix_task_cols[task] @ self.prefix_task_rows[task])

    def prompt_rows(self, embeds: Tensor) -> Tensor:
        t = self._task_ids(embeds.shape[0], self.embedding.device)
        factors = self.prefix_task_cols.index_select(0, t) @ self.prefix_task_rows.index_select(0, t)  # (b, p, d)
        return (self.embedding * factors).to(embeds.dtype)

    def _task_ids(self, batch: int, device: torch.device) -> Tensor:
        """The call's task_ids as a (batch,) long tensor on `device`.

        Raises:
            ValueError: no task_ids where num_tasks > 1 (and no default_task), or ids of another shape or range.
        """
        given = self.call_argument("task_ids")
        if given is None:
            if self.default_task is None:
                raise ValueError(f"multitask prompt tuning with num_tasks={self.num_tasks}: pass task_ids (one task "
                                 "id per row), e.g. model(**batch, task_ids=torch.tensor([0, 2])), or set "
                                 "MptConfig.default_task")
            given = self.default_task
        t = torch.as_tensor(given, device=device).long()
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() != 1 or (t.shape[0] != batch and batch % t.shape[0] != 0):
            raise ValueError(f"task_ids of shape {tuple(t.shape)}: expected one task id per row ({batch} rows)")
        if t.shape[0] != batch:  # generate() repeated each row (beams, num_return_sequences)
            t = t.repeat_interleave(batch // t.shape[0])
        bad = t[(t < 0) | (t >= self.num_tasks)]
        if bad.numel():
            raise ValueError(f"task_ids holds {sorted(set(bad.tolist()))}: expected ids in [0, {self.num_tasks - 1}] "
                             f"(num_tasks={self.num_tasks})")
        return t


def read_mpt_tensors(path: str | Path) -> dict[str, Tensor]:
    """P*, U and V of a saved MPT adapter: a folder (ours or HF PEFT's) or PEFT's .safetensors state dict.

    Raises:
        ConfigError: no such file, or one without the three tensors.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        tensors = read_safetensors(path)
    elif path.is_dir():
        tensors = read_adapter_dir(path)[1]
    else:
        raise ConfigError(f"MptConfig.init_from={str(path)!r}: no adapter folder or .safetensors file there")
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise ConfigError(f"MptConfig.init_from={str(path)!r}: no {missing} tensors; expected a multitask prompt "
                          f"tuning adapter ({', '.join(_KEYS)})")
    return {k: tensors[k] for k in _KEYS}


def _check_source(cfg: MptConfig, source: dict[str, Tensor], shape: tuple[int, int]) -> None:
    (p, d), tasks = shape, source["prefix_task_cols"].shape[0]
    want = {"prompt_embeddings": (p, d), "prefix_task_cols": (tasks, p, cfg.num_ranks),
            "prefix_task_rows": (tasks, cfg.num_ranks, d)}
    got = {k: tuple(v.shape) for k, v in source.items()}
    if got != want:
        raise ConfigError(f"MptConfig.init_from={cfg.init_from!r}: tensors {got}; this config "
                          f"(num_virtual_tokens={p}, num_ranks={cfg.num_ranks}) on this model (d={d}) needs {want}")
    if cfg.init == "exact_source_task" and cfg.init_task >= tasks:
        raise ConfigError(f"MptConfig.init_task={cfg.init_task}: the source has {tasks} task(s), ids 0..{tasks - 1}")


@register
class MptMethod(Method):
    name, config, shape = "mpt", MptConfig, "input"
    category, paper = "additive", "arXiv:2303.02861"
    params = "num_virtual_tokens*d_model + num_tasks*num_ranks*(num_virtual_tokens + d_model)"
    mergeable, peft_type = False, "MULTITASK_PROMPT_TUNING"
    module_prefix = PEFT_SHORT_PREFIX
    call_arguments = ("task_ids",)
    tensor_keys = {"embedding": "prompt_embeddings"}

    def build_input(self, model: nn.Module, cfg: MptConfig, init: bool = True) -> MptPrompt:
        return MptPrompt(model, cfg, init)

    def to_peft(self, cfg: MptConfig, ctx: PeftContext) -> dict[str, Any]:
        text = cfg.init == "text"
        return {
            **_prompt_learning_fields(ctx, "MULTITASK_PROMPT_TUNING", cfg.num_virtual_tokens),
            # PEFT runs its source inits even when loading, so the file's tensors are declared RANDOM-initialised
            "prompt_tuning_init": "TEXT" if text else "RANDOM",
            "prompt_tuning_init_text": cfg.init_text if text else None,
            "tokenizer_name_or_path": cfg.tokenizer if text else None,
            "tokenizer_kwargs": None,
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": 0,
            "num_tasks": cfg.num_tasks,
            "num_ranks": cfg.num_ranks,
        }

    def from_peft(self, data: dict[str, Any]) -> MptConfig:
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise NotImplementedError("multitask prompt tuning of encoder-decoder models "
                                      "(num_transformer_submodules=2) is not implemented")
        return config_from_dict({"method": "mpt", "num_virtual_tokens": int(data["num_virtual_tokens"]),
                                 "num_tasks": int(data.get("num_tasks") or 1),
                                 "num_ranks": int(data.get("num_ranks") or 1), "init": "random",
                                 "modules_to_save": data.get("modules_to_save")})


__all__ = ["MptConfig", "MptMethod", "MptPrompt", "read_mpt_tensors"]
