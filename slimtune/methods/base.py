"""The method contract: three shapes of PEFT method, and the registry.

A method file defines a config (a `MethodConfig` subclass), the module(s) it adds, and a
`Method` subclass registered with `@register`. The engine (tuned.py, layer.py, io.py) calls only
the hooks below; each has a default, so a method overrides just what applies to it.

Shapes (`Method.shape`; a method may also use the hooks of the others, e.g. LoRA's `bias`
option selects base biases):

- "layer": `build_layer(base_module, cfg)` returns a `LayerAdapter` for every target module.
- "input": `build_input(model, cfg)` returns an `InputAdapter` that rewrites the model call.
- "selective": `select(model, cfg, targets)` names base tensors (and optional masks) to train.

See docs/architecture.md ("Adding a method") for a walk-through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, register_config

PEFT_VERSION = "0.21.2"
PEFT_PREFIX = "base_model.model."  # HF PEFT's prefix of module tensors in adapter_model.safetensors
PEFT_SHORT_PREFIX = "base_model."  # the same for prompt-learning methods (their PeftModel holds the model directly)


def call_argument(module: nn.Module, name: str, default: Any = None) -> Any:
    """Keyword argument `name` of the current model call (one the method lists in `Method.call_arguments`,
    e.g. task_ids), cut to the rows this adapter is running on in a mixed batch; `default` when absent."""
    state = module.__dict__.get("_adapter_state")
    if state is None or name not in state.call:
        return default
    value = state.call[name]
    if state.rows is not None and isinstance(value, Tensor) and value.dim() > 0:
        value = value.index_select(0, state.rows.to(value.device))
    return value


class LayerAdapter(nn.Module):
    """One adapter on one wrapped module (LoRA's A and B on a q_proj, say).

    The wrapped module computes `forward(transform_input(x), base(transform_input(x)), base)`;
    several adapters on one module chain in the order of the active set. A method never sees
    an adapter name or the active set.
    """

    #: parameter names that never train (LoRA-FA's A)
    frozen: ClassVar[frozenset[str]] = frozenset()
    #: our tensor name -> the on-disk suffix HF PEFT uses ("A" -> "lora_A.weight")
    peft_keys: ClassVar[dict[str, str]] = {}
    #: True when build()/install() changed the base weight (PiSSA's residual): `inactive_forward`
    #: must then give back the original base output, and `release` the original weight
    changes_base: ClassVar[bool] = False
    #: True when `transform_input` is not the identity ((IA)3 on a feed-forward input)
    transforms_input: ClassVar[bool] = False
    #: True for a fusion layer: `fuse()` combines other adapters' outputs inside a `Fuse` block
    fuses: ClassVar[bool] = False

    def call_argument(self, name: str, default: Any = None) -> Any:
        """A keyword argument of the model call the method declared (`Method.call_arguments`), for this
        adapter's rows."""
        return call_argument(self, name, default)

    def fuse(self, x: Tensor, base_out: Tensor, deltas: list[Tensor], base: nn.Module) -> Tensor:
        """Inside `Fuse(...)`: the output given the base output and each child's delta (`fuses = True`)."""
        raise TypeError(f"{type(self).__name__} is not a fusion layer: Fuse(..., fusion=...) must name an "
                        "adapter such as an AdapterFusion one")

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        """What the wrapped module outputs, given its input and the base module's output."""
        return base_out

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        """Input-side change applied before the base module runs (only if `transforms_input`)."""
        return x

    def inactive_forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        """Output while attached but not active (disabled, another adapter in use, a routed-away row)."""
        return base_out

    # -- merging ----------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """W' - W in (d_out, d_in[, *kernel]) layout, for additive merges."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def prepare_merge(self, base: nn.Module) -> None:
        """Called for every adapter of a layer before any of them merges (the weight is still W0)."""

    def merge(self, base: nn.Module) -> None:
        """Fold into the base weight: W += delta_weight by default."""
        from slimtune.bases import add_to_weight

        add_to_weight(base, self.delta_weight(base))

    def unmerge(self, base: nn.Module) -> None:
        from slimtune.bases import add_to_weight

        add_to_weight(base, self.delta_weight(base), sign=-1.0)

    def merge_output(self, base: nn.Module) -> None:
        """For input-side adapters (`transforms_input`) that also change the output (BOFT's scale): fold the
        output part now, at this adapter's place in the active order; `merge()` then folds the input part,
        after every other adapter of the layer."""

    def unmerge_output(self, base: nn.Module) -> None:
        """Undo `merge_output()`."""

    # -- base weight changed by init -----------------------------------------------------------
    def install(self, base: nn.Module) -> None:
        """Change the base weight if the method's init needs it; runs only once every module built."""

    def release(self, base: nn.Module) -> None:
        """Undo `install()` (the adapter is deleted or the model detached without merging)."""

    # -- speed ------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Base and adapter in one node when this adapter is alone and active; None: not applicable."""
        return None

    # -- mixed batches: rows routed to different adapters of one kind in one batched op --------
    @property
    def route_key(self) -> Any:
        """Adapters with equal non-None keys run together through `stack` / `forward_rows`."""
        return None

    @staticmethod
    def stack(adapters: list[LayerAdapter]) -> Any:
        raise NotImplementedError

    @staticmethod
    def forward_rows(stacks: Any, x: Tensor, base_out: Tensor, slot: Tensor | None) -> Tensor:
        raise NotImplementedError

    # -- files --------------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        """Tensors written to disk (default: the state dict). PiSSA exports a rank-2r LoRA instead."""
        return dict(self.state_dict(keep_vars=True))


class InputAdapter(nn.Module):
    """Changes what the network sees (soft prompts, key/value prefixes).

    `TunedModel` calls `prepare(kwargs, rows)` with the keyword arguments of the model call
    (input_ids, attention_mask, labels, ...) and calls the model with what it returns; `finish`
    post-processes the output. `rows` is a bool tensor of the batch rows this adapter applies to
    (None: all rows). `generate()` goes through `prepare_generate` / `finish_generate`.
    """

    def call_argument(self, name: str, default: Any = None) -> Any:
        """A keyword argument of the model call the method declared (`Method.call_arguments`), all rows."""
        return call_argument(self, name, default)

    def attach(self, model: nn.Module) -> None:
        """Install hooks on the base model (called once the adapter is added)."""

    def detach(self, model: nn.Module) -> None:
        """Remove what `attach` installed."""

    def prepare(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        return kwargs

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        return output

    def prepare_generate(self, kwargs: dict[str, Any], rows: Tensor | None) -> dict[str, Any]:
        return self.prepare(kwargs, rows)

    def finish_generate(self, output: Any) -> Any:
        return output

    def end_call(self) -> None:
        """Called after every model call, also when it raised: drop any per-call state."""

    def export_tensors(self) -> dict[str, Tensor]:
        """Tensors written to disk, keyed as on disk (no module prefix)."""
        return dict(self.state_dict(keep_vars=True))


@dataclass
class Selection:
    """A base tensor a selective method trains: `name` (a base parameter name, wrappers ignored),
    and an optional bool `mask` of the entries that train (None: the whole tensor).

    `sparse=True` without a mask: a sparse selection whose entries come from a file (loading).
    """

    name: str
    mask: Tensor | None = None
    sparse: bool = False


@dataclass
class AdapterView:
    """Everything of one named adapter, as a method's `step` / `regularizer` sees it."""

    name: str
    layers: dict[str, LayerAdapter]  # wrapped module name -> this adapter's module there
    bases: dict[str, nn.Module]  # wrapped module name -> the base module
    shared: nn.Module | None = None
    input: InputAdapter | None = None
    selections: dict[str, nn.Module] = field(default_factory=dict)  # base tensor name -> its TunedEntries


@dataclass
class PeftContext:
    """What a method's HF PEFT translation may need to know about the model and adapter."""

    task_type: str | None
    base_model_name_or_path: str | None
    target_modules: list[str] | None  # leaf names when they select exactly the targets, else full names
    targets: list[str] = field(default_factory=list)  # full names of the wrapped modules
    target_kinds: set[str] = field(default_factory=set)  # BaseKind names of the targets
    modules_to_save: list[str] | None = None
    model: nn.Module | None = None

    def peft_names(self, subset: list[str]) -> list[str]:
        """`subset` of `targets` named the way `target_modules` names them (leaves or full names)."""
        if self.target_modules is not None and set(self.target_modules) == set(self.targets):
            return sorted(subset)
        return sorted({t.split(".")[-1] for t in subset})

    def common(self, peft_type: str) -> dict[str, Any]:
        """The fields every HF PEFT adapter_config.json carries.

        A classifier exported without its head in `modules_to_save` gets no task type: PEFT's
        SEQ_CLS / TOKEN_CLS models add the head to the saved modules and then expect its tensors.
        """
        headless = self.task_type in ("SEQ_CLS", "TOKEN_CLS") and not self.modules_to_save
        return {
            "peft_type": peft_type,
            "task_type": None if headless else self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "peft_version": PEFT_VERSION,
        }


class Method:
    """A registered PEFT method. Subclass, set the class attributes, override the hooks that apply."""

    name: ClassVar[str] = ""
    config: ClassVar[type[MethodConfig]] = MethodConfig
    shape: ClassVar[str] = "layer"  # "layer" | "input" | "selective"
    category: ClassVar[str] = ""
    params: ClassVar[str] = ""  # parameter count per module (layer), or in total, as a formula
    paper: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None  # HF PEFT's name, when PEFT has the method
    #: True: only linear base kinds (Linear, GPT-2 Conv1D, a registered quantized Linear); the engine refuses others
    linear_only: ClassVar[bool] = False
    #: True when `select` needs calibration batches (`st.attach(..., data=batches)`); `slimtune train` passes
    #: the first `calibration_batches` training batches
    needs_data: ClassVar[bool] = False
    #: keyword arguments of the model call this method reads (`task_ids`): `TunedModel` takes them out of
    #: the call (the base never sees them) and adapters read them with `self.call_argument(name)`
    call_arguments: ClassVar[tuple[str, ...]] = ()
    #: True when `step` freezes tensors during training (AFLoRA): data-parallel training must then
    #: tolerate parameters that stop receiving gradients (DDP's find_unused_parameters)
    changes_trainable: ClassVar[bool] = False
    #: prefix of module tensors on disk: HF PEFT writes "base_model." for prompt-learning methods
    module_prefix: ClassVar[str] = PEFT_PREFIX

    # -- attaching --------------------------------------------------------------------------------
    def plan(self, model: nn.Module, cfg: MethodConfig, data: Iterable[dict] | None) -> MethodConfig:
        """Called first by `add(..., init=True)`: the config to attach, with the choices that need the
        calibration batches made (SPT's LoRA modules); `add` builds and keeps what it returns. Default: cfg."""
        return cfg

    def find_targets(self, model: nn.Module, cfg: MethodConfig, skip: set[str]) -> list[str]:
        """Full names of the modules to wrap with `build_layer` (default: `cfg.targets` for the layer
        shape, none otherwise). A hybrid returns the union of its parts'. `skip`: modules trained in full."""
        if self.shape != "layer":
            return []
        from slimtune.targets import find_targets

        return find_targets(model, cfg, skip=skip)

    def call_arguments_of(self, cfg: MethodConfig) -> tuple[str, ...]:
        """The call arguments an adapter of this config reads (default: the class's `call_arguments`;
        a hybrid: its parts')."""
        return self.call_arguments

    def is_mergeable(self, cfg: MethodConfig) -> bool:
        """Whether an adapter with this config can merge (default: the class's `mergeable`; a hybrid asks its parts)."""
        return self.mergeable

    def build_shared(self, model: nn.Module, cfg: MethodConfig, targets: list[str], init: bool = True
                     ) -> nn.Module | None:
        """State shared by all layers of one adapter (VeRA's random projections), or None.

        Built once before the layers; each `build_layer` call receives it as `shared`. It belongs to
        the adapter, not to a layer: saved once (under `tensor_keys` names) and counted once.
        """
        return None

    def build_layer(self, base: nn.Module, cfg: MethodConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        """A new adapter module for one target. Must not change `base` (do that in `install`)."""
        raise NotImplementedError(f"method {self.name!r} has no layer adapter")

    def build_input(self, model: nn.Module, cfg: MethodConfig, init: bool = True) -> InputAdapter | None:
        return None

    def select(self, model: nn.Module, cfg: MethodConfig, targets: list[str], init: bool = True,
               data: Iterable[dict] | None = None) -> list[Selection]:
        """Base tensors to train. `targets`: the modules wrapped for this adapter (layer shape).
        `init=False` when loading: data-dependent masks then come from the file (`sparse=True`).
        `data`: batches (dicts of model keyword arguments, with labels) given to `st.attach(..., data=)`,
        for masks chosen from gradients (FishMask, child-tuning); methods with `needs_data` require it."""
        return []

    # -- files --------------------------------------------------------------------------------------
    def saved_config(self, cfg: MethodConfig, adapter: AdapterView) -> MethodConfig:
        """The config written next to `LayerAdapter.export_tensors()`: PiSSA's rank-2r LoRA, the ranks
        AdaLoRA kept, SoRA's pruned plain LoRA. It may be another method's config (that method then
        owns the file, its PEFT translation included)."""
        return cfg

    def choose_rank(self, cfg: MethodConfig, tensors: dict[str, Tensor], rank: int
                    ) -> tuple[MethodConfig, dict[str, Tensor]]:
        """`st.load(..., rank=k)`: the config and on-disk tensors of the same adapter cut to rank k
        (DyLoRA's nested ranks). Methods without nested ranks refuse."""
        raise NotImplementedError(f"st.load(..., rank={rank}): method {self.name!r} has no nested ranks to "
                                  "choose from; rank= applies to methods trained for every rank (dylora)")

    def describe(self, adapter: AdapterView, cfg: MethodConfig) -> str | None:
        """One line `summary()` prints under the adapter (AdaLoRA's ranks kept), or None."""
        return None

    def to_peft(self, cfg: MethodConfig, ctx: PeftContext) -> dict[str, Any]:
        raise NotImplementedError(f"format='peft' for method {self.name!r}: HF PEFT has no such method"
                                  if self.peft_type is None else f"format='peft' for {self.name!r} is not implemented")

    def from_peft(self, data: dict[str, Any]) -> MethodConfig:
        raise NotImplementedError(f"loading HF PEFT adapters of peft_type={data.get('peft_type')!r}")

    #: tensors of the input adapter and the shared module: our name -> key on disk (no module prefix)
    tensor_keys: ClassVar[dict[str, str]] = {}

    def selection_key(self, name: str) -> str:
        """On-disk name (no module prefix) of selected base tensor `name`, in both formats (sparse ones add
        `.sparse_index` / `.sparse_values`). Default: the base name; LN-tuning: PEFT's
        '<norm>.ln_tuning_layers.weight'. Loading matches files by the same names."""
        return name

    def attached(self, adapter: AdapterView, cfg: MethodConfig) -> None:
        """Called once the adapter is installed on the model (also by `st.load`, before the tensors are
        copied in): hooks that live as long as the adapter (child-tuning F's gradient masks)."""

    # -- training -----------------------------------------------------------------------------------
    def step(self, adapter: AdapterView, cfg: MethodConfig, global_step: int,
             optimizer: torch.optim.Optimizer | None) -> None:
        """Called after every optimizer step, before the gradients are zeroed, while the adapter is active
        (`TunedModel.step`): rank reallocation (AdaLoRA), proximal updates (SoRA), periodic merges."""

    def regularizer(self, adapter: AdapterView, cfg: MethodConfig) -> Tensor | None:
        """An extra loss term while the adapter is active (`TunedModel.regularization_loss`), or None."""
        return None


@dataclass(frozen=True)
class MethodInfo:
    """What `slimtune methods` prints about a registered method."""

    name: str
    shape: str
    category: str
    params: str
    paper: str
    mergeable: bool
    peft_type: str | None
    config: type[MethodConfig]
    method: Method
    has_step: bool = False  # overrides Method.step: the engine builds an AdapterView only for these
    has_regularizer: bool = False  # overrides Method.regularizer
    has_describe: bool = False  # overrides Method.describe
    has_attached: bool = False  # overrides Method.attached


METHODS: dict[str, MethodInfo] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under `cls.name`."""
    if cls.shape not in ("layer", "input", "selective"):
        raise ValueError(f"{cls.__name__}.shape={cls.shape!r}: expected 'layer', 'input' or 'selective'")
    register_config(cls.name, cls.config)
    METHODS[cls.name] = MethodInfo(cls.name, cls.shape, cls.category, cls.params, cls.paper, cls.mergeable,
                                   cls.peft_type, cls.config, cls(), has_step=cls.step is not Method.step,
                                   has_regularizer=cls.regularizer is not Method.regularizer,
                                   has_describe=cls.describe is not Method.describe,
                                   has_attached=cls.attached is not Method.attached)
    return cls


def peft_target_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Our MethodConfig fields from the ones every HF PEFT layer-method config shares."""
    targets = data.get("target_modules")
    return {
        "targets": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
        "exclude": data.get("exclude_modules"),
        "layers": data.get("layers_to_transform"),
        "modules_to_save": data.get("modules_to_save"),
    }


def bias_selections(model: nn.Module, bias: str, targets: list[str]) -> list[Selection]:
    """PEFT's `bias` option of layer methods as selections: "none" -> none, "all" -> every bias of the model,
    anything else ("lora_only", "vera_only", "oft_only", ...) -> the biases of the wrapped `targets`."""
    if bias == "none":
        return []
    from slimtune.layer import base_parameters

    biases = [n for n, _ in base_parameters(model) if n.endswith(".bias")]
    if bias != "all":
        wanted = {t + ".bias" for t in targets}
        biases = [n for n in biases if n in wanted]
    return [Selection(n) for n in biases]


def method_for_peft_type(peft_type: str) -> Method:
    """The registered method that reads HF PEFT configs of `peft_type` (the first registered)."""
    for info in METHODS.values():
        if info.peft_type == peft_type:
            return info.method
    known = sorted({i.peft_type for i in METHODS.values() if i.peft_type})
    raise NotImplementedError(f"loading HF PEFT adapters of peft_type={peft_type!r} is not implemented; "
                              f"supported: {', '.join(known)}")


def fused_dense(x: Tensor, base: nn.Module, delta: Tensor) -> Tensor | None:
    """x @ (W + delta).T + b as one GEMM, for adapters that form their dense delta_W anyway (LoHa, LoKr,
    FourierFT): the separate x @ delta.T costs a second full GEMM forward and two more backward. None
    where the base has no plain matmul weight or the dtypes differ (the caller then runs unfused)."""
    from slimtune.bases import kind_of

    W = kind_of(base).matmul_weight(base)
    if W is None or delta.shape != W.shape or not (x.dtype == W.dtype == delta.dtype):
        return None
    return torch.nn.functional.linear(x, W + delta, base.bias)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype for a new adapter's tensors on `base` (via the base-layer registry)."""
    from slimtune.bases import kind_of

    return kind_of(base).adapter_dtype(base)


def factory(base: nn.Module) -> dict[str, Any]:
    """`dtype=` and `device=` keywords for a new adapter tensor on `base`."""
    from slimtune.bases import kind_of

    kind = kind_of(base)
    return {"dtype": kind.adapter_dtype(base), "device": kind.device(base)}


__all__ = ["METHODS", "AdapterView", "InputAdapter", "LayerAdapter", "Method", "MethodInfo", "PeftContext", "Selection",
           "bias_selections", "factory", "fused_dense", "method_for_peft_type", "peft_target_fields", "register"]
