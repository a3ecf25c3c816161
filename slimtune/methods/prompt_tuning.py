"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): p trainable virtual tokens before the input.

    X' = [P; E(x)]        P: (p, d) trainable, the base model frozen;  params = p * d

The model is called with p placeholder ids in front of `input_ids` (attention mask 1, labels -100,
token type 0, positions shifted by p); a hook on the input embedding puts P in place of the
placeholders' embeddings on the first embedding call of the model call. Keeping real ids lets
the model do what it does with them (sequence classifiers find the last non-pad token) and lets
`generate()` count the virtual tokens in its cache positions. Logits of the virtual positions are
dropped, so outputs line up with `input_ids`. Not mergeable: the prompt costs p extra tokens.

Init: "sample_vocab" (embeddings of p random vocabulary tokens; the default, as the paper
recommends), "text" (the tokens of `init_text`, repeated or cut to p, as HF PEFT), "random"
(normal with the vocabulary embeddings' std), "prompt" (a copy of the trained prompt saved at
`init_from`: SPoT's soft prompt transfer, Vu et al. 2022, arXiv:2110.07904; see
slimtune/multitask/prompt_transfer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.errors import ConfigError
from slimtune.io import read_adapter_dir, read_safetensors
from slimtune.methods.base import PEFT_SHORT_PREFIX, InputAdapter, Method, PeftContext, register

_PEFT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_PROMPT_METHODS = ("prompt_tuning", "p_tuning")  # files whose prompt_embeddings are one (p, d) prompt
_PEFT_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


@dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning.

    Args:
        num_virtual_tokens: p, the number of virtual tokens (the paper uses 20-100).
        init: "sample_vocab" | "text" | "random" | "prompt".
        init_text: the text whose tokens initialise the prompt (init="text").
        tokenizer: a local tokenizer folder or hub name (already cached) to tokenize `init_text`.
        init_from: a saved prompt-tuning or P-tuning adapter (ours or HF PEFT's folder, or a .safetensors
            file) whose prompt is copied (init="prompt", SPoT); its length must be num_virtual_tokens.
    """

    aliases = {**MethodConfig.aliases, "prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text",
               "tokenizer_name_or_path": "tokenizer"}

    num_virtual_tokens: int = 20
    init: str = "sample_vocab"
    init_text: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: prompt tuning wraps no module")
        n = self.num_virtual_tokens
        check_field(isinstance(n, int) and not isinstance(n, bool) and n >= 1, self, "num_virtual_tokens",
                    "an int >= 1, e.g. 20")
        check_field(self.init in (*_PEFT_INITS, "prompt"), self, "init", "'sample_vocab', 'text', 'random' or 'prompt'")
        if self.init_from is not None and not isinstance(self.init_from, str):
            self.init_from = str(self.init_from)  # a Path
        check_field(self.init != "prompt" or bool(self.init_from), self, "init_from",
                    "the path of a saved prompt adapter when init='prompt'")
        if self.init == "text":
            check_field(isinstance(self.init_text, str) and self.init_text.strip() != "", self, "init_text",
                        "a non-empty string when init='text'")
            check_field(isinstance(self.tokenizer, str), self, "tokenizer",
                        "a tokenizer path when init='text' (the tokenizer of the base model)")


class SoftPrompt(InputAdapter):
    """p virtual token embeddings put in front of every row."""

    def __init__(self, model: nn.Module, cfg: PromptTuningConfig, init: bool = True) -> None:
        super().__init__()
        words = _input_embeddings(model)
        dtype = words.weight.dtype if words.weight.dtype.is_floating_point else torch.float32
        self.p = cfg.num_virtual_tokens
        self.embedding = nn.Parameter(torch.zeros(self.p, words.embedding_dim, dtype=dtype, device=words.weight.device))
        self._placeholder = _placeholder_id(model)
        self._pending = False  # the next input-embedding call of this model call takes the prompt
        self._every_call = False  # generate(use_cache=False): every step embeds the whole sequence again
        self._generation_config = None
        self._placeholders_in_output = False
        self._handle = None
        if init:
            with torch.no_grad():
                self.embedding.copy_(_initial_prompt(words, cfg))

    def virtual_tokens(self) -> Tensor:
        """The (p, d) embeddings put in place of the placeholders (P-tuning computes them)."""
        return self.embedding

    def prompt_rows(self, embeds: Tensor) -> Tensor:
        """The (batch, p, d) prompts, in `embeds`' dtype, put before input rows whose token embeddings are
        `embeds` (batch, n, d): the same virtual tokens for every row here; instance-wise prompts (ATTEMPT,
        MPT's task prompts) override this."""
        return self.virtual_tokens().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._handle = _input_embeddings(model).register_forward_hook(self._put_prompt)
        self._generation_config = getattr(model, "generation_config", None)

    def detach(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _put_prompt(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not (self._pending or self._every_call) or output.dim() != 3 or output.shape[1] < self.p:
            return output
        self._pending = False
        return torch.cat([self.prompt_rows(output[:, self.p:]), output[:, self.p:]], dim=1)

    def end_call(self) -> None:
        self._pending = self._every_call = False

    # -- the model call ---------------------------------------------------------------------------
    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        if rows is not None:
            raise NotImplementedError("prompt tuning with adapter_names (one adapter per row) is not implemented; "
                                      "call the rows of each prompt adapter separately")
        kwargs = dict(kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            kwargs["inputs_embeds"] = torch.cat([self.prompt_rows(embeds), embeds], dim=1)
            ref = embeds[..., 0]
        else:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds as keyword arguments")
            kwargs["input_ids"] = self._extend(ids, self._placeholder)
            ref = ids
            self._pending = True
        self._placeholders_in_output = embeds is None
        batch, n = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, n, dtype=torch.long, device=ref.device)
        kwargs["attention_mask"] = self._extend(mask, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = self._extend(kwargs["token_type_ids"], 0)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            head = torch.arange(self.p, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], -1)
            kwargs["position_ids"] = torch.cat([head, pos + self.p], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == n:
            kwargs["labels"] = self._extend(labels, -100)
        return kwargs

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        self._pending = False
        logits = getattr(output, "logits", None)
        mask = kwargs.get("attention_mask")
        if logits is not None and logits.dim() == 3 and mask is not None and logits.shape[1] == mask.shape[1]:
            output.logits = logits[:, self.p:]  # logits line up with the caller's input_ids
        return output

    def prepare_generate(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        if kwargs.get("attention_mask") is None and kwargs.get("input_ids") is not None:
            pad = kwargs.get("pad_token_id")
            ids = kwargs["input_ids"]
            kwargs["attention_mask"] = (ids != pad).long() if pad is not None else torch.ones_like(ids)
        kwargs = self.prepare(kwargs, rows)
        self._every_call = self._pending and not _uses_cache(kwargs, self._generation_config)
        return kwargs

    def finish_generate(self, output: Any) -> Any:
        self._pending = False
        if not self._placeholders_in_output:  # generate(inputs_embeds=...) returns new tokens only
            return output
        if isinstance(output, Tensor):
            return output[:, self.p:]
        if getattr(output, "sequences", None) is not None:
            output.sequences = output.sequences[:, self.p:]
        return output

    def _extend(self, t: Tensor, value: int) -> Tensor:
        head = torch.full((t.shape[0], self.p), value, dtype=t.dtype, device=t.device)
        return torch.cat([head, t], dim=1)


def _uses_cache(kwargs: dict[str, Any], model_config: Any) -> bool:
    """Whether this generate() call decodes with a KV cache (its kwargs, else its or the model's generation config)."""
    if kwargs.get("use_cache") is not None:
        return bool(kwargs["use_cache"])
    config = kwargs.get("generation_config") or model_config
    return getattr(config, "use_cache", True) is not False


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    words = get() if callable(get) else None
    if not isinstance(words, nn.Embedding):
        raise NotImplementedError(f"prompt tuning needs a model with get_input_embeddings() returning an "
                                  f"nn.Embedding; {type(model).__name__} has {type(words).__name__}")
    return words


def _placeholder_id(model: nn.Module) -> int:
    """A token id for the virtual positions: anything but the pad id (its embedding is replaced)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 1 if pad == 0 else 0


@torch.no_grad()
def _initial_prompt(words: nn.Embedding, cfg: PromptTuningConfig) -> Tensor:
    p, W = cfg.num_virtual_tokens, words.weight
    if cfg.init == "random":
        return torch.randn(p, W.shape[1], device=W.device, dtype=torch.float32).mul_(W.float().std()).to(W.dtype)
    if cfg.init == "prompt":
        return _source_prompt(cfg, W.shape[1]).to(device=W.device, dtype=W.dtype)
    if cfg.init == "sample_vocab":
        ids = torch.randint(0, W.shape[0], (p,), device=W.device)
    else:
        ids = torch.tensor(_text_ids(cfg), device=W.device)
    return words(ids).detach().clone()


def _source_prompt(cfg: PromptTuningConfig, d: int) -> Tensor:
    prompt = read_prompt(cfg.init_from, d)
    if prompt.shape[0] != cfg.num_virtual_tokens:
        raise ConfigError(f"PromptTuningConfig.init_from={cfg.init_from!r} holds a prompt of {prompt.shape[0]} tokens; "
                          f"expected num_virtual_tokens={cfg.num_virtual_tokens} (set it to {prompt.shape[0]})")
    return prompt


def read_prompt(path: str | Path, d: int | None = None) -> Tensor:
    """The (p, d) soft prompt of a saved prompt-tuning or P-tuning adapter: a folder in our format or HF
    PEFT's (`prompt_embeddings`), or a .safetensors file holding `prompt_embeddings` or one 2-D tensor.

    Raises:
        ConfigError: no such file, another method's adapter, or a token size other than `d`.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        tensors = read_safetensors(path)
        prompt = tensors.get("prompt_embeddings", next(iter(tensors.values())) if len(tensors) == 1 else None)
    elif path.is_dir():
        raw, tensors = read_adapter_dir(path)
        kind = raw.get("peft_type") or raw.get("config", {}).get("method")
        if kind not in (*_PROMPT_METHODS, *_PEFT_PROMPT_TYPES):
            raise ConfigError(f"{path}: a {kind!r} adapter; expected a prompt-tuning or P-tuning adapter "
                              "(one soft prompt, tensor 'prompt_embeddings')")
        prompt = tensors.get("prompt_embeddings")
    else:
        raise ConfigError(f"{path}: no adapter folder or .safetensors file there")
    if prompt is None or prompt.dim() != 2:
        raise ConfigError(f"{path}: expected one (p, d) tensor 'prompt_embeddings'")
    if d is not None and prompt.shape[1] != d:
        raise ConfigError(f"{path}: prompt tokens have size {prompt.shape[1]}; this model's embeddings have "
                          f"{d} (the prompt was trained on another base)")
    return prompt.detach().clone()


def _text_ids(cfg: PromptTuningConfig) -> list[int]:
    """The tokens of `init_text`, repeated or cut to p (as HF PEFT's TEXT init)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    ids = tokenizer(cfg.init_text)["input_ids"]
    if not ids:
        raise ValueError(f"init_text={cfg.init_text!r} tokenizes to no tokens")
    p = cfg.num_virtual_tokens
    return (ids * math.ceil(p / len(ids)))[:p]


@register
class PromptTuningMethod(Method):
    name, config, shape = "prompt_tuning", PromptTuningConfig, "input"
    category, params, paper = "additive", "num_virtual_tokens*d_model", "arXiv:2104.08691"
    mergeable, peft_type = False, "PROMPT_TUNING"
    module_prefix = PEFT_SHORT_PREFIX
    tensor_keys = {"embedding": "prompt_embeddings"}

    def build_input(self, model: nn.Module, cfg: PromptTuningConfig, init: bool = True) -> SoftPrompt:
        return SoftPrompt(model, cfg, init)

    def to_peft(self, cfg: PromptTuningConfig, ctx: PeftContext) -> dict[str, Any]:
        return {
            **prompt_learning_fields(ctx, "PROMPT_TUNING", cfg.num_virtual_tokens),
            "prompt_tuning_init": _PEFT_INITS.get(cfg.init, "RANDOM"),  # PEFT loads the file's prompt as it is
            "prompt_tuning_init_text": cfg.init_text,
            "tokenizer_name_or_path": cfg.tokenizer,
            "tokenizer_kwargs": None,
        }

    def from_peft(self, data: dict[str, Any]) -> PromptTuningConfig:
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise NotImplementedError("prompt tuning of encoder-decoder models (num_transformer_submodules=2) "
                                      "is not implemented")
        init = {v: k for k, v in _PEFT_INITS.items()}.get(str(data.get("prompt_tuning_init", "RANDOM")), "random")
        return config_from_dict({"method": "prompt_tuning", "num_virtual_tokens": int(data["num_virtual_tokens"]),
                                 "init": "random" if init == "text" else init,
                                 "modules_to_save": data.get("modules_to_save")})


def prompt_learning_fields(ctx: PeftContext, peft_type: str, num_virtual_tokens: int) -> dict[str, Any]:
    """The adapter_config.json fields HF PEFT's prompt-learning configs share (prompt tuning, P-tuning, prefix).

    Raises:
        NotImplementedError: no task type, or a classifier without its head in modules_to_save.
    """
    if ctx.task_type is None or (ctx.task_type in ("SEQ_CLS", "TOKEN_CLS") and not ctx.modules_to_save):
        raise NotImplementedError(
            f"format='peft' for {peft_type} on a {type(ctx.model).__name__}: HF PEFT applies prompts only "
            "for a known task type, and for classifiers expects the head in modules_to_save "
            "(e.g. modules_to_save=['classifier'])")
    text = _text_config(ctx.model)
    return {
        **ctx.common(peft_type),
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": _input_embeddings(ctx.model).embedding_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": _first(text, "num_attention_heads", "n_head"),
        "num_layers": _first(text, "num_hidden_layers", "n_layer"),
        "modules_to_save": ctx.modules_to_save,
    }


def _text_config(model: nn.Module | None) -> Any:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None
