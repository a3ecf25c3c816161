"""Checks the selective-method tests share: AdamW training, what the owner modules compute with,
bitwise comparisons of every entry outside the tuned ones, file sizes."""

from __future__ import annotations

from pathlib import Path

import torch

import slimtune as st
from slimtune.io import WEIGHTS_NAME, read_safetensors
from slimtune.layer import is_adapter_tensor


def lm_batches(ids: torch.Tensor, n: int = 2) -> list[dict]:
    """Causal-LM calibration batches (labels = inputs) cut from `ids`."""
    return [{"input_ids": part, "labels": part} for part in ids.chunk(n)]


def train(model: st.TunedModel, ids: torch.Tensor, steps: int = 4, lr: float = 1e-2, weight_decay: float = 0.5,
          labels: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """AdamW steps on one batch through the documented loop (regulariser added, model.step called)."""
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr, weight_decay=weight_decay)
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
        extra = model.regularization_loss()
        (loss if extra is None else loss + extra).backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
    model.eval()
    return opt


def effective(model: st.TunedModel, name: str) -> torch.Tensor:
    """The tensor base parameter `name` has as the owner module computes with it now."""
    module, _, attr = name.rpartition(".")
    return getattr(model.model.get_submodule(module), attr).detach().clone()


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_only_entries_changed(model: st.TunedModel, before: dict[str, torch.Tensor],
                                masks: dict[str, torch.Tensor | None]) -> None:
    """Tensors in `masks` differ from `before` only where the mask is True (None: anywhere), and every
    other base tensor is bit for bit as before; so is every stored base tensor (state_dict)."""
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before[key]), f"stored base tensor {key} changed"
    for name, _ in model.model.named_parameters():
        if is_adapter_tensor(name):
            continue
        W, W0 = effective(model, name), before[name]
        mask = masks.get(name, False)
        if mask is False:
            assert torch.equal(W, W0), f"{name} changed but is not tuned"
        elif mask is not None:
            assert torch.equal(W[~mask], W0[~mask]), f"{name} changed outside its mask"


def saved(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(path) / WEIGHTS_NAME)


def file_size(path: Path) -> int:
    return (Path(path) / WEIGHTS_NAME).stat().st_size


def masks_of(model: st.TunedModel, name: str = "default") -> dict[str, torch.Tensor | None]:
    """Base tensor name -> bool mask of the entries adapter `name` tunes (None: the whole tensor)."""
    out = {}
    params = dict(model.model.named_parameters())
    for tensor, entries in model.view(name).selections.items():
        if entries.index is None:
            out[tensor] = None
        else:
            mask = torch.zeros(params[tensor].numel(), dtype=torch.bool)
            mask[entries.index] = True
            out[tensor] = mask.view_as(params[tensor])
    return out


def train_run(tmp_path: Path, method: dict, steps: int = 3) -> dict:
    """`slimtune train` on a tiny Llama and a tiny causal-LM file (2 calibration batches of 4)."""
    from test_train_fixtures import text_rows, tiny_llama_dir, write_jsonl

    from slimtune.train import train as run

    tiny_llama_dir(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", text_rows(24))
    return run({"model": {"name": str(tmp_path / "llama")}, "method": method,
                "data": {"task": "causal_lm", "train": str(tmp_path / "lm.jsonl"), "max_length": 32, "eval_size": 4},
                "train": {"max_steps": steps, "batch_size": 4, "calibration_batches": 2, "lr": 1e-3,
                          "progress": False, "eval_before": False},
                "output_dir": str(tmp_path / "run")})
