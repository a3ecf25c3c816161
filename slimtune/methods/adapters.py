"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) with AdapterDrop.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751; Pfeiffer et al. 2021,
"AdapterFusion", arXiv:2005.00247; He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv:2110.04366 (parallel, scaled); Rücklé et al. 2021, "AdapterDrop", arXiv:2010.11918.

    sequential:  y = h + s * LN_a(up(f(down(LN_b(h)))))          h = base(x): a sublayer's output projection
    parallel:    y = base(x) + s * LN_a(up(f(down(LN_b(x)))))     base: the whole FFN block, x: its input
    reads="residual" (AdapterHub's placement): the adapter reads the residual stream r around the sublayer and
    still adds to h before the residual add:
    sequential:  y = h + s * A(g(h + r))      g: the block's LayerNorm after the add (post-norm BERT), else identity
    parallel:    y = h + s * A(r)             r: the stream entering the sublayer (the residual itself)
    down: d -> m, up: m -> d, m = d // reduction_factor; f = relu | gelu | swish | tanh; LN_b, LN_a optional
Placement without per-model code, by wrapping modules every family has, before the residual add: the attention
output projection and the FFN output projection (Llama o_proj / down_proj, GPT-2 attn.c_proj / mlp.c_proj, BERT
attention.output.dense / output.dense). "houlsby": both; "pfeiffer": the FFN one; "parallel": the FFN block
module (`mlp`, the registry's `FfnBlockKind`).
r is taken by a forward pre-hook on the module that receives it: the sublayer's pre-norm in pre-norm blocks
(Llama input_layernorm / post_attention_layernorm, GPT-2 ln_1 / ln_2), the `input_tensor` argument of the module
holding the output projection and its LayerNorm in post-norm ones (BERT attention.output / output).
Init: "bert" N(0, 0.02) weights; "houlsby" N(0, 1e-2) truncated at +-2e-2; "mam" / "lora": down kaiming-uniform,
up = 0 (exactly the base at init). Biases 0. Not mergeable: f is nonlinear.
Parameters per position: 2*d*m + d + m (+ 2d per LayerNorm, + 1 for a learned s).
AdapterDrop: the adapters of blocks < drop_layers are skipped in forward and frozen; with drop_prob, in training
each block's adapters are skipped with that probability, redrawn at every `model.step()`.
Compacter (PHM projections) is in compacter.py and reuses `Bottleneck`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import FfnBlockKind, kind_of, sizes
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError, did_you_mean
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, register
from slimtune.targets import layer_index

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
INITS = ("bert", "houlsby", "mam", "lora")
LAYER_NORMS = ("none", "before", "after", "both")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
READS = ("sublayer", "residual")

# module-name patterns (regex alternatives) of the sublayer outputs, before the residual add: Llama family,
# GPT-2, BERT family (RoBERTa, MiniLM, ViT), OPT / BART, Falcon / Bloom, GPT-NeoX; fc2 also CLIP and Phi
ATTENTION_OUT = (r"self_attn\.o_proj|attn\.c_proj|attention\.output\.dense|self_attn\.out_proj|self_attn\.dense"
                 r"|self_attention\.dense|attention\.dense")
FFN_OUT = r"mlp\.down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|fc2|mlp\.dense_4h_to_h"
FFN_BLOCK = r"mlp"
# reads="residual" in pre-norm blocks: the norm in front of each sublayer receives the residual stream
PRE_NORMS = {"attention": ("input_layernorm", "ln_1"), "ffn": ("post_attention_layernorm", "ln_2")}


def placement_targets(placement: str) -> str:
    """The `targets` regex of a placement: sublayer outputs ("houlsby", "pfeiffer") or FFN blocks ("parallel")."""
    parts = {"houlsby": f"{ATTENTION_OUT}|{FFN_OUT}", "pfeiffer": FFN_OUT, "parallel": FFN_BLOCK}[placement]
    return rf".*\.(?:{parts})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(owner: Any, name: str, options: tuple[str, ...]) -> None:
    value = getattr(owner, name)
    hint = did_you_mean(value, options) if isinstance(value, str) else ""
    check_field(value in options, owner, name, " | ".join(repr(o) for o in options) + hint)


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapters: y = h + s * up(f(down(h))) after sublayers, or parallel to the FFN block.

    Presets: `BottleneckConfig.houlsby()`, `.pfeiffer()`, `.parallel()` (AdapterHub's DoubleSeqBn, SeqBn and
    ParBn defaults); keyword arguments override them.

    Args:
        placement: "pfeiffer" (after the FFN), "houlsby" (after attention and after the FFN) or "parallel"
            (beside the FFN block, reading its input). Sets `targets` when they are not given; with `targets`
            given, "parallel" runs beside those modules and the other two after them.
        reduction_factor: d / m: the bottleneck width is m = d // reduction_factor.
        non_linearity: f: "relu", "gelu", "swish" or "tanh".
        scaling: s: a number, or "learned" (one trained scalar per position, starting at 1).
        init: "bert", "houlsby", "mam" or "lora" (the same: up = 0, exactly the base at init).
        layer_norm: a LayerNorm on the adapter's input ("before"), on its output ("after"), "both" or "none".
        drop_layers: AdapterDrop: the adapters of transformer blocks 0 .. drop_layers-1 are skipped and frozen.
        drop_prob: AdapterDrop in training: skip each block's adapters with this probability, redrawn at every
            `model.step()` (st.Trainer and SlimtuneCallback call it); in eval every adapter runs.
        reads: what the adapter reads. "sublayer": the wrapped module's output (sequential) or input (parallel).
            "residual": the residual stream, as AdapterHub places adapters: sequential adapters read the
            sublayer's output after the residual add (and after the block's LayerNorm in post-norm models such as
            BERT; AdapterHub's `original_ln_before=True`, its SeqBn / Pfeiffer default), parallel ones the stream
            entering the sublayer (AdapterHub's ParBn). Either way the output is added to the wrapped module's
            output. Targets must be sublayer output projections (or FFN blocks) of Llama-, GPT-2- or BERT-style
            blocks.
    """

    #: the transformer block of the module this copy was resolved for (not a field: never saved)
    block: ClassVar[int | None] = None
    #: the module name this copy was resolved for (not a field: never saved)
    module: ClassVar[str | None] = None

    placement: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    scaling: float | str = 1.0
    init: str = "bert"
    layer_norm: str = "none"
    drop_layers: int = 0
    drop_prob: float = 0.0
    reads: str = "sublayer"

    def __post_init__(self) -> None:
        _one_of(self, "placement", PLACEMENTS)
        if self.targets is None:
            self.targets = placement_targets(self.placement)
        super().__post_init__()
        check_field(_is_number(self.reduction_factor) and 0 < self.reduction_factor < math.inf, self,
                    "reduction_factor", "a number > 0 (the bottleneck is d // reduction_factor wide), e.g. 16")
        _one_of(self, "non_linearity", tuple(ACTIVATIONS))
        check_field(self.scaling == "learned" or (_is_number(self.scaling) and math.isfinite(self.scaling)), self,
                    "scaling", "a finite number (e.g. 1.0; 4.0 for parallel adapters) or 'learned'")
        _one_of(self, "init", INITS)
        _one_of(self, "layer_norm", LAYER_NORMS)
        check_field(_is_int(self.drop_layers) and self.drop_layers >= 0, self, "drop_layers",
                    "an int >= 0: the number of lowest blocks whose adapters are skipped")
        check_field(_is_number(self.drop_prob) and 0 <= self.drop_prob < 1, self, "drop_prob", "a float in [0, 1)")
        _one_of(self, "reads", READS)

    @classmethod
    def houlsby(cls, **fields: Any) -> BottleneckConfig:
        """Houlsby et al.: after the attention output and after the FFN (AdapterHub DoubleSeqBnConfig: swish)."""
        return cls(**{"placement": "houlsby", "non_linearity": "swish", **fields})

    @classmethod
    def pfeiffer(cls, **fields: Any) -> BottleneckConfig:
        """Pfeiffer et al.: after the FFN only (AdapterHub SeqBnConfig's defaults: relu, reduction_factor 16;
        SeqBn also reads the residual stream: add reads="residual" for its placement)."""
        return cls(**{"placement": "pfeiffer", **fields})

    @classmethod
    def parallel(cls, **fields: Any) -> BottleneckConfig:
        """He et al.: beside the FFN block, scaled (AdapterHub ParBnConfig's defaults: reduction_factor 2, s = 4,
        mam init; ParBn reads the residual stream entering the FFN: reads="residual" with FFN-output targets)."""
        return cls(**{"placement": "parallel", "reduction_factor": 2, "scaling": 4.0, "init": "mam", **fields})

    def resolve(self, module_name: str) -> BottleneckConfig:
        """The config for one target, knowing its transformer block (for AdapterDrop)."""
        resolved = dataclasses.replace(self)
        resolved.block, resolved.module = layer_index(module_name), module_name
        return resolved


def bottleneck_width(d: int, reduction_factor: float) -> int:
    """m = d // reduction_factor, refusing an empty bottleneck."""
    m = int(d // reduction_factor)
    if m < 1:
        raise ValueError(f"reduction_factor={reduction_factor} leaves no bottleneck for d={d} "
                         f"(m = d // reduction_factor = {m}); expected reduction_factor <= {d}")
    return m


@dataclass
class Tap:
    """Where one target's residual stream r comes from (reads="residual")."""

    source: nn.Module  # receives r as its forward argument `arg` (position) / `arg_name` (keyword)
    arg: int
    arg_name: str
    norm: nn.Module | None  # post-norm blocks: the LayerNorm applied after the residual add


def residual_tap(model: nn.Module, target: str) -> Tap:
    """The module that receives `target`'s residual stream: the output projection's parent in post-norm blocks
    (BERT: `forward(hidden_states, input_tensor)` = LayerNorm(dense(hidden_states) + input_tensor)), the
    sublayer's pre-norm in pre-norm blocks (Llama, GPT-2)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    norm = getattr(parent, "LayerNorm", None)
    if leaf == "dense" and isinstance(norm, nn.LayerNorm):
        names = list(inspect.signature(parent.forward).parameters)
        if len(names) >= 2:
            return Tap(parent, 1, names[1], norm)
    parts = target.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    sublayer = "attention" if re.fullmatch(rf".*\.(?:{ATTENTION_OUT})", target) else "ffn"
    if index is not None:
        block = model.get_submodule(".".join(parts[:index + 1]))
        for name in PRE_NORMS[sublayer]:
            source = getattr(block, name, None)
            if isinstance(source, nn.Module):
                return Tap(source, 0, next(iter(inspect.signature(source.forward).parameters)), None)
    raise ConfigError(f"BottleneckConfig.reads='residual' on {target}: found neither a pre-norm "
                      f"({' / '.join(PRE_NORMS[sublayer])}) in its transformer block nor a post-norm module holding "
                      "it with a LayerNorm (BERT's attention.output / output); expected the sublayer output "
                      "projections of Llama-, GPT-2- or BERT-style blocks, or reads='sublayer'")


def residual_taps(model: nn.Module, targets: list[str]) -> dict[str, Tap]:
    return {t: residual_tap(model, t) for t in targets}


class AdapterDrop(nn.Module):
    """Which blocks skip their adapters now, for one adapter (no tensors: nothing saved)."""

    def __init__(self, drop_layers: int, drop_prob: float, n_blocks: int) -> None:
        super().__init__()
        self.drop_layers, self.drop_prob, self.n_blocks = drop_layers, drop_prob, n_blocks
        self.dropped: list[bool] = [False] * n_blocks
        self.taps: dict[str, Tap] | None = None  # reads="residual": where each target's residual comes from
        self.redraw()

    def redraw(self) -> None:
        """A new random set of dropped blocks (training with drop_prob > 0). One block above `drop_layers` always
        keeps its adapters: a step with every adapter skipped would have nothing to backpropagate into."""
        if self.drop_prob > 0:
            dropped = torch.rand(self.n_blocks) < self.drop_prob
            live = torch.arange(self.drop_layers, self.n_blocks)
            if bool(dropped[live].all()):
                dropped[live[torch.randint(len(live), ())]] = False
            self.dropped = dropped.tolist()

    def skips(self, block: int | None, training: bool) -> bool:
        if block is None:
            return False
        return block < self.drop_layers or (training and block < self.n_blocks and self.dropped[block])


class Bottleneck(LayerAdapter):
    """One adapter at one position: base_out + s * LN_a(up(f(down(LN_b(h))))), h = base_out, or x if parallel.

    `down` and `up` are any modules mapping the last dimension (nn.Linear here, PHM layers in Compacter).
    With a `tap` (reads="residual") h is g(base_out + r), or r if parallel; r is caught by a forward pre-hook that
    `install` puts on the tap's source module and `release` removes.
    """

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module, non_linearity: str, *,
                 parallel: bool = False, scaling: float | str = 1.0, layer_norm: str = "none",
                 block: int | None = None, drop: AdapterDrop | None = None, tap: Tap | None = None) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        self.parallel, self.block, self.non_linearity = parallel, block, non_linearity
        d = d_in if parallel and tap is None else d_out  # what the adapter reads: x, or base_out / the stream
        self.ln_before = nn.LayerNorm(d, **kw) if layer_norm in ("before", "both") else None
        self.down, self.up = down, up
        self.ln_after = nn.LayerNorm(d_out, **kw) if layer_norm in ("after", "both") else None
        self.scale = nn.Parameter(torch.ones(1, **kw)) if scaling == "learned" else float(scaling)
        self._drop = [drop] if drop is not None else []  # a plain reference: the state belongs to the adapter
        if drop is not None and block is not None and block < drop.drop_layers:
            self.frozen = frozenset(n.split(".")[0] for n, _ in self.named_parameters())  # skipped: never trains
        self._tap = [tap] if tap is not None else []  # plain references: base modules are not the adapter's
        self._residual: Tensor | None = None
        self._hook = None

    # -- reads="residual" ---------------------------------------------------------------------------------
    def install(self, base: nn.Module) -> None:
        if self._tap and self._hook is None:
            self._hook = self._tap[0].source.register_forward_pre_hook(self._catch, with_kwargs=True)

    def release(self, base: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._residual = None

    def _catch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tap = self._tap[0]
        self._residual = args[tap.arg] if len(args) > tap.arg else kwargs.get(tap.arg_name)

    def _stream(self, base_out: Tensor) -> Tensor:
        """What a residual-reading adapter reads: r (parallel) or g(base_out + r)."""
        r, self._residual = self._residual, None
        tap = self._tap[0]
        if r is None:
            raise RuntimeError(f"bottleneck adapter (reads='residual'): {type(tap.source).__name__} did not run "
                               "before this sublayer, so the residual stream is unknown; call the whole model")
        if r.shape != base_out.shape:
            raise NotImplementedError(f"bottleneck adapter (reads='residual'): the residual stream is "
                                      f"{tuple(r.shape)} but the sublayer output {tuple(base_out.shape)}; per-row "
                                      "adapter routing (adapter_names) is not implemented for reads='residual'")
        if self.parallel:
            return r
        return tap.norm(base_out + r) if tap.norm is not None else base_out + r

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if self._drop and self._drop[0].skips(self.block, self.training):
            return base_out
        h = self._stream(base_out) if self._tap else (x if self.parallel else base_out)
        h = h.to(next(self.down.parameters()).dtype)
        if self.ln_before is not None:
            h = self.ln_before(h)
        h = self.up(ACTIVATIONS[self.non_linearity](self.down(h)))  # (..., d) -> (..., m) -> (..., d)
        if self.ln_after is not None:
            h = self.ln_after(h)
        return base_out + (h * self.scale).to(base_out.dtype)


def tap_for(shared: nn.Module | None, cfg: MethodConfig) -> Tap | None:
    """The residual tap of the target `cfg` was resolved for (reads="residual"), else None."""
    taps = getattr(shared, "taps", None)
    if getattr(cfg, "reads", "sublayer") != "residual" or taps is None:
        return None
    return taps[cfg.module]


@torch.no_grad()
def init_projections(down: nn.Linear, up: nn.Linear, scheme: str) -> None:
    """AdapterHub's inits: "bert" N(0, 0.02); "houlsby" truncated N(0, 1e-2); "mam"/"lora" kaiming down, up = 0."""
    nn.init.zeros_(down.bias)
    nn.init.zeros_(up.bias)
    if scheme == "bert":
        down.weight.normal_(0.0, 0.02)
        up.weight.normal_(0.0, 0.02)
    elif scheme == "houlsby":
        for w in (down.weight, up.weight):
            nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
    else:
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)


# -- the method ---------------------------------------------------------------------------------------
@register
class BottleneckMethod(Method):
    name, config, shape = "bottleneck", BottleneckConfig, "layer"
    category, paper = "additive", "arXiv:1902.00751"
    params = "2*d*m+d+m per position, m = d // reduction_factor (+2d per LayerNorm)"
    mergeable = False

    def build_shared(self, model: nn.Module, cfg: BottleneckConfig, targets: list[str], init: bool = True
                     ) -> AdapterDrop | None:
        """AdapterDrop's state, when it drops anything, and where the residual comes from (reads="residual")."""
        drops = cfg.drop_layers > 0 or cfg.drop_prob > 0
        if not drops and cfg.reads == "sublayer":
            return None
        blocks = [b for b in map(layer_index, targets) if b is not None]
        if drops and not blocks:
            raise ConfigError(f"BottleneckConfig.drop_layers={cfg.drop_layers}, drop_prob={cfg.drop_prob}: expected "
                              "targets inside numbered transformer blocks (layers.N, h.N, layer.N); these have none")
        n_blocks = max(blocks) + 1 if blocks else 0
        if drops:
            check_field(cfg.drop_layers < n_blocks, cfg, "drop_layers",
                        f"fewer than the {n_blocks} blocks the targets are in (dropping all leaves nothing to train)")
        shared = AdapterDrop(cfg.drop_layers, cfg.drop_prob, n_blocks)
        if cfg.reads == "residual":
            shared.taps = residual_taps(model, targets)
        return shared

    def build_layer(self, base: nn.Module, cfg: BottleneckConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        kind = kind_of(base)
        if not (kind.linear or isinstance(kind, FfnBlockKind)):
            raise NotImplementedError("adapters act on the last dimension: Linear, GPT-2 Conv1D or FFN blocks only")
        d_in, d_out = kind.sizes(base)
        parallel = cfg.placement == "parallel"
        tap = tap_for(shared, cfg)
        d = d_in if parallel and tap is None else d_out
        m = bottleneck_width(d, cfg.reduction_factor)
        kw = factory(base)
        down, up = nn.Linear(d, m, **kw), nn.Linear(m, d_out, **kw)
        if init:
            init_projections(down, up, cfg.init)
        return Bottleneck(base, down, up, cfg.non_linearity, parallel=parallel, scaling=cfg.scaling,
                          layer_norm=cfg.layer_norm, block=cfg.block, drop=shared, tap=tap)

    def step(self, adapter: AdapterView, cfg: BottleneckConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """Random AdapterDrop: a new set of dropped blocks for the next step."""
        if isinstance(adapter.shared, AdapterDrop):
            adapter.shared.redraw()


__all__ = ["AdapterDrop", "Bottleneck", "BottleneckConfig", "BottleneckMethod", "Tap", "placement_targets",
           "residual_tap", "residual_taps"]
