"""PeriodicLoRA: a LoRA folded into the base weight every `period` steps and restarted.

PeriodicLoRA (Meng et al. 2024, "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA Optimization",
arXiv:2402.16141). Stage k trains a plain LoRA on top of the stages before it:
    y = (W0 + s * sum_{j<k} B_j @ A_j) x + s * B @ A x          A: (r, d_in)  B: (d_out, r)
and after optimizer steps period, 2 * period, ... (`Method.step`) the stage ends:
    W <- W + s * B @ A;   (A_k, B_k) = (A, B);   A <- kaiming-uniform (gaussian: N(0, 1/r)), B <- 0
and the optimizer state of A and B is dropped. The new A comes from a CPU generator seeded with the
module's name and the step, so every DDP process (and a rerun) restarts with the same A. The fold
changes nothing in the forward; the total update s * [B | B_1 | ... | B_k] @ [A; A_1; ...; A_k]
reaches rank (k+1) r while training holds one rank-r LoRA (the folded factors are buffers: no
gradient, no optimizer state).
The folded factors are kept as LoRA's `A0` / `B0` ("what the base gave up", as for PiSSA, here with
B0 = -[B_1 | ... | B_k]), so `disabled()`, an inactive adapter, `delete` and `detach()` give back the
original base output and weight (up to the float rounding of W0 + d - d), and the adapter is saved as
the plain LoRA of rank (k+1) r against the untouched base: method "lora", loaded by st.load and by HF
PEFT (format="peft") as any LoRA. Merge: W += s * B @ A on top of the folds.
Parameters per module: r * (d_in + d_out) trained; (k+1) * r * (d_in + d_out) in the file after k folds.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.bases import add_to_weight, kind_of
from slimtune.config import check_field
from slimtune.methods.base import AdapterView, LayerAdapter, register
from slimtune.methods.lora import Lora, LoraConfig, LoraMethod


@dataclass
class PeriodicLoraConfig(LoraConfig):
    """PeriodicLoRA: a LoRA folded into the base weight and restarted every `period` optimizer steps.

    Paper: Meng et al. 2024, arXiv:2402.16141. Linear and GPT-2 Conv1D targets. LoraConfig's fields apply
    (r, alpha, dropout, rslora, bias, freeze_A, rank_pattern, alpha_pattern), except init (only "default"
    or "gaussian": A restarts the same way at every fold).

    Args:
        period: optimizer steps per stage; `model.step(step, optimizer)` folds after steps period,
            2 * period, ... (st.Trainer and SlimtuneCallback call it).
    """

    period: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.init in ("default", "gaussian"), self, "init",
                    "'default' or 'gaussian' (PiSSA/OLoRA inits are not implemented for PeriodicLoRA)")
        check_field(isinstance(self.period, int) and not isinstance(self.period, bool) and self.period >= 1, self,
                    "period", "an int >= 1 (optimizer steps per stage), e.g. period=100")


class PeriodicLora(Lora):
    """LoRA on a Linear or GPT-2 Conv1D whose stages are folded into the base (`fold`)."""

    def __init__(self, base: nn.Module, cfg: PeriodicLoraConfig, init: bool = True) -> None:
        super().__init__(base, cfg, init)
        if not kind_of(base).mergeable:
            raise NotImplementedError(f"{type(base).__name__} cannot hold folded weights exactly (its kind is not "
                                      "mergeable); PeriodicLoRA writes every stage into the base weight")
        # the base holds W0 - s B0 @ A0 once folded; empty until the first fold (LowRank's changes_base)
        self.register_buffer("A0", self.A.new_zeros(0, self.A.shape[1]), persistent=False)
        self.register_buffer("B0", self.B.new_zeros(self.B.shape[0], 0), persistent=False)

    @property
    def folds(self) -> int:
        """Stages folded into the base so far."""
        return self.A0.shape[0] // self.r

    @torch.no_grad()
    def fold(self, base: nn.Module, seed: int) -> None:
        """W += s B A; keep (A, B) as a folded stage; restart A (as at init, drawn from `seed`) and B = 0."""
        add_to_weight(base, self.delta_weight(base))
        self.A0 = torch.cat([self.A0, self.A])
        self.B0 = torch.cat([self.B0, -self.B], dim=1)
        self.changes_base = True  # from now on inactive_forward / release give the original base back
        g = torch.Generator().manual_seed(seed)
        A = torch.empty(self.A.shape)  # float32 on the CPU: the same numbers in every process
        if self.init_name == "gaussian":
            nn.init.normal_(A, std=1 / self.r, generator=g)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        self.A.copy_(A)
        self.B.zero_()

    def _original_delta(self) -> Tensor:
        return self.scale * (self.B0 @ self.A0)  # rank folds * r


def lora_of_rank(cfg: LoraConfig, stages: int) -> LoraConfig:
    """The plain LoraConfig of `stages` * r with every module's scale unchanged (alpha / r or alpha / sqrt(r))."""
    lora = LoraConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)})
    if stages == 1:
        return lora
    factor = math.sqrt(stages) if cfg.rslora else float(stages)
    return dataclasses.replace(
        lora, r=stages * cfg.r, alpha=cfg.alpha * factor,
        rank_pattern={k: stages * v for k, v in cfg.rank_pattern.items()} if cfg.rank_pattern else None,
        alpha_pattern={k: v * factor for k, v in cfg.alpha_pattern.items()} if cfg.alpha_pattern else None)


# -- the method ---------------------------------------------------------------------------------------
@register
class PeriodicLoraMethod(LoraMethod):
    name, config = "periodic_lora", PeriodicLoraConfig
    params, paper = "r*(d_in+d_out)", "arXiv:2402.16141"
    peft_type = None  # PEFT has no PeriodicLoRA; the saved file is a PEFT LORA of rank (folds+1)*r
    linear_only = True

    def build_layer(self, base: nn.Module, cfg: PeriodicLoraConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return PeriodicLora(base, cfg, init)

    def step(self, adapter: AdapterView, cfg: PeriodicLoraConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """After every `period`-th optimizer step: fold every layer and drop A's and B's optimizer state."""
        if global_step <= 0 or global_step % cfg.period:
            return
        for name, layer in adapter.layers.items():
            layer.fold(adapter.bases[name], seed=zlib.crc32(f"{name}@{global_step}".encode()))
            if optimizer is not None:
                for p in (layer.A, layer.B):
                    optimizer.state.pop(p, None)

    def saved_config(self, cfg: PeriodicLoraConfig, adapter: AdapterView) -> LoraConfig:
        """The plain LoRA of rank (folds + 1) * r: the live stage and every folded one, against the original base."""
        return lora_of_rank(cfg, _folds(adapter) + 1)

    def describe(self, adapter: AdapterView, cfg: PeriodicLoraConfig) -> str:
        folds = _folds(adapter)
        return f"stages folded into the base: {folds} (saved as a rank-{(folds + 1) * cfg.r} LoRA)"


def _folds(adapter: AdapterView) -> int:
    counts = {layer.folds for layer in adapter.layers.values()}
    if len(counts) > 1:
        raise RuntimeError(f"PeriodicLoRA adapter {adapter.name!r}: its layers were folded different numbers of "
                           f"times ({sorted(counts)}); fold them through model.step() only")
    return counts.pop() if counts else 0


__all__ = ["PeriodicLora", "PeriodicLoraConfig", "PeriodicLoraMethod", "lora_of_rank"]
