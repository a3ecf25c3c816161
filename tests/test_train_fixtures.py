"""Helpers for the training tests: a byte-level tokenizer with a ChatML template, tiny model folders.

Nothing here downloads: the tokenizer is built in memory from the 256 byte symbols.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat_template: bool = True) -> transformers.PreTrainedTokenizerFast:
    """One token per byte plus <|im_start|>, <|im_end|>, <pad> (259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<pad>", bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_llama_dir(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama (vocab 1000) and the byte tokenizer to ``path``."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=1000)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=1000)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    byte_tokenizer(chat_template=False).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())}
            for _ in range(n)]


def labelled_rows(n: int) -> list[dict]:
    """Texts whose label is decided by their first word (learnable by a tiny model)."""
    rows = []
    for i in range(n):
        label = ["red", "green", "blue"][i % 3]
        rows.append({"text": f"{label[0]}{label} item {i} {WORDS[i % len(WORDS)]}", "label": label})
    return rows
