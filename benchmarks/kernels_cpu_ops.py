#!/usr/bin/env python3
"""Host work of one patched QLoRA-style training step, counted on the CPU: the number of aten ops (and
their self CPU time) that torch.profiler records for forward + backward + AdamW of a tiny llama with
LoRA on all 7 projections, gradient checkpointing on, with ``patch_model`` (torch fallback kernels) and
without. The op count is what the GPU step pays in launches and Python dispatch, whatever the device.

  LLMFORGE_KERNELS=torch .venv/bin/python benchmarks/kernels_cpu_ops.py [--layers 4] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def build(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, use_cache=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # bf16 base, fp32 LoRA (PEFT upcasts adapters), as on the GPU
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


def measure(model, steps: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    counts = collections.Counter({e.key: e.count for e in aten})
    return {"aten_ops": sum(counts.values()), "aten_self_cpu_ms": sum(e.self_cpu_time_total for e in aten) / 1e3,
            "all_self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3, "wall_ms": wall * 1e3,
            "top": counts.most_common(top),
            "functions": {e.key: (e.count, e.cpu_time_total / max(e.count, 1)) for e in events
                          if e.key.endswith("Function") or e.key.endswith("FunctionBackward")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(1)
    from llmforge.kernels.patch import patch_model, unpatch_rope

    plain = build(a.layers)
    patched = copy.deepcopy(plain)
    report = patch_model(patched, offload_checkpointing=False)
    print(report.summary())
    for name, model in (("unpatched", plain), ("patched", patched)):
        r = measure(model, a.steps, a.top)
        print(f"{name}: {r['aten_ops']} aten ops, aten self CPU {r['aten_self_cpu_ms']:.1f} ms, all self CPU "
              f"{r['all_self_cpu_ms']:.1f} ms (profiled step), wall {r['wall_ms']:.1f} ms/step (unprofiled)")
        print("   top: " + ", ".join(f"{k[6:]} {v}" for k, v in r["top"]))
        for k, (n, us) in sorted(r["functions"].items()):
            print(f"   {k}: {n} calls, {us:.0f} us CPU total each")
    unpatch_rope(patched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
