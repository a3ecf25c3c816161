"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) and P-tuning v2 (Liu et al. 2022, arXiv:2110.07602).

    every attention layer l:   Attn(x W_q, [P_k^l; x W_k], [P_v^l; x W_v])      P_k^l, P_v^l: (p, H_kv*d_head)

The prefixes of all layers are one tensor P (p, 2*L*D), D = H_kv * d_head (the key/value width, so
grouped-query models get KV-head-sized prefixes), laid out as HF PEFT's `prompt_embeddings`: row i,
columns [2l*D, (2l+1)*D) are layer l's key, [(2l+1)*D, (2l+2)*D) its value, heads-major. They reach the
model through the transformers cache API: a forward pre-hook on the backbone (`model.base_model`) hands
it a `DynamicCache` holding the prefixes, extends the attention mask by p ones and shifts given
position ids by p (as PEFT's CAUSAL_LM and SEQ_CLS paths do; without position ids the model counts
from the cache length, so real tokens sit at positions p.. in both; `shift_positions=False` keeps them at
0.., as AdapterHub does, by passing position ids that discount the prefix). `generate()` fills the cache it
creates; with `use_cache=False` every step gets a fresh prefix cache. No token is added to the
input, so logits, labels and generated sequences line up with the caller's ids. Not mergeable (the
KV cache grows by p).

params: 2*L*p*D saved. `prefix_projection=True` trains P = MLP(E) instead (PEFT's reparameterisation:
Embedding(p, D) -> Linear(D, h) -> Tanh -> Linear(h, 2*L*D)); files hold the computed P in both formats,
as PEFT writes them, and a loaded adapter trains P directly. Init: N(0, 1) as PEFT's nn.Embedding, or
init="zero" (PEFT's init_weights="zero": the prefix, or the MLP's last layer, starts at 0).
Activation checkpointing drops the cache in transformers, so it is refused while training.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import PEFT_SHORT_PREFIX, AdapterView, InputAdapter, Method, PeftContext, register
from slimtune.methods.prompt_tuning import _first, _text_config, prompt_learning_fields


@dataclass
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning / P-tuning v2.

    Args:
        num_virtual_tokens: p, the prefix length per layer (10-20 for classification, up to 200 for generation).
        prefix_projection: train the prefixes through PEFT's MLP reparameterisation (dropped at save).
        encoder_hidden_size: h, the MLP's hidden size (None: D, the key/value width, as PEFT).
        init: "random" (N(0, 1), PEFT's default) or "zero" (PEFT's init_weights="zero").
        shift_positions: True: real tokens sit at positions p.. after the prefix (HF PEFT); False: they keep
            positions 0.. (AdapterHub). It matters for absolute position embeddings (GPT-2, BERT); with rotary
            ones (Llama) attention scores depend on position differences only.
    """

    aliases = {**MethodConfig.aliases, "init_weights": "init"}

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    shift_positions: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: prefix tuning wraps no module")
        n, h = self.num_virtual_tokens, self.encoder_hidden_size
        check_field(isinstance(n, int) and not isinstance(n, bool) and n >= 1, self, "num_virtual_tokens",
                    "an int >= 1, e.g. 20")
        check_field(isinstance(self.prefix_projection, bool), self, "prefix_projection", "True or False")
        check_field(h is None or (isinstance(h, int) and not isinstance(h, bool) and h >= 1), self,
                    "encoder_hidden_size", "None (the key/value width) or an int >= 1")
        check_field(self.init in ("random", "zero"), self, "init", "'random' or 'zero'")
        check_field(isinstance(self.shift_positions, bool), self, "shift_positions", "True or False")


@dataclass(frozen=True)
class KVShape:
    """What the prefixes must look like for one model: L layers of H_kv heads of d_head."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:  # D
        return self.kv_heads * self.head_dim

    @classmethod
    def of(cls, model: nn.Module) -> KVShape:
        text = _text_config(model)
        if getattr(text, "is_encoder_decoder", False):
            raise NotImplementedError(f"prefix tuning of encoder-decoder models ({type(model).__name__}) is not "
                                      "implemented")
        layers, heads = _first(text, "num_hidden_layers", "n_layer"), _first(text, "num_attention_heads", "n_head")
        hidden = _first(text, "hidden_size", "n_embd", "d_model")
        if layers is None or heads is None or hidden is None:
            raise NotImplementedError(f"prefix tuning needs a transformers config with the number of layers, heads "
                                      f"and the hidden size; {type(model).__name__} has none")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(layers, kv_heads, getattr(text, "head_dim", None) or hidden // heads)


class KVPrefix(InputAdapter):
    """Per-layer key/value prefixes handed to the backbone as a prefilled `DynamicCache`."""

    def __init__(self, model: nn.Module, cfg: PrefixTuningConfig, init: bool = True) -> None:
        super().__init__()
        self.p, self.kv, self.shift = cfg.num_virtual_tokens, KVShape.of(model), cfg.shift_positions
        backbone = _backbone(model)  # not kept: the adapter holds only its own tensors
        self._cache_arg = _cache_argument(backbone)
        self._arg_names = list(inspect.signature(backbone.forward).parameters)  # to name positional args
        words = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
        weight = getattr(words, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        factory = {"dtype": dtype, "device": weight.device if weight is not None else None}
        D, out = self.kv.width, 2 * self.kv.layers * self.kv.width
        self.transform = None
        if cfg.prefix_projection:
            h = cfg.encoder_hidden_size or D
            self.embedding = nn.Parameter(torch.zeros(self.p, D, **factory))  # E
            self.transform = nn.Sequential(nn.Linear(D, h, **factory), nn.Tanh(), nn.Linear(h, out, **factory))
        else:
            self.embedding = nn.Parameter(torch.zeros(self.p, out, **factory))  # P itself
        if init:
            self._init(cfg.init)
        self._armed = False  # set for the duration of one TunedModel call
        self._filled: weakref.WeakSet = weakref.WeakSet()  # caches that hold this adapter's prefixes
        self._handle = None

    @torch.no_grad()
    def _init(self, how: str) -> None:
        self.embedding.normal_()
        if how == "zero":
            last = self.embedding if self.transform is None else self.transform[-1]
            for t in ([last] if self.transform is None else [last.weight, last.bias]):
                t.zero_()

    def prefix(self) -> Tensor:
        """P: (p, 2*L*D) in PEFT's `prompt_embeddings` layout."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def export_tensors(self) -> dict[str, Tensor]:
        if self.transform is None:
            return {"embedding": self.embedding}
        with torch.no_grad():
            return {"embedding": self.prefix()}

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._handle = _backbone(model).register_forward_pre_hook(self._inject, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        if rows is not None:
            raise NotImplementedError("prefix tuning with adapter_names (one adapter per row) is not implemented; "
                                      "call the rows of each prefix adapter separately")
        self._armed = True
        return kwargs

    def end_call(self) -> None:
        self._armed = False

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self._armed:
            return None
        kwargs = {**dict(zip(self._arg_names, args, strict=False)), **kwargs}
        _refuse_checkpointing(module)
        cache = kwargs.pop("past_key_values", None)
        cache = kwargs.get(self._cache_arg) if cache is None else cache
        if cache is None or kwargs.get("use_cache") is False:
            cache = self._fill(module, None, kwargs)  # a fresh prefix cache for every call that does not keep one
        elif cache.get_seq_length() == 0:
            cache = self._fill(module, cache, kwargs)  # the empty cache generate() made
        elif cache not in self._filled:
            raise NotImplementedError("prefix tuning: this call passes a non-empty cache that this adapter did not "
                                      "start (another prefix adapter active at once, or a base model's cache); "
                                      "continue from the cache a call with this adapter returned")
        kwargs[self._cache_arg] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError(f"prefix tuning needs a 2D attention mask (batch, seq); got {mask.dim()}D")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.p), mask], dim=1)
        if kwargs.get("position_ids") is not None and self.shift:
            kwargs["position_ids"] = kwargs["position_ids"] + self.p
        elif kwargs.get("position_ids") is None and not self.shift:  # real tokens count from 0, as without a prefix
            ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            start = cache.get_seq_length() - self.p
            kwargs["position_ids"] = torch.arange(start, start + ref.shape[1], device=ref.device).unsqueeze(0)
        return (), kwargs

    def _fill(self, module: nn.Module, cache: Any, kwargs: dict[str, Any]) -> Any:
        """`cache` (an empty DynamicCache, or None: a new one) with every layer's prefix in it."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=getattr(module, "config", None))
        elif not isinstance(cache, DynamicCache):
            raise NotImplementedError(f"prefix tuning fills a DynamicCache; got {type(cache).__name__} "
                                      "(use the default cache_implementation)")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None else self.embedding.dtype
        for layer, (k, v) in enumerate(self.key_values(ref.shape[0], dtype)):
            cache.update(k, v, layer)
        self._filled.add(cache)
        return cache

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values), each (batch, H_kv, p, d_head)."""
        s = self.kv
        P = self.prefix().to(dtype).view(self.p, 2 * s.layers, s.kv_heads, s.head_dim).permute(1, 2, 0, 3)
        P = P.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, H_kv, p, d_head)
        return [(P[2 * i], P[2 * i + 1]) for i in range(s.layers)]


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "base_model", model)
    return backbone if isinstance(backbone, nn.Module) else model


def _cache_argument(backbone: nn.Module) -> str:
    """The name the backbone's forward takes the KV cache by ("cache" from transformers 5.x)."""
    names = inspect.signature(backbone.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise NotImplementedError(f"prefix tuning needs a backbone that takes a KV cache (cache= or past_key_values=); "
                              f"{type(backbone).__name__}.forward takes neither")


def _refuse_checkpointing(backbone: nn.Module) -> None:
    if backbone.training and torch.is_grad_enabled() and any(
            getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules()):
        raise NotImplementedError("prefix tuning with activation checkpointing is not possible: transformers drops "
                                  "the KV cache, which carries the prefixes, in checkpointed layers; disable it "
                                  "(model.activation_checkpointing_disable())")


@register
class PrefixTuningMethod(Method):
    name, config, shape = "prefix_tuning", PrefixTuningConfig, "input"
    category, paper = "additive", "arXiv:2101.00190, arXiv:2110.07602"
    params = "2*num_layers*num_virtual_tokens*kv_heads*head_dim saved (+ the MLP with prefix_projection)"
    mergeable, peft_type = False, "PREFIX_TUNING"
    module_prefix = PEFT_SHORT_PREFIX
    tensor_keys = {"embedding": "prompt_embeddings"}

    def build_input(self, model: nn.Module, cfg: PrefixTuningConfig, init: bool = True) -> KVPrefix:
        return KVPrefix(model, cfg, init)

    def saved_config(self, cfg: PrefixTuningConfig, adapter: AdapterView) -> PrefixTuningConfig:
        return cfg.replace(prefix_projection=False)  # the file holds the computed prefixes

    def to_peft(self, cfg: PrefixTuningConfig, ctx: PeftContext) -> dict[str, Any]:
        if not cfg.shift_positions:
            raise NotImplementedError("format='peft' with PrefixTuningConfig.shift_positions=False: HF PEFT places "
                                      "real tokens after the prefix (positions p..), so with absolute position "
                                      "embeddings it would compute other outputs; save in slimtune format")
        kv = KVShape.of(ctx.model)
        return {
            **prompt_learning_fields(ctx, "PREFIX_TUNING", cfg.num_virtual_tokens),
            "auto_mapping": None,
            "token_dim": kv.width,  # PEFT sizes prefixes by key/value heads (grouped-query attention)
            "num_attention_heads": kv.kv_heads,
            "encoder_hidden_size": cfg.encoder_hidden_size or kv.width,
            "prefix_projection": cfg.prefix_projection,
            "init_weights": "zero" if cfg.init == "zero" else None,
        }

    def from_peft(self, data: dict[str, Any]) -> PrefixTuningConfig:
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise NotImplementedError("prefix tuning of encoder-decoder models (num_transformer_submodules=2) "
                                      "is not implemented")
        # prompt_embeddings are the computed prefixes whether or not PEFT trained them through its MLP
        return config_from_dict({"method": "prefix_tuning", "num_virtual_tokens": int(data["num_virtual_tokens"]),
                                 "modules_to_save": data.get("modules_to_save")})
