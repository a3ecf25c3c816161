"""ATTEMPT (Asai et al. 2022, "Attentional Mixtures of Soft Prompt Tuning", arXiv:2205.11961): an instance-wise
mixture of frozen source prompts P_1..P_t and a trainable target prompt P_target.

    x̂    = max-pool_i E(x)_i                          the input's token embeddings, padding left out
    h    = LayerNorm(W_up SiLU(W_down x̂))             W_down: (k, d), W_up: (d, k), no biases (k = 100 in the paper)
    a_j  = softmax_j(P̂_j · h / T)                     j over [P_1, ..., P_t, P_target]; P̂_j = max-pool of P_j's tokens
    P(x) = P_target + Σ_j a_j P_j                      T = d·e by default (the paper's d × exp(1))
    X'   = [P(x); E(x)]

params: p·d (P_target) + 2·d·k (W_down, W_up) + 2·d (LayerNorm); the t·p·d source prompts are frozen buffers,
saved in the adapter file so it is self-contained. The prompt is placed as prompt tuning places its own
(slimtune/methods/prompt_tuning.py: p placeholder ids in front, attention mask 1, labels -100, positions shifted),
so forward, padding and `generate()` behave the same. Not mergeable.

Pooling: over the positions with attention mask 1 and, when labels are given, label -100 (what the model
reads, not what it predicts: on a decoder a pooled answer would leak the target into the prompt); a row
with no such position pools all its attended positions. `generate()` pools the prompt it is given, once.
The reference code pools every position, padding included; leaving padding out makes a padded row equal
the row alone.

Init: P_target is a copy of the first source ("source", as the reference code's single-task training),
or "sample_vocab" / "random" as prompt tuning; W_down, W_up as torch's Linear, LayerNorm (1, 0).
Sources are prompt-tuning or P-tuning adapters: folders (ours or HF PEFT's), .safetensors files, or the
names of prompt adapters attached to the same model (`add_attempt(model, config)`).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError
from slimtune.methods.base import PEFT_SHORT_PREFIX, Method, register
from slimtune.methods.prompt_tuning import (
    PromptTuningConfig,
    SoftPrompt,
    _initial_prompt,
    _input_embeddings,
    read_prompt,
)

if TYPE_CHECKING:
    from slimtune.tuned import TunedModel

_INITS = ("source", "sample_vocab", "random")
#: source name -> (p, d) prompt, for sources that are adapters attached to the model (`add_attempt`)
_ATTACHED: contextvars.ContextVar[dict[str, Tensor] | None] = contextvars.ContextVar("attempt_sources", default=None)


@dataclass
class AttemptConfig(MethodConfig):
    """ATTEMPT.

    Args:
        sources: the frozen source prompts: prompt-tuning / P-tuning adapter folders or .safetensors files
            (or names of prompt adapters attached to the model, through `add_attempt`). Read once, when the
            adapter is created; its file then holds them.
        num_virtual_tokens: p; None: the sources' length (every source and the target have p tokens).
        attn_hidden: k, the attention module's bottleneck (the paper's 100).
        temperature: T of the softmax; None: d·e (the paper's d × exp(1), 2087 for d = 768).
        init: the target prompt's init: "source" (a copy of the first source), "sample_vocab" or "random".
    """

    sources: list[str] | None = None
    num_virtual_tokens: int | None = None
    attn_hidden: int = 100
    temperature: float | None = None
    init: str = "source"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: ATTEMPT wraps no module")
        if isinstance(self.sources, (str, Path)):
            self.sources = [self.sources]
        check_field(isinstance(self.sources, (list, tuple)) and len(self.sources) > 0
                    and all(isinstance(s, (str, Path)) for s in self.sources), self, "sources",
                    "a non-empty list of source prompt adapters (folders, .safetensors files or attached names)")
        self.sources = [str(s) for s in self.sources]
        check_field(self.num_virtual_tokens is None or _positive_int(self.num_virtual_tokens), self,
                    "num_virtual_tokens", "None (the sources' length) or an int >= 1")
        check_field(_positive_int(self.attn_hidden), self, "attn_hidden", "an int >= 1, e.g. 100")
        check_field(self.temperature is None or (isinstance(self.temperature, (int, float))
                                                 and not isinstance(self.temperature, bool) and self.temperature > 0),
                    self, "temperature", "None (d * e) or a number > 0")
        check_field(self.init in _INITS, self, "init", "'source', 'sample_vocab' or 'random'")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class AttemptPrompt(SoftPrompt):
    """Prompt tuning's soft prompt, made per row: P_target plus an attention-weighted mix of the prompts."""

    def __init__(self, model: nn.Module, cfg: AttemptConfig, init: bool = True) -> None:
        if cfg.num_virtual_tokens is None:
            raise ConfigError("AttemptConfig.num_virtual_tokens=None: building without the sources (init=False) "
                              "needs the prompt length; st.attach / model.add fill it in from the sources")
        super().__init__(model, cfg, init=False)  # self.embedding (p, d) is P_target
        factory = {"dtype": self.embedding.dtype, "device": self.embedding.device}
        d, k = self.embedding.shape[1], cfg.attn_hidden
        self.register_buffer("sources", torch.zeros(len(cfg.sources), self.p, d, **factory))
        self.attn_down = nn.Linear(d, k, bias=False, **factory)
        self.attn_up = nn.Linear(k, d, bias=False, **factory)
        self.attn_norm = nn.LayerNorm(d, **factory)
        self.temperature = float(cfg.temperature) if cfg.temperature is not None else d * math.e
        self._pool: Tensor | None = None  # (batch, n) bool: the input positions max-pooled this call
        if init:
            with torch.no_grad():
                self.sources.copy_(source_prompts(cfg, d))
                words = _input_embeddings(model)
                target = self.sources[0] if cfg.init == "source" else _initial_prompt(
                    words, PromptTuningConfig(num_virtual_tokens=self.p, init=cfg.init))
                self.embedding.copy_(target)

    # -- the formula --------------------------------------------------------------------------------
    def mixture(self, pooled: Tensor) -> Tensor:
        """a (batch, t + 1): the attention of each row over [sources..., target], given its pooled input x̂."""
        keys = self._prompts().amax(dim=1)  # P̂_j: (t + 1, d)
        h = self.attn_norm(self.attn_up(F.silu(self.attn_down(pooled.to(keys.dtype)))))
        return torch.softmax((h @ keys.T).float() / self.temperature, dim=-1)

    def instance_prompts(self, pooled: Tensor) -> Tensor:
        """P(x) (batch, p, d) = P_target + Σ_j a_j P_j, given the pooled inputs x̂ (batch, d)."""
        prompts = self._prompts()
        a = self.mixture(pooled).to(prompts.dtype)
        return self.embedding + torch.einsum("bj,jpd->bpd", a, prompts)

    def _prompts(self) -> Tensor:
        return torch.cat([self.sources, self.embedding.unsqueeze(0)], dim=0)

    # -- placement (prompt tuning's, with the input pooled first) -------------------------------------
    def prompt_rows(self, embeds: Tensor) -> Tensor:
        pool = self._pool
        if pool is None:
            pool = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        x = embeds[:, :pool.shape[1]]  # generate(use_cache=False) embeds the generated tokens too: pool the prompt
        if pool.shape[0] != x.shape[0]:  # generate() repeated each row (beams, num_return_sequences)
            pool = pool.repeat_interleave(x.shape[0] // pool.shape[0], dim=0)
        pooled = x.masked_fill(~pool.to(x.device).unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.instance_prompts(pooled).to(embeds.dtype)

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        self._pool = _pooled_positions(kwargs)
        return super().prepare(kwargs, rows)

    def end_call(self) -> None:
        super().end_call()
        self._pool = None


def _pooled_positions(kwargs: dict[str, Any]) -> Tensor | None:
    """(batch, n) bool: attended positions the model reads (label -100 where labels are given); a row with
    none keeps every attended position, a row with no attended position keeps all."""
    ref = kwargs.get("input_ids")
    ref = kwargs["inputs_embeds"][..., 0] if ref is None and kwargs.get("inputs_embeds") is not None else ref
    if ref is None:
        return None
    mask = kwargs.get("attention_mask")
    attended = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device) if mask is None else mask.bool()
    attended = torch.where(attended.any(1, keepdim=True), attended, torch.ones_like(attended))
    labels = kwargs.get("labels")
    if labels is None or labels.dim() != 2 or labels.shape != attended.shape:
        return attended
    read = attended & (labels == -100).to(attended.device)
    return torch.where(read.any(1, keepdim=True), read, attended)


def source_prompts(cfg: AttemptConfig, d: int) -> Tensor:
    """The sources stacked, (t, p, d).

    Raises:
        ConfigError: a source that is no prompt adapter, or sources (or num_virtual_tokens) of other lengths.
    """
    attached = _ATTACHED.get() or {}
    prompts = []
    for source in cfg.sources:
        if source in attached:
            prompts.append(attached[source])
        elif not Path(source).exists():
            raise ConfigError(f"AttemptConfig.sources: {source!r} is no file or folder; for a prompt adapter "
                              "attached to the model use slimtune.methods.attempt.add_attempt(model, config)")
        else:
            prompts.append(read_prompt(source, d))
    lengths = {s: p.shape[0] for s, p in zip(cfg.sources, prompts, strict=True)}
    want = cfg.num_virtual_tokens or prompts[0].shape[0]
    if any(n != want for n in lengths.values()):
        raise ConfigError(f"AttemptConfig: every source and the target prompt need the same length; got {lengths}"
                          + (f" and num_virtual_tokens={cfg.num_virtual_tokens}" if cfg.num_virtual_tokens else ""))
    return torch.stack([p.to(prompts[0].dtype) for p in prompts])


def add_attempt(model: TunedModel, config: AttemptConfig, name: str = "attempt") -> TunedModel:
    """`model.add(config, name)` where `config.sources` may also name prompt-tuning / P-tuning adapters attached
    to `model`: their current prompts become the frozen sources (copied; the source adapters stay as they are).
    As `add`, the new adapter becomes active only if none is: `model.use(name)`.

    Raises:
        ConfigError: a named source adapter that is not a prompt-tuning or P-tuning one.
    """
    attached = {}
    for source in config.sources:
        if source in model.configs:
            method = model.configs[source].method
            if method not in ("prompt_tuning", "p_tuning"):
                raise ConfigError(f"AttemptConfig.sources: adapter {source!r} is a {method!r} adapter; expected a "
                                  "prompt_tuning or p_tuning adapter (one soft prompt)")
            with torch.no_grad():
                attached[source] = model.inputs[source].virtual_tokens().detach().clone()
    token = _ATTACHED.set(attached)
    try:
        return model.add(config, name)
    finally:
        _ATTACHED.reset(token)


@register
class AttemptMethod(Method):
    name, config, shape = "attempt", AttemptConfig, "input"
    category, paper = "additive", "arXiv:2205.11961"
    params = "num_virtual_tokens*d_model + 2*d_model*attn_hidden + 2*d_model (+ the frozen sources)"
    mergeable = False
    module_prefix = PEFT_SHORT_PREFIX
    tensor_keys = {"embedding": "prompt_embeddings", "sources": "source_prompts"}

    def plan(self, model: nn.Module, cfg: AttemptConfig, data: Any) -> AttemptConfig:
        """The config with num_virtual_tokens read from the sources (checked against them when given)."""
        prompts = source_prompts(cfg, _input_embeddings(model).embedding_dim)
        return cfg.replace(num_virtual_tokens=prompts.shape[1])

    def build_input(self, model: nn.Module, cfg: AttemptConfig, init: bool = True) -> AttemptPrompt:
        return AttemptPrompt(model, cfg, init)


__all__ = ["AttemptConfig", "AttemptMethod", "AttemptPrompt", "add_attempt", "source_prompts"]
