"""DyLoRA: one LoRA trained for every rank at once, cut to any rank after training.

DyLoRA (Valipour et al. 2023, EACL, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", arXiv:2210.07558):
    y = base(x) + (alpha / b) * drop(x) @ A[:b].T @ B[:, :b].T      A: (r, d_in)  B: (d_out, r)
In training, every optimizer step uses one truncation rank b ~ U{r_min, ..., r}, the same b for all
layers of the adapter; b for step t is drawn from a torch.Generator seeded with (seed, t), so a run (and
a resumed run, and every DDP process) sees the same ranks. In eval, b = eval_rank (default r).
With rslora the scale is alpha / sqrt(b). "Frozen" variant (`frozen_lower`): only row b of A and
column b of B receive gradients in a step.
Init as LoRA (A kaiming-uniform, B = 0): identity at start. Merge: W += (alpha / b) B[:, :b] A[:b]
at the eval rank. Parameters per module: r * (d_in + d_out).
After training, the adapter at rank k <= r is the plain LoRA (A[:k], B[:, :k], alpha / k):
`st.load(base, path, rank=k)` and `slimtune export ADAPTER --rank k --format peft` cut it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import check_field
from slimtune.errors import ConfigError
from slimtune.methods.base import AdapterView, LayerAdapter, PeftContext, register
from slimtune.methods.lora import Lora, LoraConfig, LoraMethod

_A_KEY, _B_KEY = ".lora_A.weight", ".lora_B.weight"  # on-disk suffixes (Lora.peft_keys)


@dataclass
class DyLoraConfig(LoraConfig):
    """DyLoRA: a LoRA of rank r trained so that every leading rank b in [r_min, r] works on its own.

    Paper: Valipour et al. 2023, arXiv:2210.07558. Linear and GPT-2 Conv1D targets. LoraConfig's fields
    apply (r, alpha, dropout, rslora, bias, freeze_A, alpha_pattern), except init (only "default" or
    "gaussian") and rank_pattern (one nested range for all modules).

    Args:
        r_min: smallest rank sampled in training (ranks below it are never trained on their own).
        eval_rank: the rank used in eval mode and merges; None: r. Change it in memory with
            `model.shared[name].eval_rank = k`.
        seed: seed of the rank sampler; b for step t is a pure function of (seed, t).
        frozen_lower: the paper's "frozen" variant: in each step only row b of A / column b of B learn.
    """

    r_min: int = 1
    eval_rank: int | None = None
    seed: int = 0
    frozen_lower: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.init in ("default", "gaussian"), self, "init",
                    "'default' or 'gaussian' (PiSSA/OLoRA inits are not nested)")
        check_field(self.rank_pattern is None, self, "rank_pattern",
                    "None (DyLoRA trains one nested range of ranks, r_min..r, for every module)")
        check_field(_is_int(self.r_min) and 1 <= self.r_min <= self.r, self, "r_min",
                    f"an int in [1, r={self.r}], e.g. r_min=1")
        check_field(self.eval_rank is None or (_is_int(self.eval_rank) and self.r_min <= self.eval_rank <= self.r),
                    self, "eval_rank", f"None (= r) or an int in [r_min={self.r_min}, r={self.r}]")
        check_field(_is_int(self.seed) and self.seed >= 0, self, "seed", "an int >= 0, e.g. seed=0")
        check_field(isinstance(self.frozen_lower, bool), self, "frozen_lower", "True or False")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_rank(seed: int, step: int, r_min: int, r: int) -> int:
    """The truncation rank of training step `step`: uniform on [r_min, r], a pure function of (seed, step)."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(r_min, r + 1, (1,), generator=generator))


class DyLoraRanks(nn.Module):
    """The ranks one adapter uses now, shared by all its layers: `rank` in training, `eval_rank` in eval.

    Holds no tensors (nothing is saved); `Method.step` draws the next `rank`.
    """

    def __init__(self, cfg: DyLoraConfig) -> None:
        super().__init__()
        self.r, self.r_min, self.seed = cfg.r, cfg.r_min, cfg.seed
        self.rank = sample_rank(cfg.seed, 0, cfg.r_min, cfg.r)  # used until the first optimizer step
        self._eval_rank = cfg.eval_rank or cfg.r

    @property
    def eval_rank(self) -> int:
        return self._eval_rank

    @eval_rank.setter
    def eval_rank(self, k: int) -> None:
        if not _is_int(k) or not self.r_min <= k <= self.r:
            raise ConfigError(f"eval_rank={k!r}: expected an int in [r_min={self.r_min}, r={self.r}]")
        self._eval_rank = k

    def sample(self, step: int) -> int:
        self.rank = sample_rank(self.seed, step, self.r_min, self.r)
        return self.rank

    def extra_repr(self) -> str:
        return f"r={self.r}, r_min={self.r_min}, rank={self.rank}, eval_rank={self.eval_rank}"


class DyLora(Lora):
    """DyLoRA on a Linear or GPT-2 Conv1D: LoRA cut to the adapter's current rank b, scale alpha / b."""

    def __init__(self, base: nn.Module, cfg: DyLoraConfig, ranks: DyLoraRanks, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        self._ranks = [ranks]  # a plain reference: the ranks belong to the adapter, not to each layer
        self.alpha, self.rslora, self.frozen_lower = cfg.alpha, cfg.rslora, cfg.frozen_lower
        self._merged_rank: int | None = None

    @property
    def rank(self) -> int:
        """The rank forward uses now: the sampled one in training, the eval rank otherwise."""
        ranks = self._ranks[0]
        return ranks.rank if self.training else ranks.eval_rank

    def scale_at(self, b: int) -> float:
        return self.alpha / (math.sqrt(b) if self.rslora else b)

    def factors(self, b: int | None = None) -> tuple[Tensor, Tensor, float]:
        b = self.rank if b is None else b
        A, B = self.A[:b], self.B[:, :b]  # (b, d_in), (d_out, b): views, gradients reach the first b only
        if self.frozen_lower and self.training and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]])
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B, self.scale_at(b)

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B, s = self.factors(self._merged_rank or self._ranks[0].eval_rank)
        return s * (B @ A)

    def merge(self, base: nn.Module) -> None:
        self._merged_rank = self._ranks[0].eval_rank  # unmerge subtracts the same rank's delta
        super().merge(base)

    def unmerge(self, base: nn.Module) -> None:
        super().unmerge(base)
        self._merged_rank = None

    @property
    def route_key(self) -> None:
        return None  # eval_rank can change without a tensor changing: no cached stacks; row group by row group


# -- the method ---------------------------------------------------------------------------------------
@register
class DyLoraMethod(LoraMethod):
    name, config = "dylora", DyLoraConfig
    params, paper = "r*(d_in+d_out)", "arXiv:2210.07558"
    peft_type = None  # PEFT has no DyLoRA; format="peft" writes the plain LoRA at the current rank
    linear_only = True

    def build_shared(self, model: nn.Module, cfg: DyLoraConfig, targets: list[str], init: bool = True
                     ) -> DyLoraRanks:
        return DyLoraRanks(cfg)

    def build_layer(self, base: nn.Module, cfg: DyLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        if not isinstance(shared, DyLoraRanks):
            raise ValueError("DyLoRA layers need the adapter's shared ranks (Method.build_shared)")
        return DyLora(base, cfg, shared, init)

    def step(self, adapter: AdapterView, cfg: DyLoraConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """Draw the truncation rank of the next step."""
        adapter.shared.sample(global_step)

    def saved_config(self, cfg: DyLoraConfig, adapter: AdapterView) -> DyLoraConfig:
        """The file keeps all r ranks; it records the eval rank set in memory."""
        k = adapter.shared.eval_rank
        return cfg.replace(eval_rank=None if k == cfg.r else k)

    def choose_rank(self, cfg: DyLoraConfig, tensors: dict[str, Tensor], rank: int
                    ) -> tuple[DyLoraConfig, dict[str, Tensor]]:
        """Rows [:rank] of every A, columns [:rank] of every B; the config of the same adapter at r=rank."""
        if not (_is_int(rank) and cfg.r_min <= rank <= cfg.r):
            raise ConfigError(f"rank={rank!r}: this DyLoRA adapter holds ranks r_min={cfg.r_min}..r={cfg.r}; expected "
                              "an int in that range (ranks above r do not exist, ranks below r_min were never "
                              "trained on their own)")
        cut = {}
        for key, t in tensors.items():
            if key.endswith(_A_KEY):
                t = t[:rank].contiguous()
            elif key.endswith(_B_KEY):
                t = t[:, :rank].contiguous()
            cut[key] = t
        return cfg.replace(r=rank, eval_rank=None), cut

    def describe(self, adapter: AdapterView, cfg: DyLoraConfig) -> str:
        ranks = adapter.shared
        return f"nested ranks {ranks.r_min}..{ranks.r}: training rank now {ranks.rank}, eval rank {ranks.eval_rank}"

    def to_peft(self, cfg: DyLoraConfig, ctx: PeftContext) -> dict[str, Any]:
        """A PEFT LORA config: DyLoRA at its full rank r is a LoRA with scale alpha / r (alpha / sqrt(r))."""
        if cfg.eval_rank not in (None, cfg.r):
            raise NotImplementedError(
                f"format='peft' with eval_rank={cfg.eval_rank} < r={cfg.r}: a PEFT file holds one rank; cut the "
                f"adapter first: st.load(base, path, rank={cfg.eval_rank}).save(out, format='peft') or "
                f"`slimtune export ADAPTER --rank {cfg.eval_rank} --format peft --out DIR`")
        return super().to_peft(cfg, ctx)


__all__ = ["DyLora", "DyLoraConfig", "DyLoraMethod", "DyLoraRanks", "sample_rank"]
