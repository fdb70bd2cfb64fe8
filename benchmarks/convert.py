"""Benchmark: ``llmforge convert --quant f16`` vs llama.cpp's ``convert_hf_to_gguf.py`` on a ~0.5B model.

Builds a random-weight model with Qwen2.5-0.5B's shapes (bf16 safetensors, the real Qwen2 fixture tokenizer),
converts it with both tools in the same run (each in its own process, measured with ``os.wait4``), checks
that both files hold the same tensors, and prints time and peak-RSS ratios (llmforge / anchor).

    .venv/bin/python benchmarks/convert.py [--workdir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

SDIST = Path.home() / ".cache" / "llmforge" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768)


def build_model(out: Path) -> Path:
    """Build the model in a child process: this process must stay small, because a child's peak RSS
    (``ru_maxrss``) starts from its parent's size at fork time."""
    if not (out / "config.json").is_file():
        print(f"building a random Qwen2.5-0.5B-shaped model in {out} ...", file=sys.stderr)
        code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from tiny_models import build_tiny_model; "
                f"build_tiny_model('qwen2', sys.argv[2], dtype=torch.bfloat16, init_std=0.02, **{QWEN25_05B!r})")
        subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(out)], check=True)
    return out


def count_parameters(model: Path) -> int:
    """Sum of tensor sizes from the safetensors headers (no torch import here)."""
    import json
    import struct

    total = 0
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def extract_anchor(root: Path) -> Path:
    members = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
    scripts = list(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not scripts:
        with tarfile.open(SDIST) as tar:
            tar.extractall(root, members=[m for m in tar.getmembers() if any(p in m.name for p in members)],
                           filter="data")
        scripts = list(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return scripts[0]


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr_chunks = []
    while True:  # drain stderr so the child never blocks on a full pipe
        chunk = proc.stderr.read(65536)
        if not chunk:
            break
        stderr_chunks.append(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{b''.join(stderr_chunks).decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def same_tensors(a: Path, b: Path) -> bool:
    from llmforge.export.gguf_header import read_header  # imported after the measurements (it pulls in gguf)

    ta = {t.name: (t.shape, t.qtype) for t in read_header(a).tensors}
    tb = {t.name: (t.shape, t.qtype) for t in read_header(b).tensors}
    return ta == tb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmforge-bench-convert")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.workdir / "qwen2-0.5b")
    n_params = count_parameters(model)
    script = extract_anchor(args.workdir / "sdist")
    ours_out, anchor_out = args.workdir / "llmforge-f16.gguf", args.workdir / "anchor-f16.gguf"
    llmforge = [sys.executable, "-m", "llmforge.cli", "convert", str(model), "--quant", "f16", "-o", str(ours_out)]
    anchor = [sys.executable, str(script), str(model), "--outtype", "f16", "--outfile", str(anchor_out)]
    anchor_env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    import resource

    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for _ in range(args.repeats):  # alternate, so background load hits both alike
        a = measure(anchor, anchor_env)
        o = measure(llmforge, {**os.environ, "PYTHONPATH": str(REPO)})
        rows.append((o, a))
    ours_t = min(r[0][0] for r in rows)
    anchor_t = min(r[1][0] for r in rows)
    ours_rss = max(r[0][1] for r in rows)
    anchor_rss = max(r[1][1] for r in rows)
    print(f"model: random Qwen2.5-0.5B shapes, {n_params / 1e6:.0f}M parameters, bf16 safetensors "
          f"({sum(f.stat().st_size for f in model.glob('*.safetensors')) / 2**20:.0f} MiB)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, best of {args.repeats}")
    print(f"same tensors (names, shapes, types): {same_tensors(ours_out, anchor_out)}")
    print(f"parent RSS before the children (lower bound of their ru_maxrss): {parent_rss:.0f} MiB")
    print(f"{'':28}{'time s':>10}{'peak RSS MiB':>15}")
    print(f"{'llmforge convert --quant f16':28}{ours_t:>10.1f}{ours_rss:>15.0f}")
    print(f"{'convert_hf_to_gguf.py f16':28}{anchor_t:>10.1f}{anchor_rss:>15.0f}")
    print(f"{'ratio llmforge / anchor':28}{ours_t / anchor_t:>10.2f}{ours_rss / anchor_rss:>15.2f}")


if __name__ == "__main__":
    main()
