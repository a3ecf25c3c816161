"""Quantized bases: nf4 / fp4 / int8 Linear layers that every layer method adapts unchanged (QLoRA), and LoftQ.

Importing this package registers two base kinds: slimtune's `QuantLinear` and bitsandbytes' `Linear4bit`
(as transformers' `BitsAndBytesConfig(load_in_4bit=True)` loads it). bitsandbytes is optional: the
formats are pure torch (formats.py), identical to bitsandbytes' layout. See docs/quantization.md.
"""

from slimtune.quant import bnb as _bnb  # noqa: F401  (registers the bitsandbytes Linear4bit kind)
from slimtune.quant.api import bits_per_parameter, dequantize, loftq_report, merge_errors, quantize
from slimtune.quant.linear import MergeError, QuantLinear
from slimtune.quant.loftq import LoftqError, loftq, loftq_errors

__all__ = ["LoftqError", "MergeError", "QuantLinear", "bits_per_parameter", "dequantize", "loftq", "loftq_errors",
           "loftq_report", "merge_errors", "quantize"]
