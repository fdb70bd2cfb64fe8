"""Benchmark: PEFT adapter -> q4_k_m GGUF, llmforge in one pass vs the usual route, in the same run.

Usual route (what Unsloth's save_pretrained_gguf does): PEFT ``merge_and_unload`` + ``save_pretrained`` (16-bit)
-> llama.cpp ``convert_hf_to_gguf.py`` (bf16 GGUF) -> llama.cpp quantize (``llama_model_quantize``, Q4_K_M).
llmforge: ``llmforge convert adapter/ -q q4_k_m`` (streaming merge + native K-quants, no intermediate files).

Model: Qwen2-0.5B shape (hidden 896, 24 layers, ffn 4864, 14/2 heads, vocab 151,936, tied), random bf16
weights on the qwen2 fixture tokenizer; adapter: rank 16, alpha 16, all 7 linear projections, random factors.
Every step runs in its own process; peak memory (PSS, summed) is polled (psutil, 20 ms) over the process tree.
Threads: llama.cpp's quantize gets ``--threads``; llmforge's worker processes follow the CPU affinity, which is
limited to the first ``--threads`` CPUs for its step (the default, all CPUs, changes nothing). The load average
is printed before and after: on a shared machine, compare the two routes of one run, not runs.

Usage: .venv/bin/python benchmarks/adapter_convert.py [--workdir DIR] [--small] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SDIST = Path.home() / ".cache" / "llmforge" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
PY = sys.executable

SETUP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import build_tiny_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base, adapter, small = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    shape = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4) if small else \\
        dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_key_value_heads=2,
             init_std=0.02)
    build_tiny_model("qwen2", base, dtype=torch.bfloat16, **shape)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    cfg = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(adapter)
""")

PEFT_MERGE = textwrap.dedent("""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, adapter, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
""")

QUANTIZE = textwrap.dedent("""
    import sys, llama_cpp
    src, dst, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    sys.exit(rc)
""")


def run_measured(cmd: list[str], env: dict | None = None, cpus: set[int] | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak memory in bytes over the process and its children).

    Memory is the sum of PSS (proportional set size): forked worker processes share their parent's pages,
    and summing their RSS would count those pages once per worker. For a single process PSS ~ RSS.
    """
    start = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=pin)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_full_info().pss for p in (ps, *ps.children(recursive=True)))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"step failed ({' '.join(cmd[:3])} ...):\n{proc.stderr.read()[-3000:]}")
    return wall, peak


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def llama_cpp_source(workdir: Path) -> Path:
    root = workdir / "llama_cpp_src"
    if not (root / "llama_cpp_python-0.3.36").is_dir():
        with tarfile.open(SDIST) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       ("convert_hf_to_gguf" in m.name or "/gguf-py/" in m.name or "/conversion/" in m.name)]
            tar.extractall(root, members=members, filter="data")
    return root / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llmforge-bench-adapter"))
    ap.add_argument("--small", action="store_true", help="tiny model (smoke test of this script)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        print("setup: building the base model and adapter (not timed)", file=sys.stderr)
        subprocess.run([PY, "-c", SETUP.format(tests=str(REPO / "tests")), str(base), str(adapter),
                        "1" if args.small else "0"], check=True, stdout=subprocess.DEVNULL)
    src = llama_cpp_source(work)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    base_mb = tree_bytes(base) / 2**20

    # the usual route, three processes, two intermediates
    route = work / "usual"
    subprocess.run(["rm", "-rf", str(route)], check=True)
    route.mkdir()
    merged, bf16, final = route / "merged", route / "merged-bf16.gguf", route / "model-q4_k_m.gguf"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    steps = [
        ("peft merge_and_unload + save_pretrained", [PY, "-c", PEFT_MERGE, str(base), str(adapter), str(merged)], None),
        ("convert_hf_to_gguf.py --outtype bf16", [PY, str(src / "convert_hf_to_gguf.py"), str(merged), "--outtype",
                                                  "bf16", "--outfile", str(bf16)], env),
        ("llama_model_quantize Q4_K_M", [PY, "-c", QUANTIZE, str(bf16), str(final), str(args.threads)], None),
    ]
    usual_wall, usual_peak = 0.0, 0
    for label, cmd, step_env in steps:
        wall, peak = run_measured(cmd, step_env)
        usual_wall += wall
        usual_peak = max(usual_peak, peak)
        print(f"  usual: {label:<42} {wall:7.1f} s  peak PSS {peak / 2**20:7.0f} MiB", file=sys.stderr)
    usual_disk = tree_bytes(route)

    ours_dir = work / "llmforge"
    subprocess.run(["rm", "-rf", str(ours_dir)], check=True)
    ours_dir.mkdir()
    ours_out = ours_dir / "model-q4_k_m.gguf"
    available = sorted(os.sched_getaffinity(0))
    cpus = set(available[:args.threads]) if args.threads < len(available) else None
    ours_wall, ours_peak = run_measured([PY, "-m", "llmforge.cli", "convert", str(adapter), "-q", "q4_k_m",
                                         "-o", str(ours_out)], dict(os.environ, PYTHONPATH=str(REPO)), cpus)
    ours_disk = tree_bytes(ours_dir)

    print(f"adapter -> q4_k_m, base {base_mb:.0f} MiB bf16 ({'small' if args.small else 'Qwen2-0.5B shape'}), "
          f"rank-16 all-linear adapter, {args.threads} threads; load average before {load_before}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'':<10} {'wall s':>8} {'peak PSS MiB':>13} {'disk written MiB':>17} {'intermediate files':>19}")
    print(f"{'usual':<10} {usual_wall:8.1f} {usual_peak / 2**20:13.0f} {usual_disk / 2**20:17.0f} "
          f"{'2 (merged/, bf16 .gguf)':>19}")
    print(f"{'llmforge':<10} {ours_wall:8.1f} {ours_peak / 2**20:13.0f} {ours_disk / 2**20:17.0f} {'0':>19}")
    print(f"ratios llmforge/usual: wall {ours_wall / usual_wall:.2f}x, peak PSS {ours_peak / usual_peak:.2f}x, "
          f"disk written {ours_disk / usual_disk:.2f}x  (targets: <= 0.5x wall, <= 0.25x memory)")


if __name__ == "__main__":
    main()
