"""st.quantize / st.dequantize: swap a model's Linear layers for quantized ones and back, in place.

    st.quantize(model, "nf4")                        # QLoRA's base: nf4, blocks of 64, double-quantised absmax
    tuned = st.attach(model, st.LoraConfig(r=16, targets="all-linear"))
    st.quantize(model, "nf4", loftq_rank=16, loftq_iter=5)   # LoftQ base; then LoraConfig(r=16, init="loftq")
    st.quantize(model, "int4", group_size=64)        # group-wise asymmetric INT4 (QA-LoRA's and PEQA's base)
    st.dequantize(tuned)                             # float Linear layers again (exact merge / export)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from slimtune.bases import base_kind
from slimtune.errors import ConfigError, did_you_mean
from slimtune.layer import base_name
from slimtune.quant import formats
from slimtune.quant.group_linear import GroupQuantLinear
from slimtune.quant.groupwise import DEFAULT_GROUP_SIZE, GROUP_FORMATS
from slimtune.quant.linear import MergeError, QuantLinear, check_format
from slimtune.targets import matches, output_head_names

_HEADS = ("lm_head", "embed_out", "score", "classifier")  # output heads stay in float (QLoRA keeps lm_head)
FORMAT_NAMES = (*formats.FORMATS, *GROUP_FORMATS)  # every format st.quantize accepts
_QUANTIZED_KINDS = ("quant_linear", "bnb_linear4bit", "group_quant_linear")


def quantize(model: nn.Module, fmt: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype | None = None,
             skip: Iterable[str] = (), block_size: int = 64, *, group_size: int | None = None,
             loftq_rank: int | None = None, loftq_iter: int = 1) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear (nf4, fp4, int8) or GroupQuantLinear
    (int2, int3, int4, int8g) whose weight stays quantized.

    The output head (`get_output_embeddings()`, or a module named lm_head / score / classifier) and
    modules named in `skip` stay float. Works on a TunedModel too (wrapped base layers are quantized).

    Args:
        fmt: "nf4" (QLoRA), "fp4", "int8" (per-row absmax), or group-wise asymmetric "int2" / "int3" /
            "int4" / "int8g" (a float scale and zero per group of input columns: QA-LoRA's and PEQA's base).
        double_quant: quantize the 4-bit block scales to 8 bits (blocks of 256): 4.127 instead of 4.5 bits
            (nf4 / fp4 only).
        compute_dtype: dtype the weight is dequantized to for matmuls (default: each layer's weight dtype).
        skip: module-name suffixes or a regex (as LoraConfig.targets) of Linear layers to keep in float.
        block_size: weights per 4-bit scale (bitsandbytes' sizes: 32 ... 4096), nf4 / fp4 only.
        group_size: input columns per scale and zero for the int2/int3/int4/int8g formats (default 64; it must
            divide every quantized layer's in_features); -1: one group per output row (per-channel).
        loftq_rank: run LoftQ (arXiv:2310.08659) per layer for LoRA rank r; attach with
            LoraConfig(r=loftq_rank, init="loftq") afterwards.
        loftq_iter: LoftQ's alternating steps T.
    Returns:
        `model`, quantized in place.
    Raises:
        ConfigError: an unknown format, block or group size, or nothing to quantize.
    """
    group_size = _check_args(fmt, block_size, group_size, loftq_rank)
    if loftq_rank is not None and not (isinstance(loftq_rank, int) and loftq_rank >= 1):
        raise ConfigError(f"quantize: loftq_rank={loftq_rank!r}; expected an int >= 1 (the LoRA rank), or None")
    names = _linear_names(model, list(skip) if not isinstance(skip, str) else [skip])
    if not names:
        raise ConfigError(f"quantize: {type(model).__name__} has no nn.Linear layer to quantize "
                          "(outside its output head and `skip`)")
    for name in names:
        linear = model.get_submodule(name)
        try:
            if fmt in GROUP_FORMATS:
                q = GroupQuantLinear.from_linear(linear, GROUP_FORMATS[fmt], group_size, compute_dtype)
            else:
                q = _quantized(linear, fmt, double_quant, compute_dtype, block_size, loftq_rank, loftq_iter)
        except ValueError as e:
            raise ConfigError(f"quantize: {name} ({linear.out_features} x {linear.in_features}): {e}") from None
        _replace(model, name, q)
    return model


def _check_args(fmt: str, block_size: int, group_size: int | None, loftq_rank: int | None) -> int | None:
    """Refuse unknown formats and options that do not apply to `fmt`; the group size to use (int formats)."""
    if fmt not in FORMAT_NAMES:
        raise ConfigError(f"quantize: format {fmt!r} is not known; expected one of {list(FORMAT_NAMES)}."
                          + did_you_mean(str(fmt), FORMAT_NAMES))
    if fmt not in GROUP_FORMATS:
        check_format(fmt, block_size)
        if group_size is not None:
            raise ConfigError(f"quantize: group_size={group_size!r} applies to the group-wise formats "
                              f"{list(GROUP_FORMATS)}; {fmt} uses block_size (now {block_size})")
        return None
    if block_size != 64:
        raise ConfigError(f"quantize: block_size={block_size!r} applies to nf4 / fp4; {fmt} uses group_size")
    if loftq_rank is not None:
        raise ConfigError(f"quantize: loftq_rank={loftq_rank!r} with {fmt}: LoftQ is implemented for nf4, fp4 "
                          "and int8 bases only")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if not (isinstance(group_size, int) and not isinstance(group_size, bool) and (group_size >= 1 or group_size == -1)):
        raise ConfigError(f"quantize: group_size={group_size!r}; expected an int >= 1 that divides in_features "
                          "(e.g. 64, 128), or -1 for one group per output row")
    return group_size


def _quantized(linear: nn.Linear, fmt: str, double_quant: bool, compute_dtype: torch.dtype | None, block_size: int,
               loftq_rank: int | None, loftq_iter: int) -> nn.Module:
    if loftq_rank is None:
        return QuantLinear.from_linear(linear, fmt, block_size, double_quant, compute_dtype)
    from slimtune.quant.loftq import loftq_linear

    return loftq_linear(linear, loftq_rank, fmt, loftq_iter, block_size, double_quant, compute_dtype)


def _linear_names(model: nn.Module, skip: list[str]) -> list[str]:
    """Full names of the plain nn.Linear modules to quantize (heads, `skip` and saved copies left out)."""
    heads = output_head_names(model)
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in heads:  # subclasses (MultiheadAttention's out_proj) left alone
            continue
        plain = base_name(name)
        if plain.split(".")[-1] in _HEADS or ".modules_to_save." in name or ".original_module" in name:
            continue
        if skip and matches(plain, skip if len(skip) > 1 else skip[0]):
            continue
        out.append(name)
    return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized Linear (QuantLinear, GroupQuantLinear, bitsandbytes Linear4bit) by an nn.Linear
    holding its dequantized weight, in `dtype` (default: the layer's compute dtype). In place; returns `model`.

    Do this before `merge()` / `detach(merge=True)` for an exact merge, or to export a float model."""
    for name, module in list(model.named_modules()):
        kind = base_kind(module)
        if kind is None or kind.name not in _QUANTIZED_KINDS:
            continue
        W = kind.weight(module)
        target = dtype or kind.adapter_dtype(module)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=W.device, dtype=target)
        linear.weight.copy_(W)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        _replace(model, name, linear)
    return model


def merge_errors(model: nn.Module) -> dict[str, MergeError]:
    """{module name: MergeError(weight, update)} of the last write into each quantized layer: a merge into a
    4-bit base re-quantizes W' = W + delta; `weight` is the rounding relative to ||W'||, `update` relative
    to ||delta|| (near 1: the merged update was mostly rounded away)."""
    return {name: m.merge_error for name, m in model.named_modules() if getattr(m, "merge_error", None) is not None}


def bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per weight entry over all QuantLinear / GroupQuantLinear layers of `model` (codes, scales,
    zeros)."""
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, GroupQuantLinear))]
    if not layers:
        raise ConfigError(f"bits_per_parameter: {type(model).__name__} has no QuantLinear or GroupQuantLinear layer")
    bits = sum(m.bits_per_parameter() * m.in_features * m.out_features for m in layers)
    return bits / sum(m.in_features * m.out_features for m in layers)


def loftq_report(model: nn.Module) -> dict[str, tuple[float, float]]:
    """{module name: (LoftQ error, plain-quantization error)}, relative to ||W||, for layers quantized with LoftQ."""
    return {name: tuple(m.loftq_error) for name, m in model.named_modules() if hasattr(m, "loftq_error")}
