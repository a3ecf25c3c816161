"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): virtual tokens from a prompt encoder.

    X' = [P; E(x)]      P = MLP(Z)  or  P = MLP(BiLSTM(Z))      Z: (p, d) trainable inputs of the encoder

The virtual tokens are placed as prompt tuning places its prompt (slimtune/methods/prompt_tuning.py:
p placeholder ids in front, attention mask 1, labels -100, positions shifted), so forward, padding and
`generate()` behave the same; HF PEFT puts them in front too (the paper also interleaves them with
anchor tokens). The encoder is HF PEFT's `PromptEncoder`:

    "mlp":  Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)        (always 3 layers)
    "lstm": BiLSTM(d -> h, encoder_num_layers, encoder_dropout) -> Linear(2h, 2h) -> ReLU -> Linear(2h, d)
    None:   P itself is trained (what a saved adapter loads as)

params: p*d + the encoder's while training; saved: p*d. As HF PEFT does (in every mode), files hold only
the computed virtual tokens `prompt_embeddings` (p, d), in both formats: the encoder is a training-time
reparameterisation and a loaded adapter trains P directly (`encoder=None`). st.Trainer's checkpoints
(params.safetensors) keep the encoder, so resuming a run is exact. Not mergeable.
Init: Z ~ N(0, 1) (PEFT's nn.Embedding), the encoder's Linear / LSTM layers as torch initialises them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.config import MethodConfig, check_field, config_from_dict
from slimtune.methods.base import PEFT_SHORT_PREFIX, AdapterView, Method, PeftContext, register
from slimtune.methods.prompt_tuning import SoftPrompt, prompt_learning_fields

_ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


@dataclass
class PTuningConfig(MethodConfig):
    """P-tuning.

    Args:
        num_virtual_tokens: p, the number of virtual tokens.
        encoder: the prompt encoder: "mlp" (PEFT's default), "lstm", or None (train the tokens directly).
        encoder_hidden_size: h, the encoder's hidden size (None: the model's embedding size d, as PEFT).
        encoder_num_layers: LSTM layers (encoder="lstm"); PEFT's MLP always has 3 linear layers.
        encoder_dropout: dropout between LSTM layers (encoder="lstm").
    """

    aliases = {**MethodConfig.aliases, "encoder_reparameterization_type": "encoder"}

    num_virtual_tokens: int = 20
    encoder: str | None = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("targets", "exclude", "layers"):
            check_field(getattr(self, name) is None, self, name, "None: P-tuning wraps no module")
        check_field(_positive_int(self.num_virtual_tokens), self, "num_virtual_tokens", "an int >= 1, e.g. 20")
        check_field(self.encoder in (*_ENCODERS, None), self, "encoder", "'mlp', 'lstm' or None")
        check_field(self.encoder_hidden_size is None or _positive_int(self.encoder_hidden_size), self,
                    "encoder_hidden_size", "None (the model's embedding size) or an int >= 1")
        check_field(_positive_int(self.encoder_num_layers), self, "encoder_num_layers", "an int >= 1")
        check_field(self.encoder != "mlp" or self.encoder_num_layers == 2, self, "encoder_num_layers",
                    "2 with encoder='mlp' (PEFT's MLP has a fixed 3 linear layers; the field sets LSTM layers)")
        check_field(isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1, self,
                    "encoder_dropout", "a float in [0, 1)")
        check_field(self.encoder_dropout == 0 or (self.encoder == "lstm" and self.encoder_num_layers > 1), self,
                    "encoder_dropout", "0 unless encoder='lstm' with encoder_num_layers > 1 (it acts between "
                    "LSTM layers only)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class PromptEncoder(nn.Module):
    """HF PEFT's P-tuning encoder (same submodule names: `lstm_head`, `mlp_head`), (p, d) -> (p, d)."""

    def __init__(self, cfg: PTuningConfig, d: int, **factory: Any) -> None:
        super().__init__()
        h = cfg.encoder_hidden_size or d
        self.lstm_head = None
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(),
                                          nn.Linear(2 * h, d, **factory))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **factory), nn.ReLU(), nn.Linear(h, h, **factory),
                                          nn.ReLU(), nn.Linear(h, d, **factory))

    def forward(self, z: Tensor) -> Tensor:
        if self.lstm_head is not None:
            z = self.lstm_head(z.unsqueeze(0))[0].squeeze(0)  # (p, 2h): both directions
        return self.mlp_head(z)


class PTuningPrompt(SoftPrompt):
    """Prompt tuning's soft prompt whose virtual tokens come out of a `PromptEncoder`."""

    def __init__(self, model: nn.Module, cfg: PTuningConfig, init: bool = True) -> None:
        super().__init__(model, cfg, init=False)  # self.embedding (p, d) is Z here, the encoder's input
        factory = {"dtype": self.embedding.dtype, "device": self.embedding.device}
        self.encoder = PromptEncoder(cfg, self.embedding.shape[1], **factory) if cfg.encoder else None
        if init:
            with torch.no_grad():
                self.embedding.normal_()

    def virtual_tokens(self) -> Tensor:
        return self.embedding if self.encoder is None else self.encoder(self.embedding)

    def export_tensors(self) -> dict[str, Tensor]:
        """The virtual tokens P (p, d), computed with the encoder in eval mode (no dropout)."""
        if self.encoder is None:
            return {"embedding": self.embedding}
        training = self.encoder.training
        try:
            with torch.no_grad():
                return {"embedding": self.encoder.eval()(self.embedding)}
        finally:
            self.encoder.train(training)


@register
class PTuningMethod(Method):
    name, config, shape = "p_tuning", PTuningConfig, "input"
    category, paper = "additive", "arXiv:2103.10385"
    params = "num_virtual_tokens*d_model saved (+ the prompt encoder while training)"
    mergeable, peft_type = False, "P_TUNING"
    module_prefix = PEFT_SHORT_PREFIX
    tensor_keys = {"embedding": "prompt_embeddings"}

    def build_input(self, model: nn.Module, cfg: PTuningConfig, init: bool = True) -> PTuningPrompt:
        return PTuningPrompt(model, cfg, init)

    def saved_config(self, cfg: PTuningConfig, adapter: AdapterView) -> PTuningConfig:
        # the file holds the computed tokens, trained directly once loaded
        return cfg.replace(encoder=None, encoder_dropout=0.0)

    def to_peft(self, cfg: PTuningConfig, ctx: PeftContext) -> dict[str, Any]:
        fields = prompt_learning_fields(ctx, "P_TUNING", cfg.num_virtual_tokens)
        return {
            **fields,
            "auto_mapping": None,
            # PEFT loads P_TUNING in inference mode: it uses prompt_embeddings as they are, whatever the type
            "encoder_reparameterization_type": _ENCODERS.get(cfg.encoder or "mlp"),
            "encoder_hidden_size": cfg.encoder_hidden_size or fields["token_dim"],
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        }

    def from_peft(self, data: dict[str, Any]) -> PTuningConfig:
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise NotImplementedError("P-tuning of encoder-decoder models (num_transformer_submodules=2) "
                                      "is not implemented")
        return config_from_dict({"method": "p_tuning", "num_virtual_tokens": int(data["num_virtual_tokens"]),
                                 "encoder": None, "modules_to_save": data.get("modules_to_save")})
