"""`slimtune bench methods --quick` runs and writes a row per exemplar (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

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
        assert params[f"ours_{method}"] == params[f"peft_{method}"] > 0, method
    assert params["ours_bitfit"] > 0 and "peft_bitfit" not in params
    assert set(ratios) == {f"train_{case}_vs_floor" for case in params}
    assert all(r > 0 for r in ratios.values())
    memory = result["saved_for_backward_mb"]
    assert set(memory) == set(params) | {"floor"} and all(m > 0 for m in memory.values())
    assert set(result["inference_ratios"]) == {f"{case}_vs_base" for case in params if case != "full_ft"}
    assert set(result["adapter_file_bytes"]) == {c for c in params if c.startswith("ours_")}


@pytest.mark.slow
def test_bench_quality_only_reruns_the_named_rows_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "quality.json"
    out.write_text(json.dumps({"rows": {"ia3": {"before": 0.5, "after": 0.6}}}))
    assert main(["bench", "quality", "--quick", "--repeats", "2", "--only", "lora", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["lora", "ia3"] and rows["ia3"]["after"] == 0.6 and 0 <= rows["lora"]["after"] <= 1
    assert main(["bench", "quality", "--only", "lorra", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "'lorra': no such row" in err and "Did you mean 'lora'" in err
