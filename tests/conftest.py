"""Tiny randomly initialised models built from configs: milliseconds each, nothing downloaded."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

VOCAB = 1000


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=VOCAB)
    cfg = transformers.LlamaConfig(**{**shape, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=VOCAB, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def output(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, VOCAB, (3, 10))


def randomize(model, scale: float = 0.1, seed: int = 1) -> None:
    """Make adapter tensors non-trivial so merge / save checks cannot pass because B = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and not name.endswith(".m"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def fit(model, data: torch.Tensor, steps: int, lr: float, weight_decay: float = 0.01) -> list[float]:
    """Causal-LM losses of `steps` AdamW steps on one fixed batch (labels = inputs), with `model.step()`
    after every optimizer step and before zero_grad, as a plain training loop calls it."""
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        model.step(step, opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_rows_match_alone(model, batch: torch.Tensor, names: list, atol: float = 1e-5,
                            task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Row i of a mixed batch (`adapter_names=names`) equals row i run alone with its adapter (None: base);
    `task_ids`, when given, go with the mixed batch and each adapter row gets its own."""
    ids = {} if task_ids is None else {"task_ids": task_ids}
    mixed = output(model, batch, adapter_names=names, **ids)
    for i, name in enumerate(names):
        if name is None:
            with model.disabled():
                alone = output(model, batch[i:i + 1])
        else:
            alone = output(model.use(name), batch[i:i + 1], **{k: v[i:i + 1] for k, v in ids.items()})
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=atol, rtol=1e-4)
    return mixed
