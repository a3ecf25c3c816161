"""Text generation with saved adapters; several adapters run as one mixed batch (one per row)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.train.errors import TrainConfigError


def base_model_name(adapter_dir: Path) -> str:
    """The base model of an adapter: its run's config, else the path recorded in adapter_config.json."""
    for cfg_path in (adapter_dir.parent / "config.yaml", adapter_dir.parent.parent.parent / "config.yaml"):
        if cfg_path.exists():
            import yaml

            return (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {}).get("name", "smollm2")
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    name = raw.get("base_model_name_or_path")
    if not name:
        raise TrainConfigError(f"{adapter_dir}: the adapter does not record its base model; pass --model")
    return name


@torch.no_grad()
def generate(adapter_dir: str | Path, prompts: list[str], model: str | None = None,
             adapters: list[str] | None = None, max_new_tokens: int = 64, chat: bool = True,
             system: str | None = None) -> list[tuple[str, str | None, str]]:
    """Greedy completions of each prompt under each adapter; returns (prompt, adapter, text) triples.

    Args:
        adapters: adapter names to compare ("base" = no adapter); default: the active adapter.
    """
    import slimtune as st
    from slimtune.train.models import load_base_model, load_tokenizer

    adapter_dir = Path(adapter_dir)
    name = model or base_model_name(adapter_dir)
    tok = load_tokenizer(name)
    tuned = st.load(load_base_model(name, "causal_lm"), adapter_dir).eval()
    routes = [None if a in ("base", "none") else a for a in (adapters or [tuned.active[0]])]
    rows = [(p, r) for p in prompts for r in routes]
    texts = []
    for p, _ in rows:
        if chat and getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(p)
    tok.padding_side = "left"  # generation continues from the right edge
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
    if adapters:
        kwargs["adapter_names"] = [r for _, r in rows]
    out = tuned.generate(**enc, **kwargs)
    width = enc["input_ids"].shape[1]
    return [(p, r, tok.decode(o[width:], skip_special_tokens=True).strip())
            for (p, r), o in zip(rows, out, strict=True)]
