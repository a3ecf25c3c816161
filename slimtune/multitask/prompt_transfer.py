"""SPoT (Vu et al. 2022, ACL, arXiv:2110.07904): soft prompt transfer, and prompts as task embeddings.

Transfer: train a prompt on a source task, then start the target task's prompt from it:

    st.attach(base, st.PromptTuningConfig(num_virtual_tokens=p, init="prompt", init_from="runs/source"))
    spot_init(model, "runs/source")          # the same, p read from the source; or from an attached adapter

Transferability: a prompt's tokens e_1..e_L serve as the task's embedding; SPoT's two similarities are

    "average":   cos( (1/L1) Σ_i e¹_i , (1/L2) Σ_j e²_j )                 cosine similarity of average tokens
    "per_token": (1/(L1·L2)) Σ_i Σ_j cos(e¹_i, e²_j)                       per-token average cosine similarity

(every token pair: prompt tokens have no order to align). `prompt_similarity(a, b)` computes either
("average" by default); `rank_sources(target, sources)` orders candidate source prompts by it, as SPoT's
retrieval does with a target prompt trained briefly on the target task.

A prompt here is a prompt-tuning or P-tuning adapter: its folder (ours or HF PEFT's), a .safetensors file,
the name of one attached to a `TunedModel` (its current prompt, P-tuning's encoder output), or a (p, d) tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import AdapterNameError, ConfigError, did_you_mean
from slimtune.methods.prompt_tuning import PromptTuningConfig, read_prompt
from slimtune.tuned import TunedModel

PromptLike = str | Path | Tensor
SIMILARITIES = ("average", "per_token")
_PROMPT_METHODS = ("prompt_tuning", "p_tuning")


def prompt_of(source: PromptLike, model: TunedModel | None = None) -> Tensor:
    """The (p, d) prompt of `source`: a tensor, the name of a prompt adapter attached to `model`, or a saved
    prompt adapter (folder or .safetensors file). Detached, float32.

    Raises:
        AdapterNameError: a name that is neither attached to `model` nor a path.
        ConfigError: an attached adapter of another method, or a file that holds no single prompt.
    """
    if isinstance(source, Tensor):
        if source.dim() != 2:
            raise ConfigError(f"a prompt tensor of shape {tuple(source.shape)}: expected (p, d)")
        return source.detach().float()
    if model is not None and isinstance(source, str) and source in model.configs:
        method = model.configs[source].method
        if method not in _PROMPT_METHODS:
            raise ConfigError(f"adapter {source!r} is a {method!r} adapter; expected a prompt_tuning or p_tuning "
                              "adapter (one soft prompt)")
        with torch.no_grad():
            return model.inputs[source].virtual_tokens().detach().float()
    if not Path(source).exists():
        names = list(model.configs) if model is not None else []
        raise AdapterNameError(f"{str(source)!r} is neither a saved prompt adapter nor an adapter attached to the "
                               f"model (attached: {names})." + did_you_mean(str(source), names))
    return read_prompt(source).float()


def prompt_similarity(a: PromptLike, b: PromptLike, model: TunedModel | None = None, how: str = "average") -> float:
    """SPoT's task similarity of two prompts (their token counts may differ, not their size d).

    Args:
        how: "average" (cosine of the mean-pooled prompts) or "per_token" (mean cosine over every token pair).
    """
    if how not in SIMILARITIES:
        raise ConfigError(f"how={how!r}: expected 'average' or 'per_token'" + did_you_mean(how, SIMILARITIES))
    pa = prompt_of(a, model)
    pb = prompt_of(b, model).to(pa.device)
    if pa.shape[1] != pb.shape[1]:
        raise ConfigError(f"prompts of token size {pa.shape[1]} and {pb.shape[1]}: they come from different bases")
    if how == "average":
        return float(F.cosine_similarity(pa.mean(0), pb.mean(0), dim=0))
    return float((F.normalize(pa, dim=1) @ F.normalize(pb, dim=1).T).mean())


def rank_sources(target: PromptLike, sources: Iterable[PromptLike] | Mapping[str, PromptLike],
                 model: TunedModel | None = None, how: str = "average") -> list[tuple[str, float]]:
    """(source, similarity to `target`) for every source, most similar first: SPoT's retrieval of the source
    tasks likely to transfer best. `sources`: a list (named by their path or adapter name; tensors by
    position) or a mapping name -> prompt."""
    named = dict(sources) if isinstance(sources, Mapping) else {
        (f"#{i}" if isinstance(s, Tensor) else str(s)): s for i, s in enumerate(sources)}
    if not named:
        raise ConfigError("rank_sources: no sources given")
    scores = {name: prompt_similarity(target, s, model, how) for name, s in named.items()}
    return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def spot_init(model: TunedModel | nn.Module, source: PromptLike, name: str = "default", **config) -> TunedModel:
    """Attach a prompt-tuning adapter `name` whose prompt starts as a copy of `source` (SPoT's transfer).

    `source`: a saved prompt adapter (then the config says init="prompt", init_from=source), an adapter
    attached to `model` or a tensor (copied in after the adapter is built). num_virtual_tokens defaults to
    the source's length; other PromptTuningConfig fields go in `config`. As `add`, the new adapter becomes
    active only if none is; a plain base model is wrapped (as st.attach does).
    """
    model = model if isinstance(model, TunedModel) else TunedModel(model)
    prompt = prompt_of(source, model)
    p = config.pop("num_virtual_tokens", prompt.shape[0])
    saved = not isinstance(source, Tensor) and str(source) not in model.configs
    cfg = PromptTuningConfig(num_virtual_tokens=p, init="prompt" if saved else "random",
                             init_from=str(source) if saved else None, **config)
    if not saved and p != prompt.shape[0]:
        raise ConfigError(f"spot_init: the source prompt has {prompt.shape[0]} tokens; num_virtual_tokens={p}")
    model.add(cfg, name)
    if not saved:
        with torch.no_grad():
            embedding = model.inputs[name].embedding
            embedding.copy_(prompt.to(embedding))
    return model


__all__ = ["SIMILARITIES", "prompt_of", "prompt_similarity", "rank_sources", "spot_init"]
