"""LT-SFT, Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022, arXiv:2110.07560): a sparse difference
from the base whose entries are the ones full fine-tuning moves most; such differences compose.

    phase 1: theta_0 -> theta_1, the chosen tensors fine-tuned in full (a dense selection)
    mask = top-k entries of |theta_1 - theta_0|,  k = density * (entries of the chosen tensors), all together
    phase 2: reset to theta_0, train only the masked entries -> theta_0 + phi        params = k
    composition: theta_0 + phi_a + phi_b (two LT-SFT adapters active together: the engine adds their deltas;
                 the paper's language SFT + task SFT)

Two phases, one adapter name (as diff pruning):

1. `LtSftConfig()`: every chosen tensor trains in full (`targets` / `exclude` / `layers` pick them as for
   FishMask; default: every base tensor except tied embeddings and `modules_to_save`). Memory: one copy of
   the chosen tensors beside the untouched base, plus their optimizer state.
2. `select_winners(model)`: keeps exactly k entries (global top-k of |theta_1 - theta_0|, ties in model
   order) and replaces the adapter, in place and under the same name and active set, by the sparse adapter
   of those entries reset to theta_0 (`LtSftConfig(phase=2)`). Re-train it with a new optimizer: only the
   k entries train, the file holds `<tensor>.sparse_index` + `.sparse_values`, merge / unmerge / disable are
   exact. A `modules_to_save` head keeps its phase-1 values (only the selected tensors reset).

    model = st.attach(base, LtSftConfig(density=0.05))
    train(model, steps=phase1_steps)      # full fine-tuning of the chosen tensors
    select_winners(model)                 # the k most-changed entries, back at theta_0
    train(model, steps=phase2_steps)      # a new optimizer over model.trainable_parameters()
    model.save("adapter")                 # loads as the sparse phase-2 adapter

Not covered: the paper's optional L1 pull of phi towards 0 (a regulariser would need the base tensors,
which `AdapterView` does not hand to a method), and its per-epoch schedules (a training-loop matter).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from slimtune.adapter_files import canonical
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.layer import base_name
from slimtune.methods._selective import budget, chosen_tensors, density_line, is_fraction, top_k_masks
from slimtune.methods.base import AdapterView, Method, PeftContext, Selection, register

if TYPE_CHECKING:
    from slimtune.tuned import TunedModel


@dataclass
class LtSftConfig(MethodConfig):
    """LT-SFT (module docstring). `targets` / `exclude` / `layers` pick the tensors (see methods/_selective.py)."""

    density: float = 0.05  # fraction of the chosen entries select_winners() keeps (the paper: a few percent)
    phase: int = 1  # 1: the chosen tensors train in full; 2 (set by select_winners): the sparse winners

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(is_fraction(self.density), self, "density", "a fraction in (0, 1], e.g. 0.05")
        check_field(self.phase in (1, 2) and not isinstance(self.phase, bool), self, "phase",
                    "1 (full fine-tuning of the chosen tensors) or 2 (the sparse winners, set by select_winners)")


@register
class LtSftMethod(Method):
    name, config, shape = "lt_sft", LtSftConfig, "selective"
    category, params, paper = "selective", "phase 1: entries of the chosen tensors; phase 2: density * that", \
        "arXiv:2110.07560"
    mergeable = True

    def select(self, model: nn.Module, cfg: LtSftConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        names = chosen_tensors(model, cfg)
        if cfg.phase == 1:
            return [Selection(n) for n in names]
        if init:
            raise ConfigError("LtSftConfig(phase=2) is the sparse phase, whose entries come from "
                              "lt_sft.select_winners(model) or a saved adapter; attach LtSftConfig() to train "
                              "phase 1 first")
        return [Selection(n, sparse=True) for n in names]

    def describe(self, adapter: AdapterView, cfg: LtSftConfig) -> str:
        if cfg.phase == 2:
            return "phase 2 (sparse winners): " + density_line(adapter.selections)
        n = sum(e.values.numel() for e in adapter.selections.values())
        return (f"phase 1 (dense): {n:,} entries of {len(adapter.selections)} tensors; "
                f"select_winners() keeps {budget(cfg.density, n):,}")

    def to_peft(self, cfg: LtSftConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError("format='peft' for lt_sft: HF PEFT has no sparse fine-tuning; save in slimtune's "
                                  "format (or merge it: slimtune merge)")


def winner_tensors(model: TunedModel, name: str, density: float) -> dict[str, Tensor]:
    """`<tensor>.sparse_index` / `.sparse_values` of phase-1 adapter `name`'s winners: the k largest
    |theta_1 - theta_0| over all its tensors (k = budget(density, entries)), their values back at theta_0."""
    params, selections = dict(model.model.named_parameters()), model.view(name).selections
    with torch.no_grad():
        bases = {key: params[key].detach() for key in selections}
        moved = {key: (e.values.detach().to(bases[key].dtype) - bases[key]).abs().float()
                 for key, e in selections.items()}
        masks = top_k_masks(moved, density, "global")
        out = {}
        for key, mask in masks.items():
            index = mask.reshape(-1).nonzero().squeeze(1)
            out[f"{base_name(key)}.sparse_index"] = index
            out[f"{base_name(key)}.sparse_values"] = bases[key].reshape(-1)[index].clone()  # reset to theta_0
    return out


def select_winners(model: TunedModel, density: float | None = None, name: str = "default") -> TunedModel:
    """Keep the `density` (default: the config's) most-changed entries of phase-1 adapter `name` and turn it,
    in place, into the sparse phase-2 adapter of those entries reset to theta_0 (same name, same active set).
    Train it with a new optimizer: the phase-1 parameters are gone.

    Raises:
        ConfigError: `name` is not an LT-SFT adapter in phase 1, or `density` is not a fraction in (0, 1].
        RuntimeError: the adapter is merged (unmerge first); the model is left as it was.
    """
    cfg = model.configs.get(name)
    if not isinstance(cfg, LtSftConfig) or cfg.phase != 1:
        state = "one in phase 2" if isinstance(cfg, LtSftConfig) else f"a {type(cfg).__name__} adapter"
        raise ConfigError(f"select_winners(model, name={name!r}): expected an LT-SFT adapter in phase 1, got {state}")
    new = cfg.replace(phase=2, density=cfg.density if density is None else density)  # validates density
    tensors = winner_tensors(model, name, new.density)
    selected = {canonical(k) for k in model.view(name).selections}
    tensors.update({k: v for k, v in model.adapter_state_dict(name).items() if canonical(k) not in selected})  # heads
    active = model.active
    model.delete(name)
    model.add(new, name, init=False)
    model.load_adapter_state_dict(tensors, name)
    if active:
        model.use(active)
    return model


__all__ = ["LtSftConfig", "LtSftMethod", "select_winners", "winner_tensors"]
