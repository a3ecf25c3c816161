"""BitDelta: a fine-tuned model stored as its base plus 1 bit per weight and one scale per matrix.

BitDelta (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit", arXiv:2402.10193):
    delta = W_ft - W_base                          (d_out, d_in), per linear layer
    delta_hat = alpha * S,   S = sign(delta)        S in {-1, +1}: +1 where delta >= 0 (as the authors' code)
    alpha init = mean(|delta|)                      the L2-optimal scale for S: min_a ||delta - a S||_F
    y = base(x) + alpha * x @ S.T                   S unpacked per call; no float copy is kept at rest
Scale distillation (slimtune/delta.py, `st.compress_delta`) then trains only the alphas to match the
fine-tuned model's logits on a few batches.
Stored per matrix: S packed 8 signs per byte, a (d_out, ceil(d_in / 8)) uint8 buffer (never trained), and
alpha, shape (1,), the one trainable number; with `bias=True` also the target's bias delta, exact.
Merge: W += alpha * S, b += bias delta. Mixed batches (`adapter_names=`) run row group by row group, one
adapter at a time: a single batched op over k adapters would need k dense S at once (or a 1-bit bmm kernel
such as the authors' Triton one), so BitDelta has no `route_key`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.bases import kind_of, sizes
from slimtune.config import MethodConfig, check_field
from slimtune.errors import ConfigError, did_you_mean
from slimtune.methods.base import AdapterView, LayerAdapter, Method, factory, fused_dense, register


@dataclass
class BitDeltaConfig(MethodConfig):
    """BitDelta: y = base(x) + alpha * x @ sign(W_ft - W_base).T, one trainable alpha per matrix.

    Usually built by `st.compress_delta(finetuned, base)`, which also stores the tensors outside the
    targets that differ and calibrates the alphas.

    Args:
        finetuned: a fine-tuned checkpoint (a local HF model folder holding model.safetensors or its
            sharded index, or one .safetensors file). `st.attach(base, cfg)` then reads `<target>.weight`
            (and `.bias` with `bias=True`) from it and compresses it against the base; only the targets
            are read. None: the signs start empty, to be filled by `st.compress_delta` or `st.load`.
        bias: also carry each target's bias delta, exactly (d_out numbers per matrix, not trained).
    """

    targets: str | list[str] | None = "all-linear"
    finetuned: str | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.finetuned, Path):
            self.finetuned = str(self.finetuned)
        check_field(self.finetuned is None or (isinstance(self.finetuned, str) and self.finetuned != ""), self,
                    "finetuned", "None or the path of a fine-tuned checkpoint (HF folder or .safetensors file)")
        check_field(isinstance(self.bias, bool), self, "bias", "True or False")

    def resolve(self, module_name: str) -> BitDeltaConfig:
        """A copy that knows its module: `init` reads `<module_name>.weight` from `finetuned`."""
        resolved = replace(self)
        resolved.module_name = module_name  # not a field: never saved
        return resolved


# -- sign bits ---------------------------------------------------------------------------------------------
def pack_signs(delta: Tensor) -> Tensor:
    """(d_out, d_in) -> (d_out, ceil(d_in / 8)) uint8: bit k of byte j is 1 where delta[:, 8j + k] >= 0."""
    d_out, d_in = delta.shape
    bits = F.pad((delta >= 0).to(torch.uint8), (0, -d_in % 8))  # (d_out, 8 * n_bytes), zero padding
    shifts = torch.arange(8, device=delta.device, dtype=torch.uint8)
    return (bits.view(d_out, -1, 8) << shifts).sum(-1, dtype=torch.uint8)  # distinct powers of 2: no carry


def unpack_signs(packed: Tensor, d_in: int, dtype: torch.dtype) -> Tensor:
    """The (d_out, d_in) matrix of +1 / -1 that `pack_signs` packed, in `dtype`."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (d_out, n_bytes, 8)
    return bits.view(packed.shape[0], -1)[:, :d_in].to(dtype).mul_(2).sub_(1)


def compress(delta: Tensor) -> tuple[Tensor, Tensor]:
    """(packed signs, alpha = mean |delta|) of one (d_out, d_in) delta; alpha in float32."""
    return pack_signs(delta), delta.float().abs().mean()


class _SignLinear(torch.autograd.Function):
    """alpha * x @ S.T with S unpacked from its bits in forward and again in backward, so training keeps
    no float copy of S per layer (autograd over F.linear would save S for the input gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, alpha: Tensor, d_in: int) -> Tensor:
        h = F.linear(x, unpack_signs(packed, d_in, x.dtype))  # (..., d_out)
        ctx.save_for_backward(packed, alpha, h if ctx.needs_input_grad[2] else None)
        ctx.d_in = d_in
        return h * alpha

    @staticmethod
    def backward(ctx, grad: Tensor):
        packed, alpha, h = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ unpack_signs(packed, ctx.d_in, grad.dtype)) * alpha
        if ctx.needs_input_grad[2]:  # d/d alpha of sum(grad * alpha * h), summed in float32
            grad_alpha = torch.dot(grad.reshape(-1).float(), h.reshape(-1).float()).reshape(1).to(alpha.dtype)
        return grad_x, None, grad_alpha, None


class BitDelta(LayerAdapter):
    """alpha * sign matrix on a Linear, GPT-2 Conv1D or quantized Linear: y = base(x) + alpha * x @ S.T."""

    def __init__(self, base: nn.Module, cfg: BitDeltaConfig, init: bool = True) -> None:
        super().__init__()
        d_in, d_out = sizes(base)
        kw = factory(base)
        self.d_in = d_in
        self.register_buffer("signs", torch.zeros(d_out, -(-d_in // 8), dtype=torch.uint8, device=kw["device"]))
        self.alpha = nn.Parameter(torch.zeros(1, **kw))
        has_bias = cfg.bias and getattr(base, "bias", None) is not None
        self.register_buffer("bias_delta", torch.zeros(d_out, **kw) if has_bias else None)
        if init:
            weight, bias = finetuned_tensors(base, cfg)
            self.set_delta(weight - kind_of(base).weight(base).float(),
                           None if bias is None or not has_bias else bias - base.bias.float())

    @torch.no_grad()
    def set_delta(self, delta: Tensor, bias_delta: Tensor | None = None) -> None:
        """Compress `delta` (d_out, d_in): its signs, alpha = mean |delta|; `bias_delta` is kept exactly."""
        if tuple(delta.shape) != (self.signs.shape[0], self.d_in):
            raise ValueError(f"delta is {tuple(delta.shape)}, expected (d_out, d_in) = "
                             f"{(self.signs.shape[0], self.d_in)}")
        packed, alpha = compress(delta.to(self.signs.device))
        self.set_packed(packed, alpha, bias_delta)

    @torch.no_grad()
    def set_packed(self, packed: Tensor, alpha: Tensor | float, bias_delta: Tensor | None = None) -> None:
        """Put in already packed signs (as `pack_signs` gives them), the scale and an exact bias delta."""
        self.signs.copy_(packed)
        self.alpha.fill_(float(alpha))
        if bias_delta is not None:
            if self.bias_delta is None:
                raise ValueError("a bias delta was given but this adapter has no bias slot (BitDeltaConfig.bias="
                                 "False, or the base layer has no bias)")
            self.bias_delta.copy_(bias_delta)

    def sign_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """S, (d_out, d_in) of +1 / -1, built from the bits (a temporary: nothing keeps it)."""
        return unpack_signs(self.signs, self.d_in, dtype or self.alpha.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.alpha * self.sign_matrix()

    def forward(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        h = _SignLinear.apply(x.to(self.alpha.dtype), self.signs, self.alpha, self.d_in)
        if self.bias_delta is not None:
            h = h + self.bias_delta
        return base_out + h.to(base_out.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Inference, alone and active: one GEMM with W + alpha * S. Not while autograd records: that node
        would keep the dense W + alpha * S of every layer for backward."""
        if torch.is_grad_enabled():
            return None
        out = fused_dense(x, base, self.delta_weight(base))
        if out is None or self.bias_delta is None:
            return out
        return out + self.bias_delta.to(out.dtype)

    def merge(self, base: nn.Module) -> None:
        super().merge(base)
        if self.bias_delta is not None:
            base.bias.data.add_(self.bias_delta.to(base.bias.dtype))

    def unmerge(self, base: nn.Module) -> None:
        super().unmerge(base)
        if self.bias_delta is not None:
            base.bias.data.sub_(self.bias_delta.to(base.bias.dtype))



# -- fine-tuned checkpoints on disk ---------------------------------------------------------------------------
class CheckpointTensors(Mapping):
    """The tensors of a fine-tuned checkpoint, read lazily (safetensors only): a HF model folder
    (model.safetensors, or model.safetensors.index.json and its shards) or one .safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files = _checkpoint_files(self.path)

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        if key not in self._files:
            raise KeyError(key)
        with safe_open(str(self._files[key]), "pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        single = path / "model.safetensors"
        if not single.exists():
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json (found: "
                              f"{', '.join(found) or 'no weight files'}); pickle weights are refused, re-save with "
                              "save_pretrained(..., safe_serialization=True)")
        path = single
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"BitDeltaConfig.finetuned={str(path)!r}: expected a model folder or a .safetensors file")
    with safe_open(str(path), "pt") as f:
        return {k: path for k in f.keys()}


def checkpoint_weight(base: nn.Module, raw: Tensor, key: str) -> Tensor:
    """A checkpoint's tensor for `base`'s weight in the base kind's (d_out, d_in) layout, float32.

    The checkpoint holds the plain model: a tensor shaped like the module's own weight is read through the
    module's kind (GPT-2's Conv1D transposes it); on a quantized base the float Linear's (d_out, d_in) is taken."""
    d_in, d_out = sizes(base)
    own = base._parameters.get("weight")
    if own is not None and tuple(own.shape) == tuple(raw.shape) and own.is_floating_point():
        base._parameters["weight"] = nn.Parameter(raw.to(own.device), requires_grad=False)
        try:  # the kind reads the checkpoint's tensor as it reads the module's own
            return kind_of(base).weight(base).detach().float().clone()
        finally:
            base._parameters["weight"] = own
    if tuple(raw.shape) == (d_out, d_in):
        return raw.to(kind_of(base).device(base)).float()
    raise ConfigError(f"fine-tuned tensor {key!r} is {tuple(raw.shape)}, but the base module "
                      f"({type(base).__name__}) is d_in={d_in}, d_out={d_out}: the models differ in architecture")


def finetuned_tensors(base: nn.Module, cfg: BitDeltaConfig) -> tuple[Tensor, Tensor | None]:
    """(weight in kind layout, bias or None) of module `cfg.module_name` in checkpoint `cfg.finetuned`."""
    if cfg.finetuned is None:
        raise ConfigError("BitDeltaConfig.finetuned is not set: build BitDelta with st.compress_delta(finetuned, "
                          "base), or give finetuned=PATH of the fine-tuned checkpoint")
    name = getattr(cfg, "module_name", None)
    if name is None:
        raise ConfigError("BitDeltaConfig: init reads the fine-tuned weights by module name; attach through "
                          "st.attach / TunedModel.add (they resolve the config per module)")
    tensors = CheckpointTensors(cfg.finetuned)
    key = f"{name}.weight"
    if key not in tensors:
        raise ConfigError(f"BitDeltaConfig.finetuned={cfg.finetuned!r} has no tensor {key!r}: the checkpoint is "
                          f"another architecture." + did_you_mean(key, list(tensors)))
    weight = checkpoint_weight(base, tensors[key], key)
    bias = tensors.get(f"{name}.bias") if cfg.bias else None
    return weight, None if bias is None else bias.to(weight.device).float()


# -- the method ------------------------------------------------------------------------------------------------
@register
class BitDeltaMethod(Method):
    name, config, shape = "bitdelta", BitDeltaConfig, "layer"
    category, paper = "quantization", "arXiv:2402.10193"
    params = "1 (alpha; plus d_out*ceil(d_in/8) bytes of fixed signs)"
    mergeable, linear_only = True, True

    def plan(self, model: nn.Module, cfg: BitDeltaConfig, data: Iterable[dict] | None) -> BitDeltaConfig:
        """init=True: the checkpoint must be there before any layer is built (one clear error, not one per layer)."""
        if cfg.finetuned is None:
            raise ConfigError("BitDeltaConfig.finetuned is not set: build BitDelta with st.compress_delta(finetuned,"
                              " base), or give finetuned=PATH of the fine-tuned checkpoint")
        CheckpointTensors(cfg.finetuned)
        return cfg

    def build_layer(self, base: nn.Module, cfg: BitDeltaConfig, init: bool = True,
                    shared: nn.Module | None = None) -> LayerAdapter:
        return BitDelta(base, cfg, init)

    def describe(self, adapter: AdapterView, cfg: BitDeltaConfig) -> str:
        layers = list(adapter.layers.values())
        packed = sum(a.signs.numel() for a in layers)
        alphas = torch.cat([a.alpha.detach().float().reshape(-1) for a in layers])
        return (f"{len(layers)} sign matrices: {packed / 2**20:.2f} MiB packed (1 bit/weight); "
                f"alpha mean {alphas.mean().item():.3g}, range [{alphas.min().item():.3g}, {alphas.max().item():.3g}]")


__all__ = ["BitDelta", "BitDeltaConfig", "BitDeltaMethod", "CheckpointTensors", "checkpoint_weight", "compress",
           "finetuned_tensors", "pack_signs", "unpack_signs"]
