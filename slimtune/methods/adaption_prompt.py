"""LLaMA-Adapter (Zhang et al. 2023, arXiv:2303.16199; HF PEFT's ADAPTION_PROMPT): gated adaption prompts.

    top `adapter_layers` attention layers l, adaption prompt A_l: (K, d), gate g_l (a scalar, 0 at init):
    out_l(x) = attn_l(x) + W_o (g_l * softmax(q(x) k(A_l)^T / sqrt(d_head)) v(A_l))

q, k, v and W_o are the layer's own projections (q with its rotary embedding; the prompt's keys carry
no position, so cached decoding needs nothing extra); grouped-query layers repeat the prompt's KV heads.
The prompt scores are softmaxed on their own, so with g = 0 the model is exactly the base at init.
A forward hook on each adapted attention module adds the term while a TunedModel call runs; no model
code is patched. Supported families (their attention is recognised by name and projections):
Llama and Mistral (`self_attn` with q/k/v/o_proj and rotary position embeddings), and GPT-2 (`attn`
with c_attn, as HF PEFT does it: the prompt term is added after c_proj, not projected by it).
Others are refused. One gate per layer as in PEFT (the reference code has one per head).

params: adapter_layers * (K * d + 1). Init: A ~ N(0, 1) (PEFT, the reference code), g = 0.
Files: PEFT's keys `base_model.model.<attention>.adaption_prompt` (1, K, d) and `.adaption_gate` (1,),
in both formats. Not mergeable (an extra attention term).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.methods.base import PEFT_PREFIX, InputAdapter, Method, PeftContext, register
from slimtune.methods.prompt_tuning import _text_config

FAMILIES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}  # model_type -> attention module name


@dataclass
class AdaptionPromptConfig(MethodConfig):
    """LLaMA-Adapter.

    Args:
        adapter_len: K, adaption-prompt tokens per layer (the paper uses 10).
        adapter_layers: how many of the top layers get a prompt (None: all; the paper uses 30 of 32).
    """

    adapter_len: int = 10
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name,
                        "None: LLaMA-Adapter picks the top attention layers (adapter_layers=)")
        check_field(_positive_int(self.adapter_len), self, "adapter_len", "an int >= 1, e.g. 10")
        check_field(self.adapter_layers is None or _positive_int(self.adapter_layers), self, "adapter_layers",
                    "None (every layer) or an int >= 1")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def attention_modules(model: nn.Module, cfg: AdaptionPromptConfig) -> tuple[str, list[str]]:
    """(family, names of the top `adapter_layers` attention modules), refusing unsupported models."""
    family = getattr(_text_config(model), "model_type", None)
    if family not in FAMILIES:
        raise NotImplementedError(f"LLaMA-Adapter on {type(model).__name__} (model_type={family!r}) is not "
                                  f"implemented; supported: {', '.join(FAMILIES)}")
    leaf = FAMILIES[family]
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == leaf]
    wanted = len(names) if cfg.adapter_layers is None else cfg.adapter_layers
    if not names or wanted > len(names):
        raise ConfigError(f"AdaptionPromptConfig.adapter_layers={cfg.adapter_layers}: {type(model).__name__} has "
                         f"{len(names)} attention layers ({leaf})")
    if family != "gpt2":
        for name in names[-wanted:]:
            _check_llama_attention(name, model.get_submodule(name))
    return family, names[-wanted:]


def _check_llama_attention(name: str, attn: nn.Module) -> None:
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, p)]
    if missing or hasattr(attn, "q_norm"):
        raise NotImplementedError(f"LLaMA-Adapter on {name} ({type(attn).__name__}): expected a Llama attention "
                                  "(q/k/v/o_proj, no q_norm)")
    if getattr(attn.o_proj, "bias", None) is not None:
        raise NotImplementedError(f"LLaMA-Adapter on {name}: o_proj has a bias (attention_bias=True), which the "
                                  "prompt term would add a second time")


class AdaptionPrompts(InputAdapter):
    """One adaption prompt and gate per adapted attention module, added by forward hooks."""

    def __init__(self, model: nn.Module, cfg: AdaptionPromptConfig, init: bool = True) -> None:
        super().__init__()
        self.family, self.names = attention_modules(model, cfg)
        d = _text_config(model).hidden_size
        first = model.get_submodule(self.names[0])
        weight = (first.c_proj if self.family == "gpt2" else first.q_proj).weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        factory = {"dtype": dtype, "device": weight.device}
        self.prompt = nn.ParameterList([torch.zeros(1, cfg.adapter_len, d, **factory) for _ in self.names])
        self.gate = nn.ParameterList([torch.zeros(1, **factory) for _ in self.names])
        if init:
            with torch.no_grad():
                for A in self.prompt:
                    A.normal_()
        self._armed = False
        self._rows: Tensor | None = None
        self._handles: list = []

    def export_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, A, g in zip(self.names, self.prompt, self.gate, strict=True):
            out[f"{PEFT_PREFIX}{name}.adaption_prompt"] = A
            out[f"{PEFT_PREFIX}{name}.adaption_gate"] = g
        return out

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        for i, name in enumerate(self.names):
            hook = functools.partial(self._add_prompt_term, i)
            self._handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        self._armed, self._rows = True, rows
        return kwargs

    def end_call(self) -> None:
        self._armed, self._rows = False, None

    def _add_prompt_term(self, i: int, attn: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._armed:
            return None
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.family == "gpt2":
            term = _gpt2_term(attn, x, self.prompt[i], self.gate[i])
        else:
            position = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            term = _llama_term(attn, x, position, self.prompt[i], self.gate[i])
        if self._rows is not None:
            if self._rows.numel() != x.shape[0]:
                raise NotImplementedError(f"LLaMA-Adapter with adapter_names: {self._rows.numel()} names for a batch "
                                          f"of {x.shape[0]} (generate() with beams or several sequences per row)")
            term = term * self._rows.to(term.device, term.dtype).view(-1, 1, 1)
        return (output[0] + term.to(output[0].dtype), *output[1:])


def _gated_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor) -> Tensor:
    """gate * softmax(q k^T / sqrt(d_head)) v: q (b, H, n, d_head), k and v (1, H, K, d_head) -> (b, n, H*d_head)."""
    scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(q.shape[-1])  # (b, H, n, K)
    weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = weights @ v.to(weights.dtype)  # (b, H, n, d_head)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _llama_term(attn: nn.Module, x: Tensor, position: tuple[Tensor, Tensor], A: Tensor, gate: Tensor) -> Tensor:
    b, n, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, hd).transpose(1, 2)  # (b, H, n, d_head)
    cos, sin = (t.unsqueeze(1) for t in position)
    q = q * cos + _rotate_half(q) * sin
    k = attn.k_proj(A).view(1, A.shape[1], -1, hd).transpose(1, 2)  # (1, H_kv, K, d_head)
    v = attn.v_proj(A).view(1, A.shape[1], -1, hd).transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return attn.o_proj(_gated_attention(q, k, v, gate))


def _gpt2_term(attn: nn.Module, x: Tensor, A: Tensor, gate: Tensor) -> Tensor:
    b, n, d = x.shape
    hd = attn.head_dim
    q = attn.c_attn(x).split(d, dim=2)[0].view(b, n, -1, hd).transpose(1, 2)
    _, k, v = attn.c_attn(A).split(d, dim=2)
    k, v = (t.view(1, A.shape[1], -1, hd).transpose(1, 2) for t in (k, v))
    return _gated_attention(q, k, v, gate)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@register
class AdaptionPromptMethod(Method):
    name, config, shape = "adaption_prompt", AdaptionPromptConfig, "input"
    category, paper = "additive", "arXiv:2303.16199"
    params = "adapter_layers*(adapter_len*d_model+1)"
    mergeable, peft_type = False, "ADAPTION_PROMPT"

    def build_input(self, model: nn.Module, cfg: AdaptionPromptConfig, init: bool = True) -> AdaptionPrompts:
        return AdaptionPrompts(model, cfg, init)

    def to_peft(self, cfg: AdaptionPromptConfig, ctx: PeftContext) -> dict[str, Any]:
        if ctx.modules_to_save:
            raise NotImplementedError("format='peft' for LLaMA-Adapter with modules_to_save: HF PEFT's "
                                      "AdaptionPromptConfig has no modules_to_save")
        family, names = attention_modules(ctx.model, cfg)
        return {**ctx.common("ADAPTION_PROMPT"), "auto_mapping": None, "adapter_len": cfg.adapter_len,
                "adapter_layers": len(names), "target_modules": FAMILIES[family]}

    def from_peft(self, data: dict[str, Any]) -> AdaptionPromptConfig:
        target = data.get("target_modules")
        if target not in (None, *FAMILIES.values()):
            raise NotImplementedError(f"LLaMA-Adapter with target_modules={target!r} is not implemented; "
                                      "supported: 'self_attn' (Llama, Mistral) and 'attn' (GPT-2)")
        return config_from_dict({"method": "adaption_prompt", "adapter_len": int(data["adapter_len"]),
                                 "adapter_layers": int(data["adapter_layers"])})
