"""HF Trainer integration: run slimtune's per-step method hooks from `transformers.Trainer`.

    trainer = transformers.Trainer(model=tuned, ..., callbacks=[SlimtuneCallback()])

`TunedModel.step(global_step, optimizer)` runs after every optimizer step and before the gradients are
zeroed (AdaLoRA's importance reads them): rank budgets, SoRA's proximal update, PeriodicLoRA's merges.
Methods with a regulariser need it in the loss:
`loss = outputs.loss + model.regularization_loss()` in a `compute_loss` override.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class SlimtuneCallback(TrainerCallback):
    """Calls `model.step(step, optimizer)` after every optimizer step, before the gradients are zeroed.

    HF Trainer raises `state.global_step` only after this event, so the step passed is global_step + 1
    (the number of optimizer steps taken), as st.Trainer passes it.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          **kwargs: Any) -> None:
        tuned = getattr(model, "module", model)  # DDP / accelerate wrappers
        step = getattr(tuned, "step", None)
        if callable(step):
            step(state.global_step + 1, optimizer)
