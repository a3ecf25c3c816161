"""Two CPU processes under torchrun (gloo) give the adapter of one process with the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_train_fixtures import text_rows, tiny_llama_dir, write_jsonl

TOLERANCE = 1e-5  # float32 all-reduce (a + b) / 2 vs one mean over the combined batch: rounding only


METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    # freezes A and B of 2, then 3, then all 4 modules over the 3 steps: DDP must accept that
    "aflora": {"method": "aflora", "r": 4, "total_step": 3, "targets": ["q_proj", "v_proj"]},
}


def _config(d: Path, out: Path, batch_size: int, method: dict) -> Path:
    cfg = {"model": {"name": str(d / "llama")},
           "method": method,
           "data": {"task": "causal_lm", "train": str(d / "lm.jsonl"), "max_length": 16, "eval_size": 2},
           "train": {"max_steps": 3, "batch_size": batch_size, "lr": 1e-2, "progress": False, "eval_before": False},
           "output_dir": str(out)}
    path = d / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
@pytest.mark.parametrize("method", METHODS)
def test_two_process_ddp_equals_one_process_with_the_combined_batch(method, tmp_path):
    tiny_llama_dir(tmp_path / "llama")
    write_jsonl(tmp_path / "lm.jsonl", text_rows(40))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = [sys.executable, "-m", "slimtune", "train", str(_config(tmp_path, tmp_path / "one", 4, METHODS[method]))]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "slimtune", "train", str(_config(tmp_path, tmp_path / "two", 2, METHODS[method]))]
    for cmd in (one, two):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= TOLERANCE, k
    assert not (tmp_path / "two" / "checkpoints" / "step-3" / "adapter").with_suffix(".tmp").exists()
