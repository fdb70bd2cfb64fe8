"""GRPO on CUDA: QLoRA (NF4) base, llmforge's fused kernels patched in, generation through the patched model,
the KL reference through the same model with the adapter off, gradient checkpointing on.

Skipped without CUDA. On a GPU machine: `python3 -m pytest -q -s tests/test_grpo_gpu.py` (writes
$OUT/grpo_gpu.txt when OUT is set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA + kernels need CUDA")

LOW_IDS = '''
def low_ids(prompts, completions, completion_ids, **columns):
    return [sum(t < 64 for t in ids) / max(len(ids), 1) for ids in completion_ids]
'''


def test_qlora_grpo_with_kernels_raises_the_reward(tmp_path: Path, capfd) -> None:
    from llmforge.trainer.config import load_config
    from llmforge.trainer.example import DATA_PATH, build_base_model
    from llmforge.trainer.run import train

    base = build_base_model(tmp_path / "base")
    (tmp_path / "toy.py").write_text(LOW_IDS)
    config = load_config({
        "model": {"path": str(base), "load_in_4bit": True, "max_seq_length": 64},
        "data": {"path": str(DATA_PATH)}, "lora": {"r": 16, "alpha": 32},
        # 20 steps: where the reward takes off depends on bf16 rounding. On an H200 the first 6 steps' rewards are
        # the same with or without the exact-NF4 launch fix (ea0e1e8), then it rises at step 9 or at step 12;
        # 12 steps left the later run short of the threshold, 20 reach 1.0 by step 17.
        "train": {"method": "grpo", "output_dir": str(tmp_path / "out"), "max_steps": 20, "batch_size": 16,
                  "lr": 0.02, "lr_scheduler": "constant"},
        "grpo": {"num_generations": 4, "max_completion_length": 16, "beta": 0.05,
                 "rewards": [{"python": f"{tmp_path / 'toy.py'}:low_ids"}]}})
    result = train(config)
    err = capfd.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    report = [line for line in err.splitlines() if line.startswith(("kernels:", "log-probs:", "grpo ", "trained"))]
    report.append(f"{torch.cuda.get_device_name()}: {result.seconds:.1f} s for {result.steps} steps, "
                  f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "grpo_gpu.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    assert any(line.startswith("kernels:") for line in report), err[-2000:]
    assert "log-probs: fused linear + log-softmax" in report, err[-2000:]
    assert abs(log[0]["kl"]) < 1e-3, log[0]      # B = 0 at step 1: policy == adapter-disabled base (bf16 noise)
    first, last = sum(result.rewards[:3]) / 3, sum(result.rewards[-3:]) / 3
    assert last > first + 0.3, result.rewards
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
