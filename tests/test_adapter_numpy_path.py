"""The converter's numpy path (no torch, forked workers) against its torch path: same bytes.

Plain 16/32-bit bases with LoRA adapters are read, merged and packed in numpy, in worker processes that read
their own row blocks; sources that only load torch tensors (NF4 bases, DoRA, custom sources) keep the torch
path. Both must write the same file, and the numpy path must not import torch at all.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from adapter_helpers import copy_with_nan, make_adapter

from llmforge.errors import LlmforgeError
from llmforge.export import convert as convert_mod
from llmforge.export.adapter import read_adapter, resolve_base, staged_folder
from llmforge.export.convert import convert_model
from llmforge.export.gguf_header import read_header
from llmforge.export.merge import MergedSource
from llmforge.export.parallel import in_order
from llmforge.export.source import TensorSource

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TorchOnly(TensorSource):
    """A source that loads only torch tensors (what a custom or NF4 source looks like to the converter)."""

    def __init__(self, inner: TensorSource):
        self.inner = inner

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def load(self, name):
        return self.inner.load(name)


def _data(path):
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(header.data_start)
        return [(t.name, t.qtype) for t in header.tensors], f.read()


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory):
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("numpy-path")
    # mistral (small vocabulary): rotary permutes on merged q/k; embed_tokens + lm_head targets untie the output
    base = build_tiny_model("mistral", root / "base", dtype=torch.bfloat16, tie_word_embeddings=True)
    adapter, _ = make_adapter(base, root / "adapter", r=8, lora_alpha=16, std=0.02,
                              target_modules=ALL_LINEAR + ["embed_tokens", "lm_head"])
    return adapter


def _convert(adapter, out, quant, source_of, monkeypatch, threads):
    monkeypatch.setattr(convert_mod, "PARALLEL_MIN_ELEMENTS", 0)   # fork workers even for a tiny model
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 1 << 14)    # several row blocks per large tensor
    peft = read_adapter(adapter)
    base = resolve_base(peft)
    merged = MergedSource(peft, base)
    with staged_folder(base.path, adapter, merged.config_overrides()) as staged:
        convert_model(staged, out, quant, tensor_source=source_of(merged), name="t", progress=False,
                      threads=threads)
    return _data(out)


@pytest.mark.parametrize("quant", ["f16", "q4_k_m"])
def test_numpy_workers_write_the_torch_paths_bytes(bf16_adapter, tmp_path, monkeypatch, quant):
    assert MergedSource(read_adapter(bf16_adapter), resolve_base(read_adapter(bf16_adapter))).numpy_native
    workers = _convert(bf16_adapter, tmp_path / "w.gguf", quant, lambda s: s, monkeypatch, threads=2)
    inline = _convert(bf16_adapter, tmp_path / "i.gguf", quant, lambda s: s, monkeypatch, threads=1)
    torch_path = _convert(bf16_adapter, tmp_path / "t.gguf", quant, TorchOnly, monkeypatch, threads=2)
    assert workers[0] == torch_path[0]
    assert workers[1] == inline[1]
    assert workers[1] == torch_path[1]


def test_a_nan_in_a_worker_fails_with_the_tensor_name(bf16_adapter, tmp_path, monkeypatch):
    base = resolve_base(read_adapter(bf16_adapter)).path
    broken = copy_with_nan(base, tmp_path / "base", "model.layers.1.mlp.up_proj.weight", (7, 3))
    monkeypatch.setattr(convert_mod, "PARALLEL_MIN_ELEMENTS", 0)
    peft = read_adapter(bf16_adapter)
    merged = MergedSource(peft, resolve_base(peft, broken))
    out = tmp_path / "out.gguf"
    with pytest.raises(LlmforgeError, match=r"blk\.1\.ffn_up\.weight' holds 1 NaN"):
        with staged_folder(broken, bf16_adapter, merged.config_overrides()) as staged:
            convert_model(staged, out, "q8_0", tensor_source=merged, progress=False, threads=2)
    assert not out.exists()


def test_adapter_conversion_does_not_import_torch(bf16_adapter, tmp_path):
    script = textwrap.dedent("""
        import sys
        from llmforge.export.convert import convert
        convert(sys.argv[1], sys.argv[2], "q8_0")
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(bf16_adapter), str(tmp_path / "o.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def test_in_order_keeps_file_order_and_marks_every_tensor():
    a, b, c, d = (np.full(1, i) for i in range(4))
    streams = [[_done(a), b], [], [_done([c, d])]]
    got = [(i, None if x is None else int(x[0])) for i, x in in_order(streams, window=1)]
    assert got == [(0, None), (0, 0), (0, 1), (1, None), (2, None), (2, 2), (2, 3)]


@pytest.mark.parametrize("where", ["load_vocab", "blocks"])
def test_a_failure_after_the_fork_closes_the_workers(bf16_adapter, tmp_path, monkeypatch, where):
    from llmforge.export import parallel

    def broken(*args, **kwargs):
        raise LlmforgeError("broken tokenizer")

    monkeypatch.setattr(convert_mod, "PARALLEL_MIN_ELEMENTS", 0)
    # the vocabulary is read after the fork; the first jobs are planned right after it
    monkeypatch.setattr(convert_mod if where == "load_vocab" else convert_mod.ArrayJobs, where, broken)
    peft = read_adapter(bf16_adapter)
    base = resolve_base(peft)
    merged = MergedSource(peft, base)
    with pytest.raises(LlmforgeError, match="broken tokenizer"):
        with staged_folder(base.path, bf16_adapter, merged.config_overrides()) as staged:
            convert_model(staged, tmp_path / "o.gguf", "q8_0", tensor_source=merged, progress=False, threads=2)
    assert parallel._TASK is None  # the pool was shut down: the next conversion may fork its own
    assert not (tmp_path / "o.gguf").exists()
