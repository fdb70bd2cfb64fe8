"""llmforge's f32 GGUF runs in llama.cpp exactly like the file llama.cpp's own convert_hf_to_gguf.py writes.

This separates converter errors from runtime numerics: the same weights through the same runtime must give
the same logits (relative error < 1e-6). The converter comes from the llama-cpp-python sdist (PyPI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from gguf import GGUFReader

from llmforge.export.convert import convert_model
from oracles import llama_cpp_logits, rel_error, sample_ids

SDIST = Path.home() / ".cache" / "llmforge" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
# gemma2: llama.cpp's converter requires tokenizer.model, which the Gemma fixture (a tokenizer.json) lacks.
# gemma3: it accepts the fixture as a gpt2 BPE vocabulary (its chktxt hash collides with another model's);
# the vocabulary differs from ours but the logits for the same ids must not.
ANCHOR_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]


def find_sdist() -> Path | None:
    if SDIST.is_file():
        return SDIST
    env = os.environ.get("LLAMA_CPP_SDIST")
    return Path(env) if env and Path(env).is_file() else None


def extract_converter(root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the sdist, under ``root``;
    skips the test when the sdist is missing."""
    sdist = find_sdist()
    if sdist is None:
        pytest.skip(f"llama-cpp-python sdist not found at {SDIST} (set LLAMA_CPP_SDIST)")
    with tarfile.open(sdist) as tar:
        wanted = [m for m in tar.getmembers() if any(p in m.name for p in MEMBERS)]
        tar.extractall(root, members=wanted, filter="data")
    return next(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


@pytest.fixture(scope="module")
def anchor_converter(tmp_path_factory) -> Path:
    return extract_converter(tmp_path_factory.mktemp("llama.cpp"))


def run_anchor(script: Path, model_dir: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    return subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def vocabulary(path: Path) -> dict[str, list]:
    reader = GGUFReader(path)
    return {k: reader.get_field(k).contents() for k in VOCAB_KEYS if reader.get_field(k) is not None}


@pytest.mark.parametrize("arch", ANCHOR_ARCHS)
def test_same_llama_cpp_logits_as_llama_cpp_converter(arch, anchor_converter, tiny_model_dir, tmp_path):
    model = tiny_model_dir(arch)
    anchor, ours = tmp_path / "anchor.gguf", tmp_path / "ours.gguf"
    proc = run_anchor(anchor_converter, model, anchor)
    assert proc.returncode == 0, proc.stderr[-2000:]
    convert_model(model, ours, "f32", progress=False)
    ids = sample_ids(model)
    reference = llama_cpp_logits(anchor, ids)
    err = rel_error(llama_cpp_logits(ours, ids), reference)
    assert err < 1e-6, f"{arch}: llmforge vs llama.cpp converter, relative logit error {err:.2e}"
    if arch != "gemma3":  # see ANCHOR_ARCHS: llama.cpp misreads the Gemma fixture's vocabulary
        theirs, mine = vocabulary(anchor), vocabulary(ours)
        for key in VOCAB_KEYS:
            a, b = theirs.get(key), mine.get(key)
            diff = [i for i in range(len(a or [])) if b is None or i >= len(b) or a[i] != b[i]]
            assert a == b, f"{arch}: {key} differs from llama.cpp's converter at {len(diff)} ids, first {diff[:5]}"
