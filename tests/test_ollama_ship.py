"""ship = convert + Modelfile + push, on a tiny model: against the fake server, without any server, and (when an
``ollama`` binary is installed) end to end against a real ``ollama serve``.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_ollama import FakeOllama  # noqa: E402

from llmforge.errors import LlmforgeError  # noqa: E402
from llmforge.export.ollama import Timeouts, smoke_chat  # noqa: E402
from llmforge.pipeline import ship  # noqa: E402
from llmforge.templates.modelfile import parse_modelfile  # noqa: E402

FAST = Timeouts(connect=5.0, read=30.0, stream=120.0)  # generous: a loaded CI machine must not time out
ARCH = "mistral"  # the smallest vocabulary among the tiny models


def go_renderer(template: str, messages: list[dict]) -> str:
    from llmforge.templates import render_go

    return render_go(template, messages)


@pytest.fixture(scope="module", autouse=True)
def go_renderer_built():
    from llmforge.templates.go_render import gorender_binary

    return gorender_binary()  # build once up front, not inside a timed request


@pytest.fixture(scope="module")
def shipped(tiny_model_dir, tmp_path_factory):
    """One ship of the tiny model to a fake server; yields (report, server, output folder)."""
    out = tmp_path_factory.mktemp("ship") / "out"
    with FakeOllama(renderer=go_renderer) as server:
        report = ship(tiny_model_dir(ARCH), name="tiny-ship:q4", quant="q4_k_m", output_dir=out, host=server.url,
                      timeouts=FAST, progress=io.StringIO())
        yield report, server, out


def test_ship_writes_gguf_and_modelfile_and_creates_the_model(shipped):
    report, server, out = shipped
    assert report.pushed and not report.warnings
    assert report.gguf.parent == out and report.gguf.read_bytes()[:4] == b"GGUF"
    mf = parse_modelfile(report.modelfile.read_text())
    assert mf.from_ == f"./{report.gguf.name}" and (report.modelfile.parent / mf.from_).resolve() == report.gguf
    model = server.models["tiny-ship:q4"]
    assert model["template"] == mf.template and model["parameters"]["stop"] == mf.stops
    assert report.push.render_check == "server render equals the chat template"
    assert "template" in report.push.verified and "parameters" in report.push.verified
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files


def test_shipped_model_answers(shipped):
    _, server, _ = shipped
    result = smoke_chat("tiny-ship:q4", "Hello", host=server.url, out=io.StringIO(), timeouts=FAST,
                        progress=io.StringIO())
    assert result.text and result.done_reason == "stop"


def test_ship_an_adapter_folder_merges_and_takes_the_base_template(tiny_model_dir, tmp_path):
    from adapter_helpers import make_adapter

    base = tiny_model_dir(ARCH)
    adapter, _ = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with FakeOllama(renderer=go_renderer) as server:
        report = ship(adapter, name="tiny-adapter", quant="q8_0", output_dir=tmp_path / "out", base=base,
                      host=server.url, timeouts=FAST, progress=io.StringIO())
        model = server.models["tiny-adapter:latest"]
    assert report.pushed and report.push.render_check == "server render equals the chat template"
    assert model["template"] == parse_modelfile(report.modelfile.read_text()).template
    assert "</s>" in model["parameters"]["stop"]


def test_ship_without_a_server_writes_files_and_prints_the_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from llmforge.cli import main

    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing listens on the discard port
    out = tmp_path / "offline"
    main(["ship", str(tiny_model_dir(ARCH)), "--name", "tiny-offline", "--quant", "q8_0", "-o", str(out)])
    err = capsys.readouterr().err
    modelfile = out / "Modelfile"
    assert (out / "tiny-offline-q8_0.gguf").is_file() and modelfile.is_file()
    assert "warning: not pushed: no Ollama server" in err
    assert f"ollama create tiny-offline -f {modelfile}" in err
    assert parse_modelfile(modelfile.read_text()).template


def test_ship_checks_name_and_host_before_converting(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from llmforge.cli import main

    model = tiny_model_dir(ARCH)
    capsys.readouterr()   # the fixture's progress bars, when it builds the model here
    for argv, message in ((["--name", "Bad Name"], "invalid Ollama model name"),
                          (["--name", "ok"], "OLLAMA_HOST points at http://10.1.2.3:11434")):
        monkeypatch.setenv("OLLAMA_HOST", "10.1.2.3")
        started = time.monotonic()
        with pytest.raises(SystemExit) as info:
            main(["ship", str(model), "-o", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert info.value.code != 0 and message in err and err.count("\n") == 1
        assert time.monotonic() - started < 5 and not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("keep me")   # -o naming a file: refused, the file kept
    with pytest.raises(SystemExit) as info:
        main(["ship", str(model), "-o", str(tmp_path / "notes.txt"), "--name", "ok",
              "--host", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "is a file, not a folder" in err and err.count("\n") == 1, err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_ship_push_failure_names_the_written_files(tiny_model_dir, tmp_path):
    from llmforge.errors import LlmforgeError

    with FakeOllama(version="0.5.4") as old:
        with pytest.raises(LlmforgeError, match="but the push failed: Ollama 0.5.4") as info:
            ship(tiny_model_dir(ARCH), name="tiny-old", quant="q8_0", output_dir=tmp_path / "o", host=old.url,
                 timeouts=FAST, progress=io.StringIO())
    assert "ollama create tiny-old -f" in info.value.hint and (tmp_path / "o" / "Modelfile").is_file()


# ---------------------------------------------------------------- real Ollama, when installed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ollama") is None,
                    reason="no `ollama` binary on PATH (install Ollama to run the end-to-end ship test)")
def test_end_to_end_with_a_real_ollama_server(tiny_model_dir, tmp_path):
    port = _free_port()
    env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=str(tmp_path / "models"),
               OLLAMA_GO_TEMPLATE="1", OLLAMA_NOPRUNE="1")
    log = open(tmp_path / "ollama.log", "w")
    server = subprocess.Popen([shutil.which("ollama"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(f"http://{host}/api/version", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        report = ship(tiny_model_dir(ARCH), name="llmforge-e2e", quant="q8_0", output_dir=tmp_path / "out",
                      host=host, timeouts=Timeouts(connect=5, read=120, stream=600), progress=io.StringIO())
        assert report.pushed, report.summary_lines()
        assert "parameters" in report.push.verified
        assert not report.push.render_check.startswith("DIFFERS"), report.push.render_check
        try:
            result = smoke_chat("llmforge-e2e", "Hello", host=host, out=io.StringIO(), num_predict=16,
                                timeouts=Timeouts(connect=5, read=120, stream=600), progress=io.StringIO())
            assert result.done_reason in ("stop", "length")
        except LlmforgeError as exc:  # a random tiny model may end its turn at once; the server still answered
            assert "answered with nothing" in exc.message
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
