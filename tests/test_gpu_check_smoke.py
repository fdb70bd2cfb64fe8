"""``benchmarks/gpu_kernels_check.py --small`` under Triton's interpreter: the GPU correctness script (every kernel
against its float32 reference, then a patched QLoRA training step against the unpatched one) runs on the CPU at tiny
sizes and passes, so the script that the device runs is checked before a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_passes_in_its_cpu_smoke_mode(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels_check.py"), "--small",
                           "--json", str(report)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "PASS: all checks" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| train step llama-tiny")]
    assert any("LoRA grads rel L2 vs fp32 ref" in row and "| PASS |" in row for row in rows), rows
    assert report.is_file()
