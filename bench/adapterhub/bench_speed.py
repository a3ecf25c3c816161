"""Train-step speed of AdapterHub 1.3's adapters on the bench model, as ratios to the frozen floor.

AdapterHub needs transformers 4.57, so this runs in bench/adapterhub/.venv (make_fixtures.py builds it):

    bench/adapterhub/.venv/bin/python bench/adapterhub/bench_speed.py   # writes bench/results/adapterhub.json

Same protocol as `slimtune bench methods` (Llama hidden 512, 4 layers, fp32, batch 4 x 256, AdamW steps
interleaved over rounds, medians, 2 threads): the ratios compare with that table's rows (bottleneck =
SeqBn/Pfeiffer after the FFN, compacter = Compacter++, mam, prefix tuning) measured in another process,
so only differences of several percent mean anything.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import adapters
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1408, vocab_size=4096)
CONFIGS = {  # name -> (config, attention): AdapterHub's prefix tuning is wrong under SDPA, so eager there
    "seq_bn (pfeiffer)": (lambda: adapters.SeqBnConfig(reduction_factor=16), "sdpa"),
    "double_seq_bn (houlsby)": (lambda: adapters.DoubleSeqBnConfig(reduction_factor=16), "sdpa"),
    "compacter++": (lambda: adapters.CompacterPlusPlusConfig(), "sdpa"),
    "par_bn": (lambda: adapters.ParBnConfig(reduction_factor=2), "sdpa"),
    "prefix_tuning (20)": (lambda: adapters.PrefixTuningConfig(prefix_length=20), "eager"),
    "mam": (lambda: adapters.MAMConfig(), "eager"),
}


def model(attention: str = "sdpa") -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, attn_implementation=attention)).train()


def floor(ids: torch.Tensor, attention: str):
    m = model(attention)
    m.requires_grad_(False)

    def step() -> None:
        x = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=x, labels=ids).loss.backward()

    return step


def with_adapter(config, ids: torch.Tensor, attention: str):
    m = model(attention)
    adapters.init(m)
    m.add_adapter("a", config=config)
    m.train_adapter("a")
    m.set_active_adapters("a")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in m.parameters() if p.requires_grad)


def main(rounds: int = 11) -> None:
    torch.set_num_threads(2)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))
    cases, params = {"floor_sdpa": floor(ids, "sdpa"), "floor_eager": floor(ids, "eager")}, {}
    for name, (make, attention) in CONFIGS.items():
        cases[name], params[name] = with_adapter(make(), ids, attention)
    for step in cases.values():
        step(), step()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    medians = {n: statistics.median(t) for n, t in times.items()}
    result = {"library": f"adapters {adapters.__version__}, transformers {transformers.__version__}",
              "model": SHAPE, "batch": [4, 256], "rounds": rounds, "trainable_params": params,
              "ratios": {f"train_{n}_vs_floor": medians[n] / medians[f"floor_{CONFIGS[n][1]}"] for n in params},
              "eager_vs_sdpa_floor": medians["floor_eager"] / medians["floor_sdpa"]}
    (ROOT / "bench" / "results" / "adapterhub.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in params:
        print(f"{name:<26} {params[name]:>10,} {result['ratios'][f'train_{name}_vs_floor']:>8.3f}")


if __name__ == "__main__":
    main()
