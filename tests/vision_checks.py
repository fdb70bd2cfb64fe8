"""Shared checks for the vision training tests: merge -> convert equals adapter -> convert; ship to the fake
Ollama server."""

from __future__ import annotations

import io
import math
from pathlib import Path


def assert_ship_sends_the_projector(adapter_dir: Path, name: str, tmp_path: Path) -> None:
    """``ship`` of a VLM adapter: the text GGUF is the model layer, the mmproj goes as the projector (its digest),
    the Modelfile's second FROM names it, the push verifies the vision capability and the template's render."""
    from fake_ollama import FakeOllama
    from test_ollama_ship import FAST, go_renderer

    from llmforge.export.ollama import file_sha256
    from llmforge.export.vision import mmproj_path
    from llmforge.pipeline import ship
    from llmforge.templates.modelfile import parse_modelfile

    with FakeOllama(renderer=go_renderer) as server:
        report = ship(adapter_dir, name=name, quant="q8_0", output_dir=tmp_path / "ship", host=server.url,
                      timeouts=FAST, progress=io.StringIO())
        model = server.models[name]
        assert model["blob"].read_bytes() == report.gguf.read_bytes()   # the text model is the model layer
    projector = mmproj_path(report.gguf)
    mf = parse_modelfile(report.modelfile.read_text())
    assert (mf.from_, mf.projector) == (f"./{report.gguf.name}", f"./{projector.name}")
    assert report.push.projector_digest == file_sha256(projector)
    assert model["projectors"] == [report.push.projector_digest]
    assert "projector (vision capability)" in report.push.verified
    assert report.push.render_check == "server render equals the chat template"


def tensor_bytes(path: Path) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """{tensor: (shape, type, bytes)} of a GGUF file, from llmforge's header reader (``gguf.GGUFReader`` takes
    seconds per file decoding a 151,936-token vocabulary)."""
    from gguf.constants import GGML_QUANT_SIZES

    from llmforge.export.gguf_header import read_header

    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            block, type_size = GGML_QUANT_SIZES[t.qtype]
            f.seek(header.data_start + t.offset)
            out[t.name] = (t.shape, t.qtype, f.read(math.prod(t.shape) // block * type_size))
    return out


def assert_merge_converts_like_the_adapter(merged_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """The merged folder and the adapter convert (f32) to the same text GGUF and mmproj tensors."""
    from llmforge.export.convert import convert
    from llmforge.export.vision import mmproj_path

    from_merged, from_adapter = tmp_path / "m.gguf", tmp_path / "a.gguf"
    convert(merged_dir, from_merged, "f32")
    convert(adapter_dir, from_adapter, "f32")
    for a, b in ((from_merged, from_adapter), (mmproj_path(from_merged), mmproj_path(from_adapter))):
        ours = tensor_bytes(a)
        assert ours and ours == tensor_bytes(b)
