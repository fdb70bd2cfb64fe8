#!/usr/bin/env python3
"""Blob transfer cost of ``llmforge push`` against the simplest correct client, in the same run.

Both hash a file with sha256 and POST it to ``/api/blobs/<digest>`` of the test server (tests/fake_ollama.py,
on loopback). The anchor is ``hashlib.file_digest`` + ``requests.post(data=open(file))``; llmforge's path is
``OllamaClient.ensure_blob`` (HEAD, streamed body with progress). Prints seconds and peak traced Python
memory for each, and the ratios llmforge / anchor.

    .venv/bin/python benchmarks/ollama_push.py [--mib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_ollama import FakeOllama  # noqa: E402

from llmforge.export.ollama import OllamaClient, Timeouts, parse_host  # noqa: E402


def measure(fn) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.gguf"
        with open(path, "wb") as f:
            f.write(b"GGUF")
            block = bytes(range(256)) * 4096
            for _ in range(args.mib):
                f.write(block)

        def anchor(server: FakeOllama) -> None:
            with open(path, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            with open(path, "rb") as f:
                requests.post(f"{server.url}/api/blobs/{digest}", data=f, timeout=600).raise_for_status()

        def ours(server: FakeOllama) -> None:
            client = OllamaClient(parse_host(server.url), timeouts=Timeouts(5, 600, 600), progress=io.StringIO())
            assert client.ensure_blob(path)[1]

        rows = {}
        for label, fn in (("anchor", anchor), ("llmforge", ours)):
            with FakeOllama() as server:  # a fresh server each: both really upload
                rows[label] = measure(lambda: fn(server))
                assert server.uploads == 1
    for label, (seconds, peak) in rows.items():
        print(f"{label:<9} {seconds:7.2f} s  {args.mib / seconds:8.1f} MiB/s  peak {peak / 2**20:6.2f} MiB")
    (t_a, m_a), (t_o, m_o) = rows["anchor"], rows["llmforge"]
    print(f"ratio llmforge/anchor: time {t_o / t_a:.2f}x, peak memory {m_o / max(m_a, 1):.2f}x")


if __name__ == "__main__":
    main()
