"""PASTA (Yang et al. 2023, "Parameter-Efficient Tuning with Special Token Adaptation", EACL, arXiv:2210.04382):
trainable vectors added to the hidden states of special tokens at the input of every transformer block.

    block l's input:  h_t <- h_t + e^l_k     for every position t whose token id is special id k
    E: (L, n_special, d) trainable, the base frozen;  params = L * n_special * d

Special ids are the config's `token_ids` (default: the model config's cls / sep / bos / eos ids); one vector per
id and layer, shared by every occurrence of that id. A forward hook on the input embedding records which
positions hold special ids on every model call (so generation with a KV cache sees each new token), and a
forward pre-hook on each block (the model's list of L blocks: Llama `model.layers`, GPT-2 `transformer.h`, BERT
`bert.encoder.layer`) adds the vectors; both act only while a TunedModel call runs. Init: E = 0 (exactly the
base at init; `init_std` > 0 draws N(0, init_std)). Not mergeable: the change is position-specific.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.methods.base import InputAdapter, Method, register
from slimtune.methods.prompt_tuning import _first, _input_embeddings, _text_config

_SPECIAL = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")


@dataclass
class PastaConfig(MethodConfig):
    """PASTA: a trainable vector per special token id and block, added to that token's block input.

    Args:
        token_ids: the special token ids ([CLS], [SEP], ...: `tokenizer.cls_token_id` etc.); None: the ids the
            model config names (cls, sep, bos, eos).
        init_std: standard deviation of the initial vectors; 0 (default) starts exactly at the base.
    """

    token_ids: list[int] | None = None
    init_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: PASTA adapts every block's special tokens")
        if isinstance(self.token_ids, tuple):
            self.token_ids = list(self.token_ids)
        ids = self.token_ids
        check_field(ids is None or (isinstance(ids, list) and len(ids) > 0 and len(set(ids)) == len(ids) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)), self, "token_ids",
            "None or a non-empty list of distinct token ids >= 0, e.g. [101, 102]")
        check_field(isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool)
                    and self.init_std >= 0, self, "init_std", "a number >= 0")


def special_ids(model: nn.Module, cfg: PastaConfig) -> list[int]:
    """`cfg.token_ids`, or the special ids the model config names."""
    if cfg.token_ids is not None:
        return list(cfg.token_ids)
    config, ids = _text_config(model), []
    for name in _SPECIAL:
        value = getattr(config, name, None)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if not ids:
        raise ConfigError(f"PastaConfig.token_ids=None: {type(config).__name__} names no special token ids "
                          f"({', '.join(_SPECIAL)}); expected token_ids, e.g. [tokenizer.cls_token_id, "
                          "tokenizer.sep_token_id]")
    return ids


def blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks: the first ModuleList holding as many modules as it has layers."""
    n = _first(_text_config(model), "num_hidden_layers", "n_layer")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n:
            return [f"{name}.{i}" for i in range(n)]
    raise NotImplementedError(f"PASTA needs the model's list of transformer blocks; {type(model).__name__} has no "
                              f"ModuleList of {n} modules (config num_hidden_layers / n_layer)")


class SpecialTokenVectors(InputAdapter):
    """E (L, n_special, d), added to special-token positions at every block's input during a TunedModel call."""

    def __init__(self, model: nn.Module, cfg: PastaConfig, init: bool = True) -> None:
        super().__init__()
        words = _input_embeddings(model)
        self._blocks = blocks(model)
        ids = special_ids(model, cfg)
        if max(ids) >= words.num_embeddings:
            raise ConfigError(f"PastaConfig.token_ids={ids}: id {max(ids)} is outside the vocabulary "
                              f"({words.num_embeddings} tokens)")
        self.register_buffer("ids", torch.tensor(ids, device=words.weight.device), persistent=False)
        dtype = words.weight.dtype if words.weight.dtype.is_floating_point else torch.float32
        self.vectors = nn.Parameter(torch.zeros(len(self._blocks), len(ids), words.embedding_dim, dtype=dtype,
                                                device=words.weight.device))
        if init and cfg.init_std > 0:
            with torch.no_grad():
                self.vectors.normal_(0.0, cfg.init_std)
        self._armed, self._rows = False, None
        self._where: Tensor | None = None  # (batch, seq, n_special) one-hot of the special ids of this forward
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        self._handles = [_input_embeddings(model).register_forward_hook(self._record)]
        for layer, name in enumerate(self._blocks):
            block = model.get_submodule(name)
            first = next(iter(inspect.signature(block.forward).parameters))
            hook = lambda m, a, k, i=layer, n=first: self._add(i, n, a, k)  # noqa: E731
            self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        if kwargs.get("input_ids") is None:
            raise NotImplementedError("PASTA finds special tokens by their ids: call the model with input_ids "
                                      "(not inputs_embeds)")
        self._armed, self._rows = True, rows
        return kwargs

    def end_call(self) -> None:
        self._armed, self._rows, self._where = False, None, None

    # -- hooks ---------------------------------------------------------------------------------------------
    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._armed and args and args[0].dim() == 2:
            where = (args[0].unsqueeze(-1) == self.ids).to(self.vectors.dtype)  # (batch, seq, n_special)
            if self._rows is not None:
                where = where * self._rows.to(where.device, where.dtype).view(-1, 1, 1)
            self._where = where

    def _add(self, layer: int, first: str, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not self._armed or self._where is None:
            return None
        hidden = args[0] if args else kwargs[first]
        if hidden.shape[:2] != self._where.shape[:2]:
            raise NotImplementedError(f"PASTA: block {layer} gets hidden states {tuple(hidden.shape)} but the "
                                      f"token ids of this call are {tuple(self._where.shape[:2])}")
        hidden = hidden + (self._where @ self.vectors[layer]).to(hidden.dtype)  # (batch, seq, d)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, first: hidden})


@register
class PastaMethod(Method):
    name, config, shape = "pasta", PastaConfig, "input"
    category, paper = "additive", "arXiv:2210.04382"
    params = "num_layers*n_special*d_model"
    mergeable = False

    def build_input(self, model: nn.Module, cfg: PastaConfig, init: bool = True) -> SpecialTokenVectors:
        return SpecialTokenVectors(model, cfg, init)


__all__ = ["PastaConfig", "PastaMethod", "SpecialTokenVectors", "blocks", "special_ids"]
