"""Trainable tokens: train chosen rows of the input embedding (and of a tied output head), nothing else.

As HF PEFT's TRAINABLE_TOKENS (new special tokens of a chat template, a few under-trained tokens):
    embedding:    y[t] = delta[pos(ids[t])] where ids[t] is a chosen token, else W[ids[t]]
    output head:  logits[..., i] = h @ delta[pos(i)] (+ b_i) for the chosen tokens i, else h @ W_i
delta: (k, d), initialised to the chosen rows of W (`init=True`, the base at start) or N(0, 1).
A head tied to the embedding (one weight tensor) shares the same delta; PEFT writes it under both
modules' names, and so do we. The forward never copies the (vocab, d) weight: it gathers k rows.
Merge writes the rows into the weight (once for a tied pair); unmerge puts the original rows back bit
for bit. Parameters: k * d (per distinct weight tensor).
With a grown vocabulary (new tokens), save with `model.save(path, tokenizer=tok)`: `st.load` then
resizes the base's embeddings to the saved size before loading (docs/methods/trainable_tokens.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.base import LayerAdapter, Method, PeftContext, register
from slimtune.targets import base_modules
from slimtune.targets import find_targets as find_config_targets


@dataclass
class TrainableTokensConfig(MethodConfig):
    """Trainable tokens: rows `token_indices` of the input embedding (and of a head tied to it) train.

    Args:
        token_indices: the token ids whose embedding rows train (e.g. the ids of newly added tokens).
        init: True: start from the base's rows (exactly the base model); False: N(0, 1) rows.
        targets: None (default): the input embedding, plus the output head when it is tied to it;
            or embedding / output-head module names (an untied head listed here gets its own rows).
    """

    aliases = {**MethodConfig.aliases, "init_weights": "init"}

    token_indices: list[int] | None = None
    init: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = self.token_indices
        check_field(isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids), self, "token_indices",
            "a non-empty list of token ids (ints >= 0), e.g. the ids tokenizer.add_tokens gave")
        check_field(len(set(ids)) == len(ids), self, "token_indices", "distinct token ids")
        self.token_indices = [int(i) for i in ids]
        check_field(isinstance(self.init, bool), self, "init", "True (start from the base's rows) or False")


class TokenRows(nn.Module):
    """The trainable rows of each distinct weight tensor among the targets (a tied pair shares one)."""

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[int, nn.Parameter] = {}  # id(weight) -> delta; registered by the layers, not here

    def rows_for(self, weight: Tensor, index: Tensor, init: bool) -> tuple[nn.Parameter, bool]:
        """(delta for `weight`, whether another target already owns it)."""
        key = id(weight)
        if key in self._rows:
            return self._rows[key], True
        with torch.no_grad():
            start = weight[index].clone() if init else torch.randn(len(index), weight.shape[1], dtype=weight.dtype,
                                                                   device=weight.device)
        self._rows[key] = nn.Parameter(start)
        return self._rows[key], False


class TrainableTokens(LayerAdapter):
    """Chosen rows of an Embedding or of an output-head Linear (weight (vocab, d) for both)."""

    peft_keys = {"delta": "trainable_tokens_delta"}

    def __init__(self, base: nn.Module, cfg: TrainableTokensConfig, init: bool, shared: TokenRows) -> None:
        super().__init__()
        vocab = base.weight.shape[0]
        bad = [i for i in cfg.token_indices if i >= vocab]
        if bad:
            raise ValueError(f"token_indices {bad} are outside the vocabulary of {vocab} rows; resize the "
                             "embeddings first (model.resize_token_embeddings(len(tokenizer)))")
        index = torch.tensor(cfg.token_indices, dtype=torch.long, device=base.weight.device)
        self.register_buffer("index", index, persistent=False)
        self.delta, self.tied = shared.rows_for(base.weight, index, init and cfg.init)
        self.embedding = isinstance(base, nn.Embedding)
        if self.embedding:
            lookup = torch.full((vocab,), -1, dtype=torch.long, device=index.device)
            lookup[index] = torch.arange(len(index), device=index.device)
            self.register_buffer("lookup", lookup, persistent=False)
        self._original: Tensor | None = None

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if self.embedding:
            pos = self.lookup[x]  # (...,) row of delta, or -1
            rows = self.delta[pos.clamp_min(0)].to(base_out.dtype)
            return torch.where((pos >= 0).unsqueeze(-1), rows, base_out)
        new = F.linear(x.to(self.delta.dtype), self.delta)  # (..., k)
        if base.bias is not None:
            new = new + base.bias[self.index]
        return base_out.index_copy(-1, self.index, new.to(base_out.dtype))

    def export_tensors(self) -> dict[str, Tensor]:
        """A tied head writes its own copy of the shared rows (as PEFT; safetensors refuses shared memory)."""
        return {"delta": self.delta.detach().clone() if self.tied else self.delta}

    # -- merging: rows written in and put back exactly; a tied head's rows are the embedding's ---------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        W = base.weight  # (vocab, d)
        rows = torch.zeros_like(W)
        if not self.tied:
            rows[self.index] = self.delta.to(W.dtype) - W[self.index]
        return rows if isinstance(base, nn.Linear) else rows.T  # the registry's (d_out, d_in) layout

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if self.tied:
            return
        self._original = base.weight[self.index].clone()
        base.weight.index_copy_(0, self.index, self.delta.to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.tied or self._original is None:
            return
        base.weight.index_copy_(0, self.index, self._original)
        self._original = None


def _embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    """(input embedding name, name of an output head tied to it or None), seen through wrappers."""
    names = {id(m): n for n, m in base_modules(model)}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    emb, head = getattr(emb, "base_layer", emb), getattr(head, "base_layer", head)
    emb_name = names.get(id(emb)) if emb is not None else None
    tied = head is not None and emb is not None and head.weight is emb.weight
    return emb_name, names.get(id(head)) if tied else None


@register
class TrainableTokensMethod(Method):
    name, config, shape = "trainable_tokens", TrainableTokensConfig, "layer"
    category, params, paper = "selective", "k*d per distinct weight (k = len(token_indices))", "HF PEFT (2025)"
    mergeable, peft_type = True, "TRAINABLE_TOKENS"

    def find_targets(self, model: nn.Module, cfg: TrainableTokensConfig, skip: set[str]) -> list[str]:
        """The input embedding (or `targets`), plus an output head that shares its weight."""
        emb, tied_head = _embedding_names(model)
        if cfg.targets is None:
            if emb is None:
                raise ConfigError(f"TrainableTokensConfig: {type(model).__name__} has no input embedding "
                                  "(get_input_embeddings); name the embedding module in targets=")
            chosen = [emb]
        else:
            chosen = find_config_targets(model, cfg, skip)
        if tied_head is not None and emb in chosen and tied_head not in chosen and tied_head not in skip:
            chosen.append(tied_head)  # one weight: the head must see the same rows
        return chosen

    def build_shared(self, model: nn.Module, cfg: TrainableTokensConfig, targets: list[str], init: bool = True
                     ) -> TokenRows:
        return TokenRows()

    def build_layer(self, base: nn.Module, cfg: TrainableTokensConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        if not (isinstance(base, nn.Embedding) or (isinstance(base, nn.Linear) and kind_of(base).name == "linear")):
            raise NotImplementedError(f"trainable tokens train rows of an Embedding or of an output-head Linear, "
                                      f"not of {type(base).__name__}")
        return TrainableTokens(base, cfg, init, shared)

    def to_peft(self, cfg: TrainableTokensConfig, ctx: PeftContext) -> dict[str, Any]:
        embeddings = [t for t in ctx.targets if _kind(ctx.model, t) == "embedding"]
        return {
            **ctx.common("TRAINABLE_TOKENS"),
            "auto_mapping": None,
            "token_indices": list(cfg.token_indices),
            "target_modules": embeddings[0] if len(embeddings) == 1 else embeddings,
            "init_weights": cfg.init,
        }

    def from_peft(self, data: dict[str, Any]) -> TrainableTokensConfig:
        targets = data.get("target_modules")
        return config_from_dict({"method": "trainable_tokens", "token_indices": list(data["token_indices"]),
                                 "init": bool(data.get("init_weights", True)),
                                 "targets": None if targets in (None, "embed_tokens") else targets})


def _kind(model: nn.Module, name: str) -> str:
    module = model.get_submodule(name)
    return kind_of(getattr(module, "base_layer", module)).name


def token_ids(tokenizer: Any, tokens: Iterable[str]) -> list[int]:
    """The ids of `tokens` in `tokenizer` (after `tokenizer.add_tokens(tokens)`), for `token_indices`."""
    tokens = list(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unknown = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ConfigError(f"tokens {unknown} are not in the tokenizer; add them first: tokenizer.add_tokens(...)")
    return list(ids)


__all__ = ["TrainableTokens", "TrainableTokensConfig", "TrainableTokensMethod", "token_ids"]
