"""`benchmarks/gpu_check.py --device cpu --smoke`: the GPU check's every step at tiny shapes, so
that the script a GPU machine will run cannot rot before one is lent (the triton kernel runs in
triton's interpreter here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def test_gpu_check_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device",
                        "cpu", "--smoke", "--workdir", str(tmp_path)], capture_output=True,
                       text=True, check=False, timeout=900,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"solver", "layers", "quickstart"} <= set(result)
    # (a) both backends on both 70B-named slices at w3 and w4, the same loss up to ties
    assert {(row["tensor"], row["setting"]) for row in result["solver"]} == {
        (t, s) for t in ("q_proj", "down_proj") for s in ("w3g128", "w4g128")}
    for row in result["solver"]:
        assert row["triton_mw_s"] > 0 and row["reference_mw_s"] > 0
        assert abs(row["loss_ratio"] - 1) <= 1e-5, row
    # (b) every stage of the plan is in the table (no device peaks on a CPU)
    assert [st["stage"] for st in result["layers"]["stages"]] == [
        "embed", "hessian", "solve", "forward", "pack"]
    # (c) the same job on the same device: the same perplexity
    assert result["quickstart"]["ppl_ratio"] == 1.0
    assert "| (c) quick start |" in r.stdout
