"""benchmarks/gpu_step.py's harness on CPU (``--device cpu --quick``): the GPU run must not be its first run.

The suite is not registered with ``drt-peft bench``, whose full run would then fail on every
machine without a GPU; ``scripts/gpu_check.sh`` runs it on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_on_cpu_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu_step"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's drt_peft
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--quick", "--out", str(out)]
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    (model,) = report["models"].values()
    methods = [(row["method"], row["density"]) for row in model["rows"]]
    assert methods[0] == ("full fine-tuning", None)
    for density in (0.005, 0.01):
        for name in ("PEFT LoRA", "PEFT SHiRA", "DRT freeze", "DRT prune"):
            assert (name, density) in methods
    for row in model["rows"]:
        assert "error" not in row and row["q1_ms"] <= row["median_ms"] <= row["q3_ms"], row
    drt = {(r["method"], r["density"]): r for r in model["rows"] if r["method"].startswith("DRT")}
    for density in (0.005, 0.01):  # one ψ for both modes: the same d
        assert drt["DRT freeze", density]["trainable"] == drt["DRT prune", density]["trainable"] > 0
    assert model["kernels"] and not any(entry["errors"] for entry in model["kernels"])
    markdown = out.with_suffix(".md").read_text()
    assert "| DRT prune | 1% | sampled_addmm |" in markdown and "CSR products (fp32)" in markdown
