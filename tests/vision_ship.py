"""Shared check for the vision tests: ship a trained VLM adapter to the fake Ollama server."""

from __future__ import annotations

import io
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
