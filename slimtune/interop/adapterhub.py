"""AdapterHub (`adapters` 1.x) adapter folders -> slimtune adapter folders.

    from slimtune.interop.adapterhub import convert_adapterhub
    convert_adapterhub("ah/sentiment", "st/sentiment")          # or: slimtune convert ah/sentiment --out st/sentiment
    model = st.load(base, "st/sentiment")                        # AdapterHub's outputs on the same input

A folder written by AdapterHub's `save_adapter()` holds `adapter_config.json` (its config under "config", plus
model_type / model_class / name / version) and the weights as `adapter.safetensors` (use_safetensors=True) or
`pytorch_adapter.bin` (torch.save, the default). The latter is read with `torch.load(weights_only=True)`: plain
tensors only, a pickle that would run code is refused before anything runs. Head files (`head_config.json`,
`model_head.safetensors` / `pytorch_model_head.bin`) are not converted.

Converted: bottleneck adapters (SeqBn / Pfeiffer, DoubleSeqBn / Houlsby, ParBn and the BnConfig fields our
`bottleneck` method expresses), Compacter and Compacter++ (`compacter`), prefix tuning (`prefix_tuning`), on
Llama / Mistral, GPT-2 and BERT-family models. Anything else is refused with a ConfigError naming the AdapterHub
field and value. Field mapping and refusals: docs/interop_adapterhub.md.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune import __version__
from slimtune.config import MethodConfig
from slimtune.errors import AdapterLoadError, ConfigError
from slimtune.io import read_safetensors, write_adapter_dir
from slimtune.methods.adapters import ATTENTION_OUT, BottleneckConfig, placement_targets
from slimtune.methods.base import PEFT_PREFIX
from slimtune.methods.compacter import CompacterConfig
from slimtune.methods.prefix_tuning import PrefixTuningConfig

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
WEIGHTS_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_FILES = ("model_head.safetensors", "pytorch_model_head.bin")

# model_type -> (attention output, FFN output) inside a block: the modules our adapters wrap
SUBLAYER_OUTPUTS = {
    **dict.fromkeys(("llama", "mistral"), ("self_attn.o_proj", "mlp.down_proj")),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("attention.output.dense", "output.dense")),
}
# AdapterHub's bottleneck modules inside a block -> the sublayer they follow (0: attention, 1: FFN)
LOCATIONS = {"attention_adapters": 0, "output_adapters": 1, "attention.output": 0, "output": 1}
ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}
PREFIX_ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu}
INITS = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "mam"}
_OUR_TENSOR = re.compile(r"(.+?)\.((?:down|up|ln_before|ln_after)\.\w+|scale)")  # (module, tensor) of our keys


@dataclass
class Converted:
    """What `convert_adapterhub` wrote."""

    path: Path
    config: MethodConfig
    source: str  # the AdapterHub weights file read
    tensors: int
    notes: list[str] = field(default_factory=list)  # what was not converted or is ignored, one line each


def convert_adapterhub(src: str | Path, out: str | Path, *, base: str | Path | nn.Module | None = None
                       ) -> Converted:
    """Convert the AdapterHub adapter folder `src` into a slimtune adapter folder `out`.

    Args:
        base: optional base model (a folder `from_pretrained` reads, or a model): module names are matched to
            it (an adapter saved from a bare `BertModel` loads into `BertForSequenceClassification`), its
            fingerprint is recorded, and the result is test-loaded before anything is written.
    Raises:
        AdapterLoadError: missing or unreadable files, a pickle holding anything but tensors.
        ConfigError: an AdapterHub config our methods cannot express (the message names the field and value).
    """
    src = Path(src)
    raw = read_config(src)
    ah, model_type = raw["config"], raw.get("model_type")
    tensors, source = read_tensors(src)
    name = _adapter_name(raw, tensors, src)
    notes = _head_notes(src)
    arch = ah.get("architecture")
    if arch is None:
        family = _family(model_type)
        if ah.get("phm_layer"):
            cfg, out_tensors = _compacter(ah, family, name, tensors, notes)
        else:
            cfg, out_tensors = _bottleneck(ah, family, name, tensors, notes)
    elif arch == "prefix_tuning":
        cfg, out_tensors = _prefix(ah, name, tensors, notes)
    else:
        raise ConfigError(f"AdapterHub architecture={arch!r} cannot be converted: slimtune converts bottleneck "
                          "adapters (architecture=None: SeqBn, DoubleSeqBn, ParBn, Compacter) and prefix_tuning"
                          + (" (a ConfigUnion such as MAMConfig or UniPELTConfig: convert its parts separately)"
                             if arch == "union" else ""))
    model_class = raw.get("model_class")
    if model_class and model_class.endswith("AdapterModel"):
        notes.append(f"model_class={model_class!r} is AdapterHub's own flex-head class: no base_model_class is "
                     "recorded (load the adapter into the matching transformers model)")
        model_class = None
    config = {
        "slimtune_version": __version__,
        "config": cfg.to_dict(),
        "base_model_class": model_class or None,
        "base_model_name_or_path": raw.get("model_name") or None,
        "converted_from": {"format": "adapterhub", "version": raw.get("version"), "name": name,
                           "model_type": model_type, "file": source},
    }
    if base is not None:
        out_tensors, config = _fit_to_base(base, out_tensors, config)
    path = write_adapter_dir(out, config, out_tensors)
    return Converted(path, cfg, source, len(out_tensors), notes)


# -- files ---------------------------------------------------------------------------------------------------------
def read_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise AdapterLoadError(f"{src}: no such AdapterHub adapter folder")
    path = src / CONFIG_NAME
    if not path.exists():
        fusion = " (an AdapterFusion folder: fusion layers are not converted)" if (
            src / "adapter_fusion_config.json").exists() else ""
        raise AdapterLoadError(f"{src}: {CONFIG_NAME} not found{fusion}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: invalid JSON ({e})") from None
    if isinstance(raw, dict) and ("slimtune_version" in raw or "peft_type" in raw):
        raise AdapterLoadError(f"{src}: already a {'slimtune' if 'slimtune_version' in raw else 'HF PEFT'} adapter; "
                               "load it with st.load, nothing to convert")
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        got = type(raw.get("config")).__name__ if isinstance(raw, dict) else type(raw).__name__
        raise AdapterLoadError(f"{path}: not an AdapterHub adapter config (expected the adapter's config as a "
                               f"mapping under 'config', as save_adapter() writes; got {got})")
    return raw


def read_tensors(src: Path) -> tuple[dict[str, Tensor], str]:
    """AdapterHub's weights: safetensors if present, else the pickle read with weights_only=True."""
    if (src / SAFE_WEIGHTS_NAME).exists():
        return read_safetensors(src / SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME
    path = src / WEIGHTS_NAME
    if not path.exists():
        raise AdapterLoadError(f"{src}: neither {SAFE_WEIGHTS_NAME} nor {WEIGHTS_NAME} found")
    try:  # weights_only: tensors and plain containers only; any other global is refused before it runs
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure means the same: not a plain tensor file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterLoadError(f"{path}: refused: not a plain tensor file (read with torch.load(weights_only=True), "
                               f"which loads tensors only and runs no code): {reason}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise AdapterLoadError(f"{path}: refused: expected a mapping of names to tensors, got "
                               f"{type(data).__name__}")
    return data, WEIGHTS_NAME


def _adapter_name(raw: dict[str, Any], tensors: dict[str, Tensor], src: Path) -> str:
    found = {m[1] for k in tensors for m in [re.search(r"(?:\.adapters|prefix_tunings|shared_parameters)\.([^.]+)\.",
                                                      "." + k)] if m}
    if raw.get("name") in found:
        return raw["name"]
    if len(found) == 1:
        return found.pop()
    raise AdapterLoadError(f"{src}: cannot tell the adapter's name from its tensors (config name "
                           f"{raw.get('name')!r}, tensors name {sorted(found) or 'none'})")


def _head_notes(src: Path) -> list[str]:
    path = src / HEAD_CONFIG_NAME
    if not path.exists():
        return []
    try:
        head = json.loads(path.read_text())
    except json.JSONDecodeError:
        head = {}
    files = ", ".join(p for p in (HEAD_CONFIG_NAME, *HEAD_FILES) if (src / p).exists())
    if isinstance(head, dict) and head.get("config") is None:
        return [f"head files ({files}) hold the model's own output head (config null): not converted, the base "
                "model has it"]
    kind = head.get("config", {}).get("head_type") if isinstance(head, dict) else None
    return [f"AdapterHub prediction head ({kind or 'unknown type'}; {files}) not converted: it has no transformers "
            "counterpart; the adapter runs with the base model's own head"]


# -- config checks -----------------------------------------------------------------------------------------------
def _refuse(field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"AdapterHub {field_name}={value!r} cannot be converted: {why}")


def _require(ah: dict[str, Any], field_name: str, ok: Any, why: str, default: Any = None) -> None:
    value = ah.get(field_name, default)
    if not (ok(value) if callable(ok) else value == ok):
        raise _refuse(field_name, value, why)


def _family(model_type: str | None) -> tuple[str, str]:
    if model_type not in SUBLAYER_OUTPUTS:
        raise _refuse("model_type", model_type, f"bottleneck adapters convert for {', '.join(SUBLAYER_OUTPUTS)} "
                      "models (the families whose sublayer outputs slimtune's adapters wrap)")
    return SUBLAYER_OUTPUTS[model_type]


def _common_bottleneck_checks(ah: dict[str, Any], notes: list[str]) -> None:
    _require(ah, "original_ln_after", True, "slimtune's adapters sit before the sublayer's residual add and the "
             "block's own LayerNorm, which always follow them", default=True)
    _require(ah, "use_gating", False, "gated adapters (UniPELT's gate) have no slimtune bottleneck counterpart",
             default=False)
    _require(ah, "inv_adapter", None, "invertible adapters on the embeddings have no slimtune counterpart")
    _require(ah, "cross_adapter", False, "cross-attention adapters (encoder-decoder models) are not supported",
             default=False)
    _require(ah, "scaling", lambda v: v == "learned" or (isinstance(v, (int, float)) and not isinstance(v, bool)),
             "scaling='channel' (a learned per-channel vector) has no slimtune counterpart; a number or "
             "'learned' converts", default=1.0)
    if ah.get("is_parallel"):
        ok = lambda v: not v  # noqa: E731
        _require(ah, "adapter_residual_before_ln", ok, "applies to sequential adapters only", default=False)
    _require(ah, "non_linearity", lambda v: isinstance(v, str) and v.lower() in ACTIVATIONS,
             f"slimtune's adapters use {', '.join(sorted(ACTIVATIONS))}")
    if not ah.get("mh_adapter") and not ah.get("output_adapter"):
        raise _refuse("mh_adapter", ah.get("mh_adapter"), "with output_adapter=False too the adapter has no position")
    if ah.get("dropout"):
        notes.append(f"dropout={ah['dropout']} dropped: it acts in training only (eval outputs are unchanged)")
    if ah.get("stochastic_depth"):
        notes.append(f"stochastic_depth={ah['stochastic_depth']} dropped: it acts in training only")
    if ah.get("ln_after") and ah.get("scaling", 1.0) != 1.0:
        raise _refuse("scaling", ah.get("scaling"), "with ln_after=True AdapterHub scales before the adapter's "
                      "LayerNorm, slimtune after it; only scaling=1.0 gives the same outputs")
    if not ah.get("is_parallel"):
        if ah.get("original_ln_before"):
            _require(ah, "residual_before_ln", True, "with original_ln_before=True only residual_before_ln=True "
                     "(the adapter's residual is the sublayer output) matches slimtune's adapters, which add to the "
                     "sublayer output", default=True)
        else:
            _require(ah, "residual_before_ln", lambda v: v in (True, False), "'post_add' needs "
                     "original_ln_before=True (AdapterHub itself fails without it)", default=True)
        if ah.get("ln_after"):
            _require(ah, "adapter_residual_before_ln", False, "a LayerNorm over adapter output + residual has no "
                     "slimtune counterpart (slimtune's ln_after normalises the adapter output alone)", default=False)


def _reduction_factor(ah: dict[str, Any]) -> float:
    rf = ah.get("reduction_factor")
    if isinstance(rf, dict):
        values = set(rf.values())
        if len(values) != 1:
            raise _refuse("reduction_factor", rf, "per-layer reduction factors differ; a slimtune adapter has one")
        rf = values.pop()
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 0:
        raise _refuse("reduction_factor", rf, "expected a number > 0")
    return rf


def _positions(ah: dict[str, Any]) -> tuple[int, ...]:
    return tuple(i for i, on in enumerate((ah.get("mh_adapter"), ah.get("output_adapter"))) if on)


def _targets(positions: tuple[int, ...]) -> str:
    if positions == (0,):
        return rf".*\.(?:{ATTENTION_OUT})"
    return placement_targets("houlsby" if positions == (0, 1) else "pfeiffer")


def _layers(ah: dict[str, Any], modules: list[str]) -> list[int] | None:
    if not ah.get("leave_out"):
        return None
    return sorted({int(m) for name in modules for m in re.findall(r"\.(\d+)\.", "." + name + ".")[:1]})


# -- tensors -----------------------------------------------------------------------------------------------------
def _per_module(tensors: dict[str, Tensor], name: str, family: tuple[str, str]) -> dict[str, dict[str, Tensor]]:
    """{our module name: {AdapterHub tensor name inside the adapter: tensor}} and the shared tensors under ''."""
    locs = "|".join(re.escape(k) for k in LOCATIONS)
    pattern = re.compile(rf"(?P<block>.+?\.\d+)\.(?P<loc>{locs})\.adapters\.{re.escape(name)}\.(?P<rest>.+)")
    shared = re.compile(rf"(?:.*\.)?shared_parameters\.{re.escape(name)}\.(?P<rest>.+)")
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if m:
            module = f"{m['block']}.{family[LOCATIONS[m['loc']]]}"
            out.setdefault(module, {})[m["rest"]] = value
            continue
        s = shared.fullmatch(key)
        if s:
            out.setdefault("", {})[s["rest"]] = value
            continue
        raise AdapterLoadError(f"AdapterHub tensor {key!r} is not part of a bottleneck adapter named {name!r}")
    if not any(out.get(m) for m in out if m):
        raise AdapterLoadError(f"no bottleneck adapter tensors named {name!r} found")
    return out


def _take(found: dict[str, Tensor], mapping: dict[str, str], module: str) -> dict[str, Tensor]:
    """Rename the tensors of one module by `mapping` (AdapterHub name -> ours); duplicates must agree."""
    ours: dict[str, Tensor] = {}
    for theirs, value in found.items():
        if theirs not in mapping:
            raise AdapterLoadError(f"{module}: AdapterHub tensor {theirs!r} has no slimtune counterpart "
                                   f"(expected {', '.join(sorted(mapping))})")
        key = mapping[theirs]
        if key in ours and not torch.equal(ours[key], value):
            raise AdapterLoadError(f"{module}: AdapterHub tensors for {key!r} disagree")
        ours[key] = value
    return ours


def _bottleneck(ah: dict[str, Any], family: tuple[str, str], name: str, tensors: dict[str, Tensor],
                notes: list[str]) -> tuple[BottleneckConfig, dict[str, Tensor]]:
    _common_bottleneck_checks(ah, notes)
    parallel, ln_b, ln_a = bool(ah.get("is_parallel")), bool(ah.get("ln_before")), bool(ah.get("ln_after"))
    reads = "residual" if parallel or ah.get("original_ln_before") else "sublayer"
    positions = _positions(ah)
    per_module = _per_module(tensors, name, family)
    lin = "1" if ln_b else "0"
    mapping = {f"adapter_down.{lin}.weight": "down.weight", f"adapter_down.{lin}.bias": "down.bias",
               "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias"}
    if ln_b:
        mapping.update({f"adapter_{w}.{p}": f"ln_before.{p}" for w in ("norm_before", "down.0") for p in
                        ("weight", "bias")})
    if ln_a:
        mapping.update({f"adapter_norm_after.{p}": f"ln_after.{p}" for p in ("weight", "bias")})
    if ah.get("scaling") == "learned":
        mapping["scaling"] = "scale"
    out = {}
    modules = sorted(m for m in per_module if m)
    for module in modules:
        for key, value in _take(per_module[module], mapping, module).items():
            out[f"{PEFT_PREFIX}{module}.{key}"] = value
    if per_module.get(""):
        raise AdapterLoadError(f"shared tensors {sorted(per_module[''])} belong to no bottleneck adapter")
    placement = "parallel" if parallel else ("houlsby" if positions == (0, 1) else "pfeiffer")
    explicit = parallel or positions == (0,)
    cfg = BottleneckConfig(
        placement=placement, targets=_targets(positions) if explicit else None, reduction_factor=_reduction_factor(ah),
        non_linearity=ACTIVATIONS[ah["non_linearity"].lower()],
        scaling=ah.get("scaling", 1.0) if ah.get("scaling") == "learned" else float(ah.get("scaling", 1.0)),
        init=INITS.get(ah.get("init_weights"), "bert"),
        layer_norm={(False, False): "none", (True, False): "before", (False, True): "after",
                    (True, True): "both"}[ln_b, ln_a],
        reads=reads, layers=_layers(ah, modules))
    return cfg, out


def _compacter(ah: dict[str, Any], family: tuple[str, str], name: str, tensors: dict[str, Tensor],
               notes: list[str]) -> tuple[CompacterConfig, dict[str, Tensor]]:
    _common_bottleneck_checks(ah, notes)
    _require(ah, "is_parallel", False, "slimtune's Compacter is sequential", default=False)
    for field_name in ("ln_before", "ln_after"):
        _require(ah, field_name, False, "slimtune's Compacter has no adapter LayerNorms", default=False)
    _require(ah, "scaling", lambda v: v == 1.0, "slimtune's Compacter is unscaled", default=1.0)
    _require(ah, "factorized_phm_W", True, "slimtune's Compacter factorises every fast matrix (W = s @ t)",
             default=True)
    _require(ah, "shared_W_phm", False, "fast matrices shared across layers are not converted", default=False)
    if ah.get("learn_phm") is False:
        notes.append("learn_phm=False dropped: the slow matrices are trainable in slimtune (outputs unchanged)")
    per_module = _per_module(tensors, name, family)
    shared = per_module.pop("", {})
    rule = _phm_rule(shared, "shared_parameters")
    if rule is None and ah.get("shared_phm_rule", True):
        raise AdapterLoadError(f"shared_phm_rule=True but no shared phm_rule tensor for {name!r} found")
    out: dict[str, Tensor] = {} if rule is None else {"phm_rule": rule}
    modules = sorted(per_module)
    for module in modules:
        found = per_module[module]
        for theirs, ours in (("adapter_down.0.", "down."), ("adapter_up.", "up.")):
            part = {k[len(theirs):]: v for k, v in found.items() if k.startswith(theirs)}
            left, right = part.pop("W_left", None), part.pop("W_right", None)
            if left is None or right is None:
                raise AdapterLoadError(f"{module}: AdapterHub PHM layer {theirs[:-1]} lacks W_left / W_right")
            n = left.shape[0]
            bias = part.pop("b", None)
            own = _phm_rule(part, f"{module}.{theirs[:-1]}")
            if part:
                raise AdapterLoadError(f"{module}: AdapterHub tensors {sorted(part)} have no slimtune counterpart")
            key = f"{PEFT_PREFIX}{module}.{ours}"
            out[key + "s"], out[key + "t"] = left, right
            out[key + "bias"] = bias if bias is not None else torch.zeros(n * right.shape[-1], dtype=right.dtype)
            if own is not None:
                out[key + "A"] = own
        rest = [k for k in found if not k.startswith(("adapter_down.0.", "adapter_up."))]
        if rest:
            raise AdapterLoadError(f"{module}: AdapterHub tensors {rest} have no slimtune counterpart")
    if ah.get("phm_bias") is False:
        notes.append("phm_bias=False: the PHM biases are written as zeros")
    positions = _positions(ah)
    cfg = CompacterConfig(
        variant="compacter" if positions == (0, 1) else "compacter++",
        targets=_targets(positions) if positions == (0,) else None, reduction_factor=_reduction_factor(ah),
        non_linearity=ACTIVATIONS[ah["non_linearity"].lower()], phm_dim=int(ah.get("phm_dim", 4)),
        phm_rank=int(ah.get("phm_rank", 1)), shared_phm_rule=rule is not None,
        phm_init_range=float(ah.get("phm_init_range") or 1e-4),
        reads="residual" if ah.get("original_ln_before") else "sublayer", layers=_layers(ah, modules))
    return cfg, out


def _phm_rule(found: dict[str, Tensor], where: str) -> Tensor | None:
    """A (n, n, n) from `phm_rule`, or from the factorised `phm_rule_left @ phm_rule_right` (popped from found)."""
    rule, left, right = found.pop("phm_rule", None), found.pop("phm_rule_left", None), found.pop("phm_rule_right", None)
    if (left is None) != (right is None):
        raise AdapterLoadError(f"{where}: factorised PHM rule lacks its {'left' if left is None else 'right'} half")
    if left is not None:
        rule = torch.bmm(left, right)  # as AdapterHub's forward computes it
    if found and where == "shared_parameters":
        raise AdapterLoadError(f"shared AdapterHub tensors {sorted(found)} have no slimtune counterpart")
    return rule


def _prefix(ah: dict[str, Any], name: str, tensors: dict[str, Tensor], notes: list[str]
            ) -> tuple[PrefixTuningConfig, dict[str, Tensor]]:
    _require(ah, "use_gating", False, "gated prefixes (UniPELT) have no slimtune counterpart", default=False)
    _require(ah, "leave_out", lambda v: not v, "slimtune's prefix tuning has a prefix in every layer (a zero "
             "prefix still takes attention weight, so layers cannot be left out)", default=[])
    if ah.get("dropout"):
        notes.append(f"dropout={ah['dropout']} dropped: it acts in training only")
    pattern = re.compile(rf"(?:.*\.)?prefix_tunings\.{re.escape(name)}\.(?P<loc>[^.]+)\.(?P<rest>.+)")
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if not m:
            raise AdapterLoadError(f"AdapterHub tensor {key!r} is not part of a prefix named {name!r}")
        found.setdefault(m["loc"], {})[m["rest"]] = value  # every layer's pool holds the same tensors
    if len(found) != 1:
        raise _refuse("encoder_prefix / cross_prefix", sorted(found), "prefixes at several locations (encoder, "
                      "decoder, cross-attention) belong to encoder-decoder models, which slimtune's prefix tuning "
                      "does not support" if found else "no prefix tensors found")
    (location, parts), = found.items()
    with torch.no_grad():
        if ah.get("flat"):
            flat = parts.get("control_trans")
            if flat is None or len(parts) != 1:
                raise AdapterLoadError(f"flat prefix {location!r}: expected one tensor control_trans, "
                                       f"got {sorted(parts)}")
            prefix = flat.reshape(int(ah["prefix_length"]), -1)
        else:
            act = (ah.get("non_linearity") or "tanh").lower()
            if act not in PREFIX_ACTIVATIONS:
                raise _refuse("non_linearity", ah.get("non_linearity"),
                              f"the prefix MLP is recomputed with {', '.join(sorted(PREFIX_ACTIVATIONS))}")
            want = {"wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                    "control_trans.2.bias"}
            if set(parts) != want:
                raise AdapterLoadError(f"prefix {location!r}: expected {sorted(want)}, got {sorted(parts)}")
            hidden = F.linear(parts["wte.weight"], parts["control_trans.0.weight"], parts["control_trans.0.bias"])
            prefix = F.linear(PREFIX_ACTIVATIONS[act](hidden), parts["control_trans.2.weight"],
                              parts["control_trans.2.bias"])  # P = MLP(E): what AdapterHub computes every forward
    if prefix.shape[0] != int(ah["prefix_length"]):
        raise AdapterLoadError(f"prefix {location!r} has {prefix.shape[0]} rows, prefix_length={ah['prefix_length']}")
    cfg = PrefixTuningConfig(num_virtual_tokens=int(ah["prefix_length"]), shift_positions=False)
    return cfg, {"prompt_embeddings": prefix.contiguous()}


# -- a base model given --------------------------------------------------------------------------------------------
def _fit_to_base(base: str | Path | nn.Module, tensors: dict[str, Tensor], config: dict[str, Any]
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Match module names to `base` (AdapterHub keys follow the model the adapter was saved from), record its
    fingerprint, and test-load the result."""
    import slimtune as st
    from slimtune.adapter_files import base_fingerprint

    model = _load_base(base, config.get("base_model_class"))
    names = {n for n, _ in model.named_modules()}
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(PEFT_PREFIX):
            module, tname = _OUR_TENSOR.fullmatch(key[len(PEFT_PREFIX):]).groups()
            if module not in names:
                near = [n for n in names if n.endswith("." + module) or module.endswith("." + n)]
                if len(near) != 1:
                    raise AdapterLoadError(f"module {module!r} of the AdapterHub adapter is not in "
                                           f"{type(model).__name__}" + (f" (candidates: {near})" if near else ""))
                module = near[0]
            key = f"{PEFT_PREFIX}{module}.{tname}"
        renamed[key] = value
    config = {**config, "base_fingerprint": base_fingerprint(model),
              "base_model_class": config.get("base_model_class") or type(model).__name__}
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter_dir(Path(tmp) / "adapter", config, renamed)
        st.load(copy.deepcopy(model), Path(tmp) / "adapter")  # raises with a diagnosis if anything does not fit
    return renamed, config


def _load_base(base: str | Path | nn.Module, class_name: str | None) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(base)).eval()


__all__ = ["Converted", "convert_adapterhub", "read_config", "read_tensors"]
