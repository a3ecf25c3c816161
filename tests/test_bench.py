"""`slimtune bench methods --quick` runs and writes a row per exemplar (no timing is asserted)."""

from __future__ import annotations

import json

from slimtune.bench.methods import METHODS, PEFT_LACKS
from slimtune.cli import main


def test_bench_methods_quick_writes_rows_with_matching_parameter_counts(tmp_path):
    out = tmp_path / "methods.json"
    assert main(["bench", "methods", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    params, ratios = result["trainable_params"], result["ratios"]
    for method in METHODS:  # the same method has the same size in both libraries
        if method in PEFT_LACKS:
            continue
        assert params[f"ours_{method}"] == params[f"peft_{method}"] > 0
    assert params["ours_bitfit"] > 0 and "peft_bitfit" not in params
    assert set(ratios) == {f"train_{case}_vs_floor" for case in params}
    assert all(r > 0 for r in ratios.values())
    memory = result["saved_for_backward_mb"]
    assert set(memory) == set(params) | {"floor"} and all(m > 0 for m in memory.values())
