"""Regenerate tests/fixtures/adapterhub/: tiny AdapterHub adapters and the outputs AdapterHub computes with them.

AdapterHub (`adapters` 1.3.0) needs transformers 4.57, which cannot share slimtune's environment (transformers
5.x), so this script builds its own virtual environment (bench/adapterhub/.venv, git-ignored) and re-runs itself
inside it:

    python bench/adapterhub/make_fixtures.py            # creates the venv on first use (~1 min), then writes fixtures
    python bench/adapterhub/make_fixtures.py --venv DIR # another venv location

For each tiny random model (Llama, GPT-2, BERT; hidden size 32, 2 layers, vocabulary 128, fixed seeds) it writes

    <model>/base/                 config.json + model.safetensors, saved by transformers 4.57 before adapters.init
    <model>/<adapter>/            AdapterHub's save_adapter() folder (adapter_config.json, pytorch_adapter.bin or
                                  adapter.safetensors; head files only where noted)
    <model>/reference.safetensors input_ids, attention_mask, base logits, and logits per adapter (AdapterHub, eval)
    manifest.json                 versions, the adapters and their AdapterHub config classes, max |adapter - base|

Adapter weights are randomised (N(0, 0.2); LayerNorm weights 1 + N(0, 0.1)) so every adapter moves the output.
Nothing is downloaded at run time: models are built from configs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "tests" / "fixtures" / "adapterhub"
PINS = ["torch==2.13.0", "transformers==4.57.6", "adapters==1.3.0"]  # torch: the local CPU wheel (no CUDA download)
VOCAB, SEQ = 128, 7


# -- the environment --------------------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = "import torch, transformers, adapters; print(transformers.__version__, adapters.__version__)"
    ok = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if ok.returncode != 0 or ok.stdout.split() != ["4.57.6", "1.3.0"]:
        print(f"installing {' '.join(PINS)} into {venv} ...", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    return python


# -- inside the AdapterHub venv ---------------------------------------------------------------------------------
def build(out: Path) -> None:
    import shutil

    import adapters
    import torch
    import transformers
    from adapters import (
        CompacterConfig,
        CompacterPlusPlusConfig,
        DoubleSeqBnConfig,
        ParBnConfig,
        PrefixTuningConfig,
        SeqBnConfig,
    )
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "none are activated" between adapters
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    small = dict(reduction_factor=4)  # d = 32 -> m = 8 (Compacter: phm_dim 4 divides 32 and 8)

    def models():
        yield "llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64)
        yield "gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        yield "bert", transformers.BertForMaskedLM, transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=64)

    # name -> (AdapterHub config, save as safetensors?, keep the head files?)
    def adapter_configs(arch: str) -> dict:
        cfgs = {
            "seq_bn": (SeqBnConfig(**small), arch == "llama", arch == "llama"),  # Pfeiffer
            "double_seq_bn": (DoubleSeqBnConfig(**small), arch == "gpt2", False),  # Houlsby
            "par_bn": (ParBnConfig(), arch == "bert", False),  # He et al., parallel, scaling 4
            "compacter": (CompacterConfig(**small), False, False),
            "compacter_pp": (CompacterPlusPlusConfig(**small), True, False),
            # AdapterHub 1.3 cannot save prefix tuning as safetensors (its pool shares tensors): pickle only
            "prefix": (PrefixTuningConfig(prefix_length=4, bottleneck_size=16), False, False),
        }
        # ln_before=True: AdapterHub 1.3 cannot save these as safetensors either (adapter_down.0 is
        # adapter_norm_before): pickle only
        if arch == "llama":
            cfgs["prefix_flat"] = (PrefixTuningConfig(prefix_length=3, flat=True), False, False)
            cfgs["bn_options"] = (DoubleSeqBnConfig(reduction_factor=4, ln_before=True, ln_after=True,
                                                    non_linearity="tanh", leave_out=[0]), False, False)
            cfgs["par_bn_learned"] = (ParBnConfig(reduction_factor=8, scaling="learned", mh_adapter=True,
                                                  ln_before=True), False, False)
            cfgs["compacter_options"] = (CompacterConfig(reduction_factor=4, phm_rank=2, factorized_phm_rule=True,
                                                         non_linearity="relu"), True, False)
            cfgs["compacter_unshared"] = (CompacterPlusPlusConfig(reduction_factor=4, shared_phm_rule=False,
                                                                  shared_W_phm=False), True, False)
        if arch == "bert":
            cfgs["seq_bn_ln"] = (SeqBnConfig(reduction_factor=8, ln_before=True, ln_after=True,
                                             non_linearity="gelu"), False, False)
        return cfgs

    def randomise(model, name: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." not in pname:
                    continue
                noise = torch.randn(p.shape, generator=g)
                is_norm = "norm" in pname and pname.endswith("weight")
                p.copy_(1.0 + 0.1 * noise if is_norm else (1.0 + 0.2 * noise if pname.endswith("scaling") else
                                                            0.2 * noise))

    if out.exists():
        shutil.rmtree(out)
    manifest = {"adapters_version": adapters.__version__, "transformers_version": transformers.__version__,
                "torch_version": torch.__version__, "models": {}}
    for seed, (arch, cls, config) in enumerate(models()):
        # eager attention: under SDPA, AdapterHub 1.3's prefix tuning inverts transformers 4.57's boolean padding
        # mask (the prefix is masked out whenever attention_mask is given) and, without a mask, SDPA's is_causal
        # aligns the causal mask top-left over prefix + tokens; eager attention gives its intended outputs
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = cls(config).eval()
        base_dir = out / arch / "base"
        model.save_pretrained(base_dir, safe_serialization=True)
        for extra in ("generation_config.json",):
            (base_dir / extra).unlink(missing_ok=True)
        g = torch.Generator().manual_seed(100 + seed)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, -2:] = 0  # a right-padded row
        with torch.no_grad():
            refs = {"input_ids": ids, "attention_mask": mask,
                    "base": model(input_ids=ids, attention_mask=mask).logits.contiguous()}
        adapters.init(model)
        entry = manifest["models"][arch] = {"class": cls.__name__, "adapters": {}}
        for i, (name, (ah_cfg, safetensors, with_head)) in enumerate(adapter_configs(arch).items()):
            model.add_adapter(name, config=ah_cfg)
            randomise(model, name, seed=1000 * seed + i)
            model.set_active_adapters(name)
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            refs[name] = logits.contiguous()
            folder = out / arch / name
            model.save_adapter(str(folder), name, with_head=with_head, use_safetensors=safetensors)
            diff = (logits - refs["base"])[mask.bool()].abs().max().item()
            entry["adapters"][name] = {"config_class": type(ah_cfg).__name__, "files": sorted(os.listdir(folder)),
                                       "max_abs_diff_from_base": round(diff, 4)}
            model.set_active_adapters(None)
            print(f"{arch:6} {name:20} {type(ah_cfg).__name__:24} |adapter - base| max {diff:.3f}", flush=True)
        save_file(refs, str(out / arch / "reference.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=HERE / ".venv", help="the AdapterHub venv (default %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="fixture folder (default %(default)s)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        build(args.out)
        return
    python = ensure_venv(args.venv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    sys.exit(subprocess.run([str(python), __file__, "--inside", "--out", str(args.out)], env=env).returncode)


if __name__ == "__main__":
    main()
