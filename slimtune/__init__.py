"""slimtune: parameter-efficient fine-tuning of large pretrained models."""

__version__ = "0.1.0"

from slimtune import (
    optim,  # noqa: E402
    quant,  # noqa: E402  (registers the quantized base kinds)
)
from slimtune.composition import Average, Fuse, Parallel, Split, Stack  # noqa: E402
from slimtune.config import MethodConfig, config_from_dict, load_config  # noqa: E402
from slimtune.delta import DeltaReport, compress_delta  # noqa: E402
from slimtune.errors import (  # noqa: E402
    AdapterLoadError,
    AdapterNameError,
    AdapterSaveError,
    ConfigError,
    SlimtuneError,
    TargetNotFoundError,
)
from slimtune.methods import METHODS  # noqa: E402
from slimtune.methods.adalora import AdaLoraConfig  # noqa: E402
from slimtune.methods.adamix import AdaMixConfig  # noqa: E402
from slimtune.methods.adapter_fusion import FusionConfig  # noqa: E402
from slimtune.methods.adapters import BottleneckConfig  # noqa: E402
from slimtune.methods.adaption_prompt import AdaptionPromptConfig  # noqa: E402
from slimtune.methods.aflora import AfloraConfig  # noqa: E402
from slimtune.methods.attempt import AttemptConfig, add_attempt  # noqa: E402
from slimtune.methods.bitdelta import BitDeltaConfig  # noqa: E402
from slimtune.methods.bitfit import BitFitConfig  # noqa: E402
from slimtune.methods.child_tuning import ChildTuningDConfig, ChildTuningFConfig  # noqa: E402
from slimtune.methods.compacter import CompacterConfig  # noqa: E402
from slimtune.methods.diff_pruning import DiffPruningConfig  # noqa: E402
from slimtune.methods.dylora import DyLoraConfig  # noqa: E402
from slimtune.methods.fishmask import FishMaskConfig  # noqa: E402
from slimtune.methods.fourierft import FourierFTConfig  # noqa: E402
from slimtune.methods.freeze import FreezeConfig  # noqa: E402
from slimtune.methods.hra import HRAConfig  # noqa: E402
from slimtune.methods.hybrid import HybridConfig  # noqa: E402
from slimtune.methods.hydralora import HydraLoraConfig  # noqa: E402
from slimtune.methods.ia3 import IA3Config  # noqa: E402
from slimtune.methods.ln_tuning import LnTuningConfig  # noqa: E402
from slimtune.methods.loha_lokr import LohaConfig, LokrConfig  # noqa: E402
from slimtune.methods.lora import DoraConfig, LoraConfig  # noqa: E402
from slimtune.methods.lora_sp import LoraSPConfig  # noqa: E402
from slimtune.methods.lt_sft import LtSftConfig  # noqa: E402
from slimtune.methods.moe import MoEConfig, MoVConfig  # noqa: E402
from slimtune.methods.moelora import MoeLoraConfig, merge_for_task  # noqa: E402
from slimtune.methods.mpt import MptConfig  # noqa: E402
from slimtune.methods.oft import BoftConfig, OftConfig  # noqa: E402
from slimtune.methods.p_tuning import PTuningConfig  # noqa: E402
from slimtune.methods.pasta import PastaConfig  # noqa: E402
from slimtune.methods.peqa import PeqaConfig  # noqa: E402
from slimtune.methods.periodic_lora import PeriodicLoraConfig  # noqa: E402
from slimtune.methods.poly import PolyConfig  # noqa: E402
from slimtune.methods.prefix_tuning import PrefixTuningConfig  # noqa: E402
from slimtune.methods.prompt_tuning import PromptTuningConfig  # noqa: E402
from slimtune.methods.qa_lora import QaLoraConfig  # noqa: E402
from slimtune.methods.sora import SoraConfig  # noqa: E402
from slimtune.methods.spt import SptConfig  # noqa: E402
from slimtune.methods.ssf import SsfConfig  # noqa: E402
from slimtune.methods.trainable_tokens import TrainableTokensConfig  # noqa: E402
from slimtune.methods.vera import VeraConfig  # noqa: E402
from slimtune.multitask import LoraHubResult, lorahub, merge_adapters  # noqa: E402
from slimtune.multitask.prompt_transfer import prompt_similarity, rank_sources, spot_init  # noqa: E402
from slimtune.quant import dequantize, quantize  # noqa: E402
from slimtune.tuned import TunedModel, attach, load  # noqa: E402

__all__ = [
    "Stack",
    "Split",
    "Parallel",
    "FusionConfig",
    "Fuse",
    "Average",
    "METHODS",
    "AdaLoraConfig",
    "AdaMixConfig",
    "AdaptionPromptConfig",
    "AfloraConfig",
    "AdapterLoadError",
    "AttemptConfig",
    "AdapterNameError",
    "AdapterSaveError",
    "BitDeltaConfig",
    "BitFitConfig",
    "BoftConfig",
    "BottleneckConfig",
    "ChildTuningDConfig",
    "ChildTuningFConfig",
    "CompacterConfig",
    "ConfigError",
    "DeltaReport",
    "DiffPruningConfig",
    "DoraConfig",
    "DyLoraConfig",
    "FishMaskConfig",
    "FourierFTConfig",
    "FreezeConfig",
    "HRAConfig",
    "HybridConfig",
    "HydraLoraConfig",
    "IA3Config",
    "LnTuningConfig",
    "LohaConfig",
    "LokrConfig",
    "LoraConfig",
    "LoraHubResult",
    "LoraSPConfig",
    "LtSftConfig",
    "MethodConfig",
    "MoEConfig",
    "MoVConfig",
    "MoeLoraConfig",
    "MptConfig",
    "OftConfig",
    "PTuningConfig",
    "PastaConfig",
    "PeqaConfig",
    "PeriodicLoraConfig",
    "PolyConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QaLoraConfig",
    "SlimtuneError",
    "SoraConfig",
    "SptConfig",
    "SsfConfig",
    "TargetNotFoundError",
    "TrainableTokensConfig",
    "TunedModel",
    "VeraConfig",
    "add_attempt",
    "attach",
    "compress_delta",
    "config_from_dict",
    "dequantize",
    "load",
    "load_config",
    "lorahub",
    "merge_adapters",
    "merge_for_task",
    "optim",
    "prompt_similarity",
    "quant",
    "quantize",
    "rank_sources",
    "spot_init",
]


def __getattr__(name: str):
    """`st.Trainer` / `st.TrainConfig` without importing the training stack at `import slimtune`."""
    if name in ("Trainer", "TrainConfig"):
        import slimtune.train as _train

        return getattr(_train, name)
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
