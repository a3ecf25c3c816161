"""Which modules a config attaches to (what can be wrapped at all is slimtune/bases.py's registry)."""

from __future__ import annotations

import re

from torch import nn

from slimtune.bases import base_kind
from slimtune.config import MethodConfig
from slimtune.errors import TargetNotFoundError, did_you_mean

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)(?:\.|$)")
_REGEX_CHARS = set("^$*+?()[]{}|\\")


def layer_index(name: str) -> int | None:
    """The transformer-block index in a module name ('model.layers.3.mlp' -> 3), if any."""
    m = _LAYER_INDEX.search("." + name)
    return int(m[1]) if m else None


def matches(name: str, pattern: str | list[str]) -> bool:
    """Whether module `name` is picked by `pattern` (suffixes, one regex, or one suffix)."""
    if isinstance(pattern, str):
        if _REGEX_CHARS & set(pattern) or "." in pattern.strip("."):
            return re.fullmatch(pattern, name) is not None or name.endswith("." + pattern) or name == pattern
        pattern = [pattern]
    return any(name == p or name.endswith("." + p) for p in pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) that produce the output logits (never hit by 'all-linear')."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "embed_out")}


def find_targets(model: nn.Module, cfg: MethodConfig, skip: set[str] = frozenset()) -> list[str]:
    """Names of the modules `cfg` attaches to, in model order.

    Raises:
        TargetNotFoundError: nothing matched; the message lists near matches and what is wrappable.
    """
    if cfg.targets is None:
        raise TargetNotFoundError(f"{type(cfg).__name__}.targets is not set: give module names or 'all-linear'")
    candidates = [(n, m) for n, m in base_modules(model) if base_kind(m) is not None and n not in skip]
    if cfg.targets == "all-linear":
        heads = output_head_names(model) | set(skip)
        chosen = [n for n, m in candidates if base_kind(m).linear and n not in heads and not _under_any(n, heads)]
        chosen = narrow(chosen, cfg, by_targets=False)  # "all-linear" chose them
    else:
        chosen = narrow([n for n, _ in candidates], cfg)
    if not chosen:
        raise TargetNotFoundError(_no_match_message(model, cfg, [n for n, _ in candidates]))
    return chosen


def narrow(names: list[str], cfg: MethodConfig, match=matches, by_targets: bool = True) -> list[str]:
    """`names` kept by `cfg.targets` (None: all; skipped with by_targets=False), `cfg.exclude` and `cfg.layers`.

    `match(name, pattern)` decides targets and exclude (default: `matches`; selective methods pass one that
    also looks at the modules above a tensor name).
    """
    chosen = [n for n in names if not by_targets or cfg.targets is None or match(n, cfg.targets)]
    if cfg.exclude:
        chosen = [n for n in chosen if not match(n, cfg.exclude)]
    if cfg.layers is not None:
        chosen = [n for n in chosen if layer_index(n) in cfg.layers]
    return chosen


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the base model as if unwrapped: an AdapterLayer stands for its base layer;
    anything inside a slimtune wrapper (adapters, saved copies) is skipped."""
    from slimtune.layer import AdapterLayer, SavedModule

    out, inside = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, (AdapterLayer, SavedModule)):
            inside.append(name)
            module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
        out.append((name, module))
    return out


def _under_any(name: str, parents: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in parents)


def _no_match_message(model: nn.Module, cfg: MethodConfig, names: list[str]) -> str:
    leaves = sorted({n.split(".")[-1] for n in names})
    wanted = cfg.targets if isinstance(cfg.targets, list) else [cfg.targets]
    hints = "".join(did_you_mean(w, leaves) for w in wanted)
    where = f" in layers {cfg.layers}" if cfg.layers is not None else ""
    return (
        f"{type(cfg).__name__}.targets={cfg.targets!r} matched no module{where} in {type(model).__name__}.\n"
        f"  expected a module-name suffix, a regex, or 'all-linear'.{hints}\n"
        f"  wrappable modules here: {', '.join(leaves) or '(none)'}"
    )
