"""llama.cpp importance matrices: both file formats, llama-quantize's normalisation, model checks, and an
imatrix-weighted requantization byte-identical to ``llama_model_quantize`` given the same weights."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from llmforge.errors import LlmforgeError
from llmforge.quant.api import resolve_ftype
from llmforge.quant.imatrix import Imatrix, ImatrixEntry, load_imatrix, read_imatrix, write_imatrix
from llmforge.quant.requantize import quantize_gguf
from quant_oracle import gguf_tensors, llama_quantize_file
from quant_oracle import synthetic_gguf


def legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> bytes:
    """A legacy .dat file laid out by hand from llama.cpp's reader (common_imatrix_load_legacy)."""
    out = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, values.size),
                values.astype("<f4").tobytes()]
    out += [struct.pack("<ii", chunks, len(dataset)), dataset.encode()]
    return b"".join(out)


def test_legacy_format_is_read_and_normalised_by_ncall(tmp_path):
    sums = np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32)
    path = tmp_path / "m.dat"
    path.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (4, sums)}, 10, "wiki.txt"))
    im = read_imatrix(path)
    assert im.legacy and im.chunk_count == 10 and im.datasets == ["wiki.txt"]
    assert np.array_equal(load_imatrix(path)["blk.0.attn_q.weight"], sums / np.float32(4))
    # our writer lays the file out the same way
    write_imatrix(tmp_path / "again.dat", im, legacy=True)
    assert (tmp_path / "again.dat").read_bytes() == path.read_bytes()


def test_gguf_format_round_trip_and_per_expert_counts(tmp_path):
    sums = np.arange(1, 9, dtype=np.float32).reshape(2, 4)          # 2 experts x 4 columns
    im = Imatrix({"blk.0.ffn_up_exps.weight": ImatrixEntry(sums, np.array([2, 0]))}, ["data"], 3, 512)
    path = write_imatrix(tmp_path / "m.gguf", im)
    reader = gguf.GGUFReader(path)                                   # the layout llama-imatrix writes
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_size").contents() == 512
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes == {"blk.0.ffn_up_exps.weight.in_sum2": [4, 2], "blk.0.ffn_up_exps.weight.counts": [1, 2]}
    back = read_imatrix(path)
    assert not back.legacy and back.chunk_count == 3
    weights = load_imatrix(path)["blk.0.ffn_up_exps.weight"]
    # llama-quantize: sums / count per expert, and 1 where an expert was never hit
    assert np.array_equal(weights, np.array([0.5, 1, 1.5, 2, 1, 1, 1, 1], dtype=np.float32))


def test_model_mismatches_are_clear_errors(tmp_path):
    path = write_imatrix(tmp_path / "m.gguf", {"blk.0.attn_q.weight": np.ones(128, np.float32)})
    with pytest.raises(LlmforgeError, match="different model"):
        load_imatrix(path, {"blk.0.attn_q.weight": (256, 256)})
    with pytest.raises(LlmforgeError, match="names none"):
        load_imatrix(path, {"blk.0.attn_k.weight": (256, 128)})
    assert load_imatrix(path, {"blk.0.attn_q.weight": (64, 128)})["blk.0.attn_q.weight"].shape == (128,)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(LlmforgeError, match="not a llama.cpp imatrix"):
        read_imatrix(tmp_path / "junk.dat")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-64])   # a cut-off copy: tensor data missing
    with pytest.raises(LlmforgeError, match=r"imatrix file .*cut.gguf is truncated: tensor blk.0.attn_q.weight"):
        read_imatrix(tmp_path / "cut.gguf")
    with pytest.raises(LlmforgeError, match="is a folder"):
        read_imatrix(tmp_path)


@pytest.mark.parametrize("quant", ["q4_k_m", "q2_k", "q3_k_s", "q5_k_s", "q6_k", "q4_0", "q5_1"])
def test_imatrix_requantize_matches_llama_cpp(tmp_path, quant):
    """Weighted K-quants, the weighted legacy types and the imatrix-only q4_0 ffn_down rule, end to end."""
    src = tmp_path / "f32.gguf"
    shapes = synthetic_gguf(src, 16, 16, 4, False, 256, 256)
    rng = np.random.default_rng(3)
    importance = {n: (rng.random(s[-1]) * 2).astype(np.float32) ** 2
                  for n, s in shapes.items() if len(s) == 2 and "token_embd" not in n}
    imatrix_path = write_imatrix(tmp_path / "imatrix.gguf", importance)
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_file(src, ref, resolve_ftype(quant).file_type,
                        importance=load_imatrix(imatrix_path))
    report = quantize_gguf(src, ours, quant, imatrix=imatrix_path, progress=False)
    assert report.imatrix_entries > 0
    a, b = gguf_tensors(ref), gguf_tensors(ours)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert [n for n in a if a[n][1] != b[n][1]] == []
    assert ref.read_bytes() == ours.read_bytes()   # the whole file, KV order included
