"""Quantized bases: nf4 / fp4 / int8 Linear layers that every layer method adapts unchanged (QLoRA), LoftQ, and
group-wise asymmetric int2 / int3 / int4 / int8g Linear layers (QA-LoRA's and PEQA's base).

Importing this package registers three base kinds: slimtune's `QuantLinear` and `GroupQuantLinear`, and
bitsandbytes' `Linear4bit` (as transformers' `BitsAndBytesConfig(load_in_4bit=True)` loads it). bitsandbytes is
optional: the formats are pure torch (formats.py, identical to bitsandbytes' layout; groupwise.py).
See docs/quantization.md.
"""

from slimtune.quant import bnb as _bnb  # noqa: F401  (registers the bitsandbytes Linear4bit kind)
from slimtune.quant.api import (
    FORMAT_NAMES,
    bits_per_parameter,
    dequantize,
    loftq_report,
    merge_errors,
    quantize,
)
from slimtune.quant.group_linear import GroupQuantLinear
from slimtune.quant.linear import MergeError, QuantLinear
from slimtune.quant.loftq import LoftqError, loftq, loftq_errors

__all__ = ["FORMAT_NAMES", "GroupQuantLinear", "LoftqError", "MergeError", "QuantLinear", "bits_per_parameter",
           "dequantize", "loftq", "loftq_errors", "loftq_report", "merge_errors", "quantize"]
