"""st.compress_delta: a fine-tuned model as BitDelta sign bits and scales on its base, the scales then distilled.

    tuned = st.compress_delta(finetuned, base, data=batches)    # base is wrapped in place
    tuned.delta_reports["default"].gap_init, .gap_calibrated    # logit MSE before / after calibration
    tuned.save("delta/"); st.load(fresh_base, "delta/")
    st.compress_delta(other_finetuned, tuned, name="chat")      # a second delta on the same base
    tuned(**batch, adapter_names=["default", "chat", None])     # one fine-tune (or the base) per row

What is stored (BitDelta, Liu et al. 2024, arXiv:2402.10193; the layer is slimtune/methods/bitdelta.py):
- each target linear weight that differs: sign(W_ft - W_base) as bits + alpha = mean |W_ft - W_base|;
  targets equal in both models are left unwrapped;
- the biases of those targets, where they differ: the bias delta, exactly;
- any other tensor that differs (embeddings, norms, the output head, linear layers outside `targets`): the
  module owning it, exactly, as a `modules_to_save` copy (`others="error"` refuses them instead, naming each).
Mismatched architectures are refused, naming the first tensor that differs in name or shape.

Scale distillation trains only the alphas (AdamW, weight decay 0, cosine schedule, as the authors' code) on
    L = mean over non-padding tokens and the vocabulary of (z_ft - z_bitdelta)^2      z: logits
the MSE on logits the paper uses; the calibration batches are cycled for `steps` steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.bases import kind_of
from slimtune.errors import AdapterNameError, ConfigError
from slimtune.layer import AdapterLayer, SavedModule, base_name, is_adapter_tensor
from slimtune.methods.bitdelta import BitDelta, BitDeltaConfig, CheckpointTensors, checkpoint_weight, compress
from slimtune.targets import find_targets
from slimtune.tuned import TunedModel

Tensors = Mapping[str, Tensor]


@dataclass
class MatrixStats:
    """One compressed matrix: its delta and how well 1 bit + alpha approximates it."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    alpha: float  # mean |delta|, the init
    rel_error: float  # ||delta - alpha S||_F / ||delta||_F
    rel_delta: float  # ||delta||_F / ||W_base||_F
    alpha_calibrated: float | None = None


@dataclass
class DeltaReport:
    """What `compress_delta` stored for one adapter, and the logit gaps on the calibration batches."""

    name: str
    matrices: list[MatrixStats]
    unchanged: list[str]  # targets whose weight (and bias) are equal in both models: not wrapped
    exact: dict[str, int]  # module stored exactly (modules_to_save) -> its numbers
    bias_deltas: int  # target biases stored exactly
    sign_bytes: int
    gap_base: float | None = None  # logit MSE vs the fine-tuned model: the base alone
    gap_init: float | None = None  # the compressed model, alpha = mean |delta|
    gap_calibrated: float | None = None  # after scale distillation
    losses: list[float] = field(default_factory=list)

    @property
    def fp16_delta_bytes(self) -> int:
        """The compressed matrices' deltas stored densely in 16 bits: what the signs replace."""
        return sum(2 * m.shape[0] * m.shape[1] for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fp16_delta_bytes": self.fp16_delta_bytes}

    def table(self) -> str:
        """A few lines for people: sizes, what is exact, approximation error, logit gaps."""
        mib = 2**20
        errors = sorted(m.rel_error for m in self.matrices)
        ratios = sorted(m.rel_delta for m in self.matrices)
        lines = [f"BitDelta {self.name!r}: {len(self.matrices)} matrices compressed, {len(self.unchanged)} unchanged",
                 f"  signs {self.sign_bytes / mib:.2f} MiB (1 bit/weight) vs {self.fp16_delta_bytes / mib:.2f} MiB "
                 f"as an fp16 delta ({self.fp16_delta_bytes / max(self.sign_bytes, 1):.1f}x smaller)",
                 f"  ||delta|| / ||W_base||: median {_median(ratios):.3g}; 1-bit relative error: median "
                 f"{_median(errors):.3g}, max {errors[-1]:.3g}"]
        if self.bias_deltas:
            lines.append(f"  bias deltas stored exactly: {self.bias_deltas}")
        if self.exact:
            listed = ", ".join(f"{n} ({k:,})" for n, k in list(self.exact.items())[:6])
            more = f" and {len(self.exact) - 6} more" if len(self.exact) > 6 else ""
            lines.append(f"  stored exactly (differ, not targets): {listed}{more}")
        if self.gap_init is not None:
            after = "" if self.gap_calibrated is None else \
                f", calibrated {self.gap_calibrated:.4g} ({len(self.losses)} steps)"
            lines.append(f"  logit MSE vs the fine-tuned model: base {self.gap_base:.4g}, compressed "
                         f"{self.gap_init:.4g}{after}")
        return "\n".join(lines)


def _median(values: list[float]) -> float:
    return values[len(values) // 2] if values else float("nan")


# -- comparing the two models -----------------------------------------------------------------------------------
@dataclass
class _Plan:
    packed: dict[str, tuple[Tensor, Tensor, Tensor | None]]  # target -> (signs, alpha, bias delta or None)
    stats: list[MatrixStats]
    unchanged: list[str]
    exact: list[str]  # modules stored in full


def _base_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of the base, named as the unwrapped model names it."""
    return {base_name(k): t for k, t in model.state_dict(keep_vars=True).items() if not is_adapter_tensor(k)}


def _unwrapped(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer):
        return module.base_layer
    return module.original_module if isinstance(module, SavedModule) else module


class _Finetuned:
    """The fine-tuned tensors by base name; a tied tensor missing from a checkpoint is read under its alias."""

    def __init__(self, tensors: Tensors, base: dict[str, Tensor]) -> None:
        self.tensors = tensors
        by_id: dict[int, list[str]] = {}
        for k, t in base.items():
            by_id.setdefault(id(t), []).append(k)
        self.aliases = {k: names for names in by_id.values() for k in names}

    def get(self, key: str) -> Tensor | None:
        for k in [key, *self.aliases.get(key, [])]:
            if k in self.tensors:
                return self.tensors[k]
        return None


def _check_names(ft: _Finetuned, base: dict[str, Tensor], buffers: set[str], targets: list[str]) -> None:
    extra = [k for k in ft.tensors if k not in base and not any(k.startswith(t + ".") for t in targets)]
    if extra:
        raise ConfigError(f"the fine-tuned model has tensor {extra[0]!r} that the base has not ({len(extra)} such): "
                          "the models differ in architecture")
    missing = [k for k in base if ft.get(k) is None and k not in buffers and not any(k.startswith(t + ".")
                                                                                     for t in targets)]
    if missing:
        raise ConfigError(f"the base has tensor {missing[0]!r} that the fine-tuned model has not ({len(missing)} "
                          "such): the models differ in architecture")


def _compress_target(model: nn.Module, target: str, ft: _Finetuned, plan: _Plan) -> None:
    module = _unwrapped(model, target)
    if not kind_of(module).linear:
        raise ConfigError(f"compress_delta: target {target} is a {type(module).__name__}; BitDelta compresses linear "
                          "layers only (leave it out of targets: it is then stored exactly if it differs)")
    key = f"{target}.weight"
    raw = ft.get(key)
    if raw is None:
        raise ConfigError(f"the fine-tuned model has no tensor {key!r}: the models differ in architecture")
    W = kind_of(module).weight(module).detach().float()
    delta = checkpoint_weight(module, raw, key) - W
    bias_delta = _bias_delta(module, target, ft)
    if not delta.any() and (bias_delta is None or not bias_delta.any()):
        plan.unchanged.append(target)
        return
    packed, alpha = compress(delta)
    n, norm = delta.numel(), delta.norm().item()
    rel_error = math.sqrt(max(0.0, 1 - n * alpha.item() ** 2 / norm**2)) if norm > 0 else 0.0
    plan.packed[target] = (packed, alpha, bias_delta if bias_delta is not None and bias_delta.any() else None)
    plan.stats.append(MatrixStats(target, tuple(delta.shape), alpha.item(), rel_error, norm / max(W.norm().item(),
                                                                                                  1e-30)))


def _bias_delta(module: nn.Module, target: str, ft: _Finetuned) -> Tensor | None:
    key, bias = f"{target}.bias", getattr(module, "bias", None)
    raw = ft.get(key)
    if (bias is None) != (raw is None):
        has = "the fine-tuned model" if bias is None else "the base"
        raise ConfigError(f"tensor {key!r}: only {has} has it; the models differ in architecture")
    if bias is None:
        return None
    if tuple(raw.shape) != tuple(bias.shape):
        raise ConfigError(f"tensor {key!r} is {tuple(raw.shape)} in the fine-tuned model and {tuple(bias.shape)} in "
                          "the base: the models differ in architecture")
    return raw.to(bias.device).float() - bias.detach().float()


def _differing_others(model: nn.Module, base: dict[str, Tensor], ft: _Finetuned, targets: list[str]) -> list[str]:
    """Names of the tensors outside the targets whose values differ (shapes must agree)."""
    out = []
    for key, t in base.items():
        if any(key.startswith(tg + ".") for tg in targets):
            continue
        value = ft.get(key)
        if value is None:
            continue  # a buffer the checkpoint does not hold: the base's stands
        if tuple(value.shape) != tuple(t.shape):
            raise ConfigError(f"tensor {key!r} is {tuple(value.shape)} in the fine-tuned model and {tuple(t.shape)} "
                              "in the base: the models differ in architecture (a resized vocabulary?)")
        if not torch.equal(value.to(t.device, t.dtype), t.detach()):
            out.append(key)
    return out


def _owners(model: nn.Module, keys: list[str]) -> list[str]:
    """The leaf modules owning `keys`, to store exactly; refuses tensors of the root or of non-leaf modules."""
    owners: list[str] = []
    for key in keys:
        owner = key.rpartition(".")[0]
        module = _unwrapped(model, owner) if owner else model
        if not owner or any(True for _ in module.children()):
            raise ConfigError(f"tensor {key!r} differs but belongs to {owner or 'the root module'} "
                              f"({type(module).__name__}), which holds other modules: it cannot be stored exactly "
                              "on its own; make it a target or fold it into the base first")
        if owner not in owners:
            owners.append(owner)
    return owners


def plan_delta(finetuned: Tensors, model: nn.Module, targets: str | list[str] = "all-linear",
               exclude: str | list[str] | None = None, others: str = "save") -> _Plan:
    """Compare the models; compress each differing target; name the other differing modules."""
    saved = {n for n, m in model.named_modules() if isinstance(m, SavedModule)}
    names = find_targets(model, BitDeltaConfig(targets=targets, exclude=exclude), skip=saved)
    base = _base_tensors(model)
    ft = _Finetuned(finetuned, base)
    buffers = set(base) - {base_name(n) for n, _ in model.named_parameters(remove_duplicate=False)
                            if not is_adapter_tensor(n)}
    _check_names(ft, base, buffers, names)
    for t in names:
        extra = [k for k in ft.tensors if k.startswith(t + ".") and k not in (f"{t}.weight", f"{t}.bias")]
        if extra:
            raise ConfigError(f"the fine-tuned model has tensor {extra[0]!r} that the base's {t} has not")
    plan = _Plan({}, [], [], [])
    for t in names:
        _compress_target(model, t, ft, plan)
    differing = _differing_others(model, base, ft, names)
    if differing and others == "error":
        raise ConfigError(f"compress_delta(others='error'): {len(differing)} tensor(s) outside the targets differ, "
                          f"first {', '.join(differing[:5])}; pass others='save' to store them exactly, or target them")
    plan.exact = _owners(model, differing)
    if not plan.packed:
        raise ConfigError("compress_delta: no target weight differs between the fine-tuned model and the base; "
                          "nothing for BitDelta to compress" + (f" (other tensors differ: {', '.join(differing[:5])})"
                                                                if differing else ""))
    return plan


# -- building the adapter ---------------------------------------------------------------------------------------
def compress_delta(finetuned: nn.Module | Tensors | str | Path, base: nn.Module, *,
                   targets: str | list[str] = "all-linear", exclude: str | list[str] | None = None,
                   data: list[dict] | None = None, steps: int = 100, lr: float = 1e-4, name: str = "default",
                   others: str = "save", progress: bool = True) -> TunedModel:
    """Attach `finetuned - base` to `base` as a BitDelta adapter `name`; with `data`, distill its scales.

    Args:
        finetuned: the fine-tuned model (same architecture as `base`), its state dict, or its checkpoint folder
            (safetensors). Calibration needs the model itself.
        base: the base model, or a TunedModel of it already holding other adapters (deltas of other fine-tunes).
        targets / exclude: which linear layers are compressed (as in every config; default every linear layer
            but the output head). Targets whose weights are equal are not wrapped.
        data: calibration batches (dicts with input_ids and, optionally, attention_mask); None: no calibration.
        steps / lr: scale distillation (defaults: the authors' code, 100 steps at 1e-4).
        others: "save" stores differing tensors outside the targets exactly (full module copies); "error" refuses.
        progress: a tqdm bar during calibration.
    Returns:
        The TunedModel, `name` active (unless other adapters already were); `.delta_reports[name]` is the
        DeltaReport: per-matrix stats, what is stored exactly, the logit gaps before and after calibration.
    Raises:
        ConfigError: the models differ in architecture (the message names the tensor), nothing differs, or a
            differing tensor cannot be stored exactly.
    """
    _check_arguments(finetuned, data, steps, lr, others)
    tuned = base if isinstance(base, TunedModel) else None
    model = tuned.model if tuned is not None else base
    if tuned is not None:
        _refuse_changed_base(tuned, name)
    source = finetuned.state_dict(keep_vars=True) if isinstance(finetuned, nn.Module) else \
        CheckpointTensors(finetuned) if isinstance(finetuned, (str, Path)) else finetuned
    plan = plan_delta(source, model, targets, exclude, others)
    config = BitDeltaConfig(targets=list(plan.packed), bias=any(b is not None for *_, b in plan.packed.values()),
                            modules_to_save=plan.exact or None)
    tuned = tuned if tuned is not None else TunedModel(base)
    previous = tuned.active
    tuned.add(config, name, init=False)
    _fill(tuned, name, plan, _Finetuned(source, _base_tensors(model)))
    report = DeltaReport(name, plan.stats, plan.unchanged,
                         {n: sum(t.numel() for t in _unwrapped(model, n).state_dict().values()) for n in plan.exact},
                         sum(b is not None for *_, b in plan.packed.values()),
                         sum(p.numel() for p, _, _ in plan.packed.values()))
    if data is not None:
        _calibrate_into(report, tuned, finetuned, data, steps, lr, progress)
    tuned.use(previous or [name])
    reports = vars(tuned).setdefault("delta_reports", {})
    reports[name] = report
    return tuned


def _check_arguments(finetuned: Any, data: Any, steps: int, lr: float, others: str) -> None:
    if isinstance(finetuned, TunedModel):
        raise ConfigError("compress_delta: finetuned is a TunedModel; pass the plain fine-tuned model, e.g. "
                          "finetuned.detach(merge=True)")
    if data is not None and not isinstance(finetuned, nn.Module):
        raise ConfigError("compress_delta(data=...): calibration needs the fine-tuned model itself (its logits), "
                          f"got {type(finetuned).__name__}")
    if others not in ("save", "error"):
        raise ConfigError(f"compress_delta(others={others!r}): expected 'save' or 'error'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"compress_delta(steps={steps!r}): expected an int >= 0")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"compress_delta(lr={lr!r}): expected a number > 0")


def _refuse_changed_base(tuned: TunedModel, name: str) -> None:
    """The delta is taken against the base's weights: they must be the original ones."""
    if name in tuned.configs:
        raise AdapterNameError(f"an adapter named {name!r} already exists; pass another name=")
    for layer_name, layer in tuned._layers(named=True):
        if layer.merged:
            raise ConfigError(f"compress_delta: adapters are merged into {layer_name}; call unmerge() first")
        residual = [n for n, a in layer.adapters.items() if a.changes_base]
        if residual:
            raise ConfigError(f"compress_delta: adapter {residual[0]!r} changed the base weight of {layer_name} "
                              "(a residual init); compress against a base without it")


@torch.no_grad()
def _fill(tuned: TunedModel, name: str, plan: _Plan, ft: _Finetuned) -> None:
    for target, (packed, alpha, bias_delta) in plan.packed.items():
        adapter = tuned.model.get_submodule(target).adapters[name]
        adapter.set_packed(packed, alpha, bias_delta)
    for owner in plan.exact:
        copy = tuned.model.get_submodule(owner).modules_to_save[name]
        for key, t in copy.state_dict(keep_vars=True).items():
            value = ft.get(f"{owner}.{key}")
            if value is not None:
                t.data.copy_(value.to(t.device, t.dtype))


# -- scale distillation -----------------------------------------------------------------------------------------
def _calibrate_into(report: DeltaReport, tuned: TunedModel, finetuned: nn.Module, data: list[dict], steps: int,
                    lr: float, progress: bool) -> None:
    with tuned.disabled():
        report.gap_base = logit_gap(tuned, finetuned, data)
    tuned.use([report.name])
    report.gap_init = logit_gap(tuned, finetuned, data)
    if steps:
        report.losses = calibrate_scales(tuned, finetuned, data, name=report.name, steps=steps, lr=lr,
                                         progress=progress)
        tuned.use([report.name])
        report.gap_calibrated = logit_gap(tuned, finetuned, data)
    alphas = {n: a.alpha.item() for n, a in tuned.view(report.name).layers.items()}
    for m in report.matrices:
        m.alpha_calibrated = alphas[m.name] if steps else None


def calibrate_scales(tuned: TunedModel, finetuned: nn.Module, data: list[dict], *, name: str = "default",
                     steps: int = 100, lr: float = 1e-4, progress: bool = True) -> list[float]:
    """Scale distillation: train only BitDelta adapter `name`'s alphas so that its logits match `finetuned`'s.

    The loss is the logit MSE over non-padding tokens (`logit_mse`); AdamW (weight decay 0) with a cosine
    schedule over `steps`, cycling through `data`. Both models run in eval mode (no dropout). Returns the losses.
    """
    from tqdm.auto import tqdm

    batches = _batches(data)
    alphas = [a.alpha for a in tuned.view(name).layers.values() if isinstance(a, BitDelta)]
    if not alphas:
        raise ConfigError(f"calibrate_scales: adapter {name!r} has no BitDelta layers")
    previous, was_training = tuned.active, tuned.training
    tuned.use([name]).eval()
    ids = {id(a) for a in alphas}
    for _, p in tuned.trainable_parameters():
        p.requires_grad_(id(p) in ids)  # exact copies (modules_to_save) stay as the fine-tuned model has them
    opt = torch.optim.AdamW(alphas, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    losses: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc=f"calibrate {name}", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            batch = batches[step % len(batches)]
            loss = logit_mse(_student_logits(tuned, batch), _teacher_logits(finetuned, batch),
                             batch.get("attention_mask"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        bar.close()
        tuned.use(previous or [name]).train(was_training)  # use() also resets which tensors train
    return losses


def logit_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean over non-padding tokens and the vocabulary of (student - teacher)^2, in float32."""
    diff2 = (student.float() - teacher.to(student.device).float()).pow(2)  # (batch, tokens, vocab)
    if attention_mask is None:
        return diff2.mean()
    mask = attention_mask.to(diff2.device, diff2.dtype).unsqueeze(-1)
    return (diff2 * mask).sum() / (mask.sum() * diff2.shape[-1]).clamp_min(1)


@torch.no_grad()
def logit_gap(model: nn.Module, finetuned: nn.Module, data: list[dict]) -> float:
    """`logit_mse` of `model` against `finetuned`, averaged over the batches (both in eval mode)."""
    was = model.training
    model.eval()
    try:
        gaps = [logit_mse(_student_logits(model, b), _teacher_logits(finetuned, b), b.get("attention_mask")).item()
                for b in _batches(data)]
    finally:
        model.train(was)
    return sum(gaps) / len(gaps)


def _batches(data: list[dict]) -> list[dict]:
    batches = list(data)
    if not batches:
        raise ConfigError("calibration data: expected at least one batch")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not isinstance(b.get("input_ids"), Tensor):
            got = sorted(b) if isinstance(b, Mapping) else type(b).__name__
            raise ConfigError(f"calibration batch {i}: expected a dict with an 'input_ids' tensor (and optionally "
                              f"'attention_mask'), got {got}")
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]  # the loss is ours, not the LM's


def _device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return weight.device if isinstance(weight, Tensor) else next(model.parameters()).device


def _student_logits(model: nn.Module, batch: dict) -> Tensor:
    device = _device(model)
    return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}).logits


@torch.no_grad()
def _teacher_logits(finetuned: nn.Module, batch: dict) -> Tensor:
    finetuned.eval()
    device = _device(finetuned)
    return finetuned(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}).logits


__all__ = ["DeltaReport", "MatrixStats", "calibrate_scales", "compress_delta", "logit_gap", "logit_mse", "plan_delta"]
