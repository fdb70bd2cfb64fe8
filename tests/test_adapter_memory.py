"""Peak memory: merging into a model several times larger than a memory bound stays under that bound.

A ~600 MB (f32) model is merged with an all-linear adapter, to GGUF and to 16-bit safetensors, in a
subprocess; its peak RSS (``VmHWM``) minus its RSS after imports must stay under 200 MB, and so must the
largest peak RSS of the converter's forked worker processes (which start with the parent's pages).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from adapter_helpers import make_adapter
from tiny_models import build_tiny_model

LIMIT_MB = 200

WORKER = textwrap.dedent("""
    import json, resource, sys
    import psutil, torch, gguf, safetensors, transformers, tokenizers, sentencepiece  # imports count as baseline
    from llmforge.export.adapter import convert_adapter
    from llmforge.export.merge import merge_to_hf
    import llmforge.export.convert, llmforge.export.tokenizer
    torch.set_num_threads(1)
    baseline = psutil.Process().memory_info().rss
    adapter, out = sys.argv[1], sys.argv[2]
    convert_adapter(adapter, out + "/merged.gguf", "f16")
    merge_to_hf(adapter, out + "/merged", max_shard_size="100MB", progress=False)
    # VmHWM belongs to this process's own address space; ru_maxrss would carry the forking parent's peak
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    peak = max(hwm_kb * 1024, psutil.Process().memory_info().rss)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # reaped when the convert ends
    print(json.dumps({"baseline": baseline, "peak": peak, "workers": workers}))
""")


@pytest.mark.slow
def test_merge_peak_memory_is_bounded(tmp_path):
    base = build_tiny_model("mistral", tmp_path / "big", hidden_size=512, intermediate_size=2048, num_layers=32,
                            num_heads=4)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert model_bytes > 3 * LIMIT_MB * 2**20, model_bytes
    adapter, _ = make_adapter(base, tmp_path / "adapter", r=16, lora_alpha=16, std=0.01,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", WORKER, str(adapter), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    used_mb = (result["peak"] - result["baseline"]) / 2**20
    assert (out / "merged.gguf").stat().st_size > LIMIT_MB * 2**20
    assert used_mb < LIMIT_MB, f"peak {used_mb:.0f} MB over baseline for a {model_bytes / 2**20:.0f} MB model"
    assert result["workers"] > 0, "the GGUF conversion ran no worker processes"
    worker_mb = (result["workers"] - result["baseline"]) / 2**20
    assert worker_mb < LIMIT_MB, f"a worker peaked {worker_mb:.0f} MB over the parent's baseline"
