"""push / run against a fake Ollama server that follows the documented API (tests/fake_ollama.py).

The render check compares the server's render (llmforge's Go renderer, Ollama's engine) with the Jinja chat
template rendered as transformers does: the real oracle for "the server renders as the template does".
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_ollama import FakeOllama  # noqa: E402
from tiny_models import TOKENIZERS  # noqa: E402

from llmforge.errors import LlmforgeError  # noqa: E402
from llmforge.export.ollama import (OllamaUnreachable, Timeouts, file_sha256, push_model,  # noqa: E402
                                    smoke_chat)
from llmforge.templates.modelfile import build_modelfile, parse_modelfile  # noqa: E402

FAST = Timeouts(connect=5.0, read=20.0, stream=60.0)   # generous: a loaded CI machine must not time out
TIGHT = Timeouts(connect=2.0, read=1.0, stream=2.0)    # for the slow-server tests only
QWEN_TEMPLATE = json.loads((TOKENIZERS / "qwen2" / "tokenizer_config.json").read_text())["chat_template"]
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]


def write_gguf(path: Path, chat_template: str | None = QWEN_TEMPLATE, payload: int = 4096) -> Path:
    """A small valid GGUF: tokenizer metadata, the chat template, one tensor of ``payload`` floats."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(TOKENS)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.arange(payload, dtype=np.float32).reshape(-1, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def go_renderer(template: str, messages: list[dict]) -> str:
    from llmforge.templates import render_go

    return render_go(template, messages)


@pytest.fixture(scope="module")
def go_template() -> str:
    from llmforge.templates import translate_template

    return translate_template(QWEN_TEMPLATE, {"eos_token": "<|endoftext|>"}).go_template


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def modelfile(go_template):
    return build_modelfile("./tiny.gguf", template=go_template, stops=["<|im_end|>", "<|im_start|>"], num_ctx=4096,
                           system="You are terse.", license="MIT")


@pytest.fixture(scope="module")
def go_renderer_built():
    from llmforge.templates.go_render import gorender_binary

    return gorender_binary()  # build once up front, not inside a timed request


@pytest.fixture
def server(go_renderer_built):
    with FakeOllama(renderer=go_renderer) as fake:
        yield fake


def push(gguf_file, mf, server, timeouts=FAST, **kw):
    return push_model(gguf_file, "tiny:latest", modelfile=mf, host=server.url, timeouts=timeouts,
                      progress=io.StringIO(), **kw)


def test_push_uploads_creates_verifies_and_renders_like_the_template(gguf_file, modelfile, server):
    report = push(gguf_file, modelfile, server)
    assert report.uploaded and server.uploads == 1
    assert report.digest == file_sha256(gguf_file)
    assert server.has_blob(report.digest)
    model = server.models["tiny:latest"]
    assert model["template"] == modelfile.template and model["system"] == "You are terse."
    assert model["parameters"] == {"stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": 4096}
    assert model["files"] == {"tiny.gguf": report.digest} and model["license"] == "MIT"
    assert report.verified == ["template", "system", "parameters"]
    assert report.render_check == "server render equals the chat template"
    assert report.statuses[-1] == "success"
    assert any("ollama run tiny:latest" in line for line in report.summary_lines())


def test_repush_is_idempotent_and_uploads_nothing(gguf_file, modelfile, server):
    push(gguf_file, modelfile, server)
    second = push(gguf_file, modelfile, server)
    assert not second.uploaded
    assert server.uploads == 1 and server.count("POST", "/api/blobs") == 1
    assert server.count("POST", "/api/create") == 2


def test_render_check_reports_a_template_that_renders_differently(gguf_file, modelfile, server):
    modelfile.template = modelfile.template.replace("<|im_start|>assistant", "<|im_start|>bot")
    report = push(gguf_file, modelfile, server)
    assert report.render_check.startswith("DIFFERS")
    assert "bot" in report.render_check


def test_modelfile_path_is_parsed_and_its_adapter_uploaded(tmp_path, gguf_file, modelfile, server):
    adapter = write_gguf(tmp_path / "lora.gguf", chat_template=None, payload=64)
    modelfile.adapter = "./lora.gguf"
    path = tmp_path / "Modelfile"
    path.write_text(modelfile.text)
    report = push(gguf_file, path, server)
    assert report.adapter_uploaded and server.has_blob(report.adapter_digest)
    assert server.models["tiny:latest"]["adapters"] == {"lora.gguf": report.adapter_digest}
    assert server.models["tiny:latest"]["template"] == parse_modelfile(path.read_text()).template


def test_without_a_modelfile_one_is_derived_from_the_ggufs_chat_template(gguf_file, go_template, server):
    report = push_model(gguf_file, "derived", host=server.url, timeouts=FAST, progress=io.StringIO())
    model = server.models["derived:latest"]
    assert model["template"] == go_template
    assert {"<|im_end|>", "<|im_start|>"} <= set(model["parameters"]["stop"])
    assert report.render_check == "server render equals the chat template"


def test_run_streams_the_answer_and_sees_it_stop(gguf_file, modelfile, server):
    push(gguf_file, modelfile, server)
    out, err = io.StringIO(), io.StringIO()
    result = smoke_chat("tiny", "Hi", host=server.url, out=out, timeouts=FAST, progress=err)
    assert out.getvalue() == "Hello from a fake Ollama.\n"
    assert result.done_reason == "stop" and "stopped on its own" in err.getvalue()
    smoke_chat("tiny", "Hi", host=server.url, out=out, timeouts=FAST, progress=err, num_predict=2)
    assert "did not stop by itself" in err.getvalue()


def test_run_shows_only_the_answer_of_a_thinking_model(gguf_file, modelfile, server):
    modelfile.template += "{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}"
    push(gguf_file, modelfile, server)
    out, err = io.StringIO(), io.StringIO()
    smoke_chat("tiny", "Hi", host=server.url, out=out, timeouts=FAST, progress=err)
    assert out.getvalue() == "Hello from a fake Ollama.\n" and "thought 13 characters" in err.getvalue()


def test_run_unknown_model_is_a_clear_error(server):
    with pytest.raises(LlmforgeError, match="HTTP 404.*not found"):
        smoke_chat("missing", "Hi", host=server.url, out=io.StringIO(), timeouts=FAST, progress=io.StringIO())


# ---------------------------------------------------------------- faults: clear message, retry works

def test_digest_mismatch_is_explained_and_a_retry_succeeds(gguf_file, modelfile, server):
    server.corrupt_upload()
    with pytest.raises(LlmforgeError, match="digest mismatch") as info:
        push(gguf_file, modelfile, server)
    assert "re-run" in info.value.hint
    assert not server.has_blob(file_sha256(gguf_file)) and not server.partial_files()
    assert push(gguf_file, modelfile, server).uploaded


def test_server_going_away_mid_upload_leaves_nothing_and_a_retry_succeeds(tmp_path, modelfile, server):
    big = write_gguf(tmp_path / "tiny.gguf", payload=1 << 20)  # 4 MiB: larger than socket buffers
    server.drop_upload()
    with pytest.raises(LlmforgeError, match="lost during the upload of tiny.gguf"):
        push(big, modelfile, server)
    assert not server.has_blob(file_sha256(big)) and not server.partial_files()
    assert "tiny:latest" not in server.models
    report = push(big, modelfile, server)
    assert report.uploaded and server.models["tiny:latest"]


@pytest.mark.parametrize("route,status,message", [
    ("POST /api/create", 400, "invalid model name"),
    ("POST /api/create", 500, "disk full"),
    ("POST /api/blobs", 500, "no space left on device"),
    ("GET /api/version", 503, "server busy"),
    ("POST /api/show", 500, "show failed"),
])
def test_http_errors_carry_ollamas_message(gguf_file, modelfile, server, route, status, message):
    server.fail(route, status, message)
    with pytest.raises(LlmforgeError) as info:
        push(gguf_file, modelfile, server)
    assert f"HTTP {status}" in info.value.message and message in info.value.message, info.value.message
    assert "Traceback" not in str(info.value)
    assert push(gguf_file, modelfile, server).statuses[-1] == "success"  # nothing stuck: the retry works


def test_head_errors_have_no_body_but_still_a_clear_message(gguf_file, modelfile, server):
    server.fail("HEAD /api/blobs", 503, "busy")
    with pytest.raises(LlmforgeError, match=r"blob check \(HTTP 503\)") as info:
        push(gguf_file, modelfile, server)
    assert "retry" in info.value.hint


def test_error_line_inside_the_create_stream_is_caught(gguf_file, modelfile, server):
    server.stream_error("unsupported architecture 'foo'")
    with pytest.raises(LlmforgeError, match="unsupported architecture 'foo'"):
        push(gguf_file, modelfile, server)
    assert "tiny:latest" not in server.models
    assert push(gguf_file, modelfile, server).statuses[-1] == "success"


def test_server_dying_while_streaming_progress_is_caught(gguf_file, modelfile, server):
    server.drop_stream()
    with pytest.raises(LlmforgeError, match="connection to Ollama was lost during create") as info:
        push(gguf_file, modelfile, server)
    assert "safe to repeat" in info.value.hint and "tiny:latest" not in server.models
    assert push(gguf_file, modelfile, server).statuses[-1] == "success"


def test_not_a_gguf_fails_clearly(tmp_path, modelfile, server):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LlmforgeError, match="is not a GGUF file"):
        push(bad, modelfile, server)
    assert server.uploads == 0 and server.count("POST", "/api/create") == 0


def write_clip_gguf(path: Path) -> Path:
    """A small projector GGUF (``general.architecture = clip``), as convert writes beside a vision model."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", np.ones((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case,message", [
    ("missing", "projector {dir}/nowhere.gguf does not exist"),
    ("folder", "projector {dir}/sub is a folder"),
    ("not a gguf", "{dir}/junk.gguf is not a GGUF file"),
    ("text gguf", "{dir}/other.gguf is not a projector (general.architecture is not clip)"),
    ("truncated", "{dir}/cut.gguf is truncated: tensor v.patch_embd.weight needs"),
])
def test_a_projector_that_is_not_a_clip_gguf_fails_before_uploading(tmp_path, gguf_file, modelfile, server,
                                                                       case, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "junk.gguf").write_text("not a gguf")
    write_gguf(tmp_path / "other.gguf")
    clip = write_clip_gguf(tmp_path / "clip.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(clip[:-8])
    name = {"missing": "nowhere.gguf", "folder": "sub", "not a gguf": "junk.gguf", "text gguf": "other.gguf",
            "truncated": "cut.gguf"}[case]
    path = tmp_path / "Modelfile"
    path.write_text(modelfile.text + f"FROM ./{name}\n")   # a second FROM: the projector
    with pytest.raises(LlmforgeError) as info:
        push(gguf_file, path, server)
    assert message.format(dir=tmp_path) in str(info.value)
    assert server.uploads == 0 and server.count("POST", "/api/create") == 0


def test_a_projector_or_a_truncated_file_pushed_as_the_model_fails_before_uploading(tmp_path, modelfile, server):
    with pytest.raises(LlmforgeError, match="is a folder"):
        push(tmp_path, modelfile, server)
    with pytest.raises(LlmforgeError, match="is a vision projector \\(mmproj\\), not a model"):
        push(write_clip_gguf(tmp_path / "mmproj-tiny.gguf"), modelfile, server)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "tiny.gguf").read_bytes()[:-100])
    with pytest.raises(LlmforgeError, match="cut.gguf is truncated: tensor token_embd.weight"):
        push(cut, modelfile, server)
    assert server.uploads == 0 and server.count("POST", "/api/create") == 0


def test_modelfile_command_adds_the_projector_beside_a_vision_gguf_and_push_takes_it(tmp_path, gguf_file, server,
                                                                                      capsys):
    """`llmforge modelfile tiny.gguf` finds mmproj-tiny.gguf beside it (as convert writes it) and writes the second
    FROM line; pushing that Modelfile sends the projector, and the server reports the vision capability."""
    from llmforge.cli import main

    def modelfile_cli(*args: str) -> tuple[int, str, str]:
        try:
            main(["modelfile", str(gguf_file), *args])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capsys.readouterr()
        return code, out, err

    code, text, _ = modelfile_cli()
    assert code == 0 and parse_modelfile(text).projector is None   # no mmproj beside it: one FROM
    projector = write_clip_gguf(tmp_path / "mmproj-tiny.gguf")
    code, text, err = modelfile_cli()
    mf = parse_modelfile(text)
    assert code == 0 and mf.from_ == str(gguf_file.resolve()) and mf.projector == str(projector.resolve())
    assert "projector: FROM" in err
    report = push(gguf_file, mf, server)
    assert "projector (vision capability)" in report.verified and report.projector_uploaded

    (tmp_path / "sub").mkdir()
    other = write_clip_gguf(tmp_path / "sub" / "vision.gguf")
    code, text, _ = modelfile_cli("--projector", str(other))
    assert code == 0 and parse_modelfile(text).projector == str(other.resolve())
    for bad, message in ((gguf_file, "is not a vision projector (general.architecture is 'llama', not 'clip')"),
                         (tmp_path / "nowhere.gguf", "nowhere.gguf does not exist")):
        code, out, err = modelfile_cli("--projector", str(bad))
        assert code != 0 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("route,seconds,message", [
    ("POST /api/show", 1.5, r"did not answer show tiny:latest within 1 s"),
    ("POST /api/create", 2.5, r"did not answer create within 2 s"),
])
def test_slow_answers_time_out_with_a_message(gguf_file, modelfile, server, route, seconds, message):
    push(gguf_file, modelfile, server)  # warm: the timed push below does only small requests besides the slow one
    server.delay(route, seconds)
    with pytest.raises(LlmforgeError, match=message):
        push(gguf_file, modelfile, server, timeouts=TIGHT)
    assert push(gguf_file, modelfile, server).verified  # the retry is fine once the server answers


def test_no_server_is_unreachable(gguf_file, modelfile):
    with pytest.raises(OllamaUnreachable, match="no Ollama server"):
        push_model(gguf_file, "tiny", modelfile=modelfile, host="127.0.0.1:9", timeouts=FAST,
                   progress=io.StringIO())


# ---------------------------------------------------------------- server versions

def test_old_server_without_json_create_is_refused_before_uploading(gguf_file, modelfile):
    with FakeOllama(version="0.5.4") as old:
        with pytest.raises(LlmforgeError, match="predates the JSON create API") as info:
            push(gguf_file, modelfile, old)
        assert "ollama create" in info.value.hint and old.uploads == 0


def test_server_without_render_only_skips_the_render_check(gguf_file, modelfile, go_renderer_built):
    with FakeOllama(version="0.11.4", renderer=go_renderer) as server:
        report = push(gguf_file, modelfile, server)
    assert report.render_check.startswith("skipped") and "0.11.5" in report.render_check


def test_native_jinja_server_is_reported(gguf_file, modelfile, go_renderer_built):
    with FakeOllama(version="0.31.0", native_jinja=True, renderer=go_renderer) as server:
        report = push(gguf_file, modelfile, server)
    assert "Jinja" in report.template_in_use and "template" not in report.verified


# ---------------------------------------------------------------- CLI

def test_cli_push_and_run_print_one_line_errors(tmp_path, gguf_file, modelfile, server, capsys, monkeypatch):
    from llmforge.cli import main

    path = tmp_path / "Modelfile"
    path.write_text(modelfile.text)
    main(["push", str(gguf_file), "--name", "tiny", "--modelfile", str(path), "--host", server.url])
    assert "created tiny on Ollama" in capsys.readouterr().err
    main(["run", "tiny", "Hi", "--host", server.url])
    assert capsys.readouterr().out == "Hello from a fake Ollama.\n"
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(gguf_file), "--name", "tiny", "--modelfile", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.startswith("error: no Ollama server") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["push", str(gguf_file), "--name", "bad name!", "--host", server.url])
    assert capsys.readouterr().err.startswith("error: invalid Ollama model name")
