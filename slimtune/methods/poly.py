"""Polytropon (Poly) and Multi-Head Routing (MHR): a per-task mixture over an inventory of LoRA skills.

Polytropon: Ponti et al. 2022, "Combining Modular Skills in Multitask Learning", arXiv:2202.13914. MHR: Caccia et
al. 2022, "Multi-Head Adapter Routing for Cross-Task Generalization", arXiv:2211.03831. HF PEFT's `POLY` type.

Each module holds n_skills LoRA skills, each cut into n_splits heads along d_in (for A) and d_out (for B), and a
routing matrix Z (n_tasks, n_splits * n_skills) of logits: task t mixes the skills per head q with weights
    w_{t,q,s} = z_{t,q,s} / (sum_s' z_{t,q,s'} + 1e-12)     z = sigmoid(Z[t, q, s])            (eval)
                                                            z ~ RelaxedBernoulli(T=1, logits=Z[t, q, s])  (training)
    A_t[q] = sum_s w_{t,q,s} A[q, s]      A: (n_splits, n_skills, d_in / n_splits, r)
    B_t[q] = sum_s w_{t,q,s} B[q, s]      B: (n_splits, n_skills, r, d_out / n_splits)
    y = base(x) + x @ A_t @ B_t / r       A_t = [A_t[0]; ...] (d_in, r),  B_t = [B_t[0] | ...] (r, d_out)
n_splits = 1 is Polytropon, n_splits > 1 MHR. The relaxed Bernoulli sample (a Gumbel-sigmoid) is
torch.distributions.RelaxedBernoulli's, drawn as PEFT 0.21 draws it, so training-mode outputs equal PEFT's under
one seed. Tensors are in PEFT's layout and names (`poly_lora_A`, `poly_lora_B`, `poly_router.module_logits`).
Init (PEFT's): A[q, s] kaiming-uniform on (r, d_in / n_splits) (U(+-1/sqrt(d_in / n_splits))), B = 0, Z ~ U(+-1e-3).
Per task the update is a rank-r LoRA (A_t.T, B_t.T, scale 1/r): `merge_for_task` (moelora.py) adds it as a plain
LoRA adapter; `merge()` folds in the default task's. The reference code (mttl) trains the logits at their own,
larger learning rate (0.1 against 1e-3): `param_groups(model, lr)`. Params per module:
n_skills*r*(d_in+d_out) + n_tasks*n_splits*n_skills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from slimtune.bases import sizes
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import AdapterView, LayerAdapter, Method, PeftContext, factory, peft_target_fields, register
from slimtune.methods.moelora import TaskRouted, _is_int, check_task_fields, fallback_task, merge_for_task, name_layers

EPS = 1e-12  # PEFT's, in the normalisation of the mixing weights


@dataclass
class PolyConfig(MethodConfig):
    """Polytropon / MHR (HF PEFT's POLY): per-task learned mixtures of n_skills LoRA skills, per head.

    Args:
        r: rank of each skill.
        n_tasks: task ids run from 0 to n_tasks - 1.
        n_skills: LoRA skills per module.
        n_splits: heads per skill (1: Polytropon; > 1: MHR); must divide every target's d_in and d_out.
        poly_type: "poly", the one router PEFT has.
        default_task: the task of calls without `task_ids` (and the task `merge()` folds in); None: such calls
            are refused, unless n_tasks == 1.
    """

    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    poly_type: str = "poly"
    default_task: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "n_skills", "n_splits"):
            check_field(_is_int(getattr(self, name)) and getattr(self, name) >= 1, self, name, "an int >= 1")
        check_field(self.poly_type == "poly", self, "poly_type", "'poly' (PEFT's only router)")
        check_task_fields(self, "n_tasks")


class Poly(TaskRouted):
    """Skills A (n_splits, n_skills, d_in/n_splits, r), B (n_splits, n_skills, r, d_out/n_splits) and the routing
    logits (n_tasks, n_splits * n_skills) of one module."""

    peft_keys = {"A": "poly_lora_A", "B": "poly_lora_B", "logits": "poly_router.module_logits"}

    def __init__(self, base: nn.Module, cfg: PolyConfig) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        q, s, r = cfg.n_splits, cfg.n_skills, cfg.r
        if d_in % q or d_out % q:
            raise ValueError(f"PolyConfig.n_splits={q}: expected a divisor of both d_in={d_in} and d_out={d_out}")
        kw = factory(base)
        self.num_tasks, self.default_task = cfg.n_tasks, cfg.default_task
        self.lora_rank, self.lora_alpha = r, 1.0  # delta = B_t.T @ A_t.T / r
        bound = 1 / math.sqrt(d_in // q)  # kaiming-uniform (a=sqrt(5)) on each (r, d_in / n_splits) head
        self.A = nn.Parameter(torch.empty(q, s, d_in // q, r, **kw).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(q, s, r, d_out // q, **kw))
        self.logits = nn.Parameter(torch.empty(cfg.n_tasks, q * s, **kw).uniform_(-1e-3, 1e-3))

    def mixing(self, tasks: Tensor, sample: bool) -> Tensor:
        """(rows, n_splits, n_skills) weights of each row's task; `sample`: relaxed Bernoulli, else sigmoid."""
        q, s = self.A.shape[:2]
        z = self.logits.index_select(0, tasks).view(-1, q, s)
        z = RelaxedBernoulli(1.0, logits=z, validate_args=False).rsample() if sample else torch.sigmoid(z)
        return z / (z.sum(dim=-1, keepdim=True) + EPS)

    def factors(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row A_t (rows, d_in, r) and B_t (rows, r, d_out) for weights w (rows, n_splits, n_skills)."""
        rows, (q, _, d, r) = w.shape[0], self.A.shape
        d_out = q * self.B.shape[-1]
        A = torch.einsum("bqs,qsdr->bqdr", w, self.A).reshape(rows, q * d, r)  # head q: inputs [q*d, (q+1)*d)
        B = torch.einsum("bqs,qsrd->bqrd", w, self.B).transpose(1, 2).reshape(rows, r, d_out)
        return A, B

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        rows, r = x.shape[0], self.A.shape[-1]
        A, B = self.factors(self.mixing(self.task_ids(rows, self.logits.device), sample=self.training))
        h = x.reshape(rows, -1, x.shape[-1]).to(A.dtype)  # (rows, tokens, d_in)
        return base_out + ((h @ A @ B) / r).reshape(base_out.shape).to(base_out.dtype)

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)) of task `task`'s update (eval-mode mixing), delta_W = B @ A / r."""
        A, B = self.factors(self.mixing(torch.tensor([task], device=self.logits.device), sample=False))
        return A[0].T, B[0].T


def param_groups(model: nn.Module, lr: float, logits_lr: float = 0.1, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups for a model with Poly adapters: the routing logits at their own rate, without weight
    decay (the reference code, mttl: module_logits_learning_rate=0.1 against lr=1e-3), everything else at `lr`.
    Pass them to any torch optimizer: `torch.optim.AdamW(param_groups(model, 1e-3))`."""
    named = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        (n, p) for n, p in model.named_parameters() if p.requires_grad]
    logits = [p for n, p in named if n.endswith(".logits") and ".adapters." in n]
    rest = [p for n, p in named if not (n.endswith(".logits") and ".adapters." in n)]
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
            {"params": logits, "lr": logits_lr, "weight_decay": 0.0}]


@register
class PolyMethod(Method):
    name, config, shape = "poly", PolyConfig, "layer"
    category, paper = "multi-task", "arXiv:2202.13914 (Polytropon), arXiv:2211.03831 (MHR)"
    params = "n_skills*r*(d_in+d_out) + n_tasks*n_splits*n_skills"
    mergeable, peft_type = True, "POLY"  # per task: merge() folds default_task's update; merge_for_task() any task's
    linear_only = True
    call_arguments = ("task_ids",)

    def is_mergeable(self, cfg: PolyConfig) -> bool:
        return fallback_task(cfg.n_tasks, cfg.default_task) is not None

    def build_layer(self, base: nn.Module, cfg: PolyConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return Poly(base, cfg)

    def attached(self, adapter: AdapterView, cfg: PolyConfig) -> None:
        name_layers(adapter, cfg)

    def to_peft(self, cfg: PolyConfig, ctx: PeftContext) -> dict[str, Any]:
        """PEFT 0.21's PolyConfig fields. PEFT's Poly wraps nn.Linear only and has no default task (its calls
        always need task_ids): `default_task` is not written."""
        others = sorted(ctx.target_kinds - {"linear"})
        if others:
            raise NotImplementedError(f"format='peft' for poly on {', '.join(others)} modules: HF PEFT's POLY wraps "
                                      "torch.nn.Linear only; save in slimtune's format")
        return {
            **ctx.common("POLY"),
            "auto_mapping": None,
            "r": cfg.r,
            "target_modules": ctx.target_modules,
            "exclude_modules": None,
            "modules_to_save": ctx.modules_to_save,
            "init_weights": True,
            "poly_type": cfg.poly_type,
            "n_tasks": cfg.n_tasks,
            "n_skills": cfg.n_skills,
            "n_splits": cfg.n_splits,
        }

    def from_peft(self, data: dict[str, Any]) -> PolyConfig:
        """Our config for an HF PEFT POLY adapter_config.json (`init_weights` is irrelevant: tensors come from
        the file)."""
        return config_from_dict({
            "method": "poly",
            "r": int(data.get("r", 8)),
            "n_tasks": int(data.get("n_tasks", 1)),
            "n_skills": int(data.get("n_skills", 4)),
            "n_splits": int(data.get("n_splits", 1)),
            "poly_type": data.get("poly_type", "poly"),
            **peft_target_fields(data),
        })


__all__ = ["Poly", "PolyConfig", "PolyMethod", "merge_for_task", "param_groups"]
