"""Client rules: host resolution (Ollama's OLLAMA_HOST forms, loopback only by default), model-name validation
(Ollama's ParseName/IsValid rules), /api/show parameter parsing, version gates, no credentials, streaming.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_ollama import FakeOllama  # noqa: E402

from llmforge.errors import LlmforgeError  # noqa: E402
from llmforge.export.ollama import (Endpoint, OllamaClient, Timeouts, parameter_differences,  # noqa: E402
                                    parse_host, parse_show_parameters, parse_version, prefers_gguf_jinja,
                                    resolve_host, validate_model_name)


@pytest.mark.parametrize("text,url", [
    ("localhost", "http://localhost:11434"),
    ("127.0.0.1:9999", "http://127.0.0.1:9999"),
    ("http://127.0.0.1", "http://127.0.0.1:80"),
    ("https://localhost", "https://localhost:443"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
    ("[::1]", "http://[::1]:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),        # a server bound to all interfaces is reached via loopback
    ("0.0.0.0:12345", "http://127.0.0.1:12345"),
    (":8000", "http://127.0.0.1:8000"),
    ('"127.0.0.1:7"', "http://127.0.0.1:7"),       # quotes around the env value are trimmed, as Ollama does
    ("example.com", "http://example.com:11434"),
    ("127.0.0.1:99999", "http://127.0.0.1:11434"),  # an invalid port falls back to the default
])
def test_host_forms(text, url):
    assert parse_host(text).url == url


def test_host_precedence_and_loopback_rule():
    assert resolve_host(None, environ={}).url == "http://127.0.0.1:11434"
    assert resolve_host(None, environ={"OLLAMA_HOST": "127.0.0.1:1234"}).port == 1234
    assert resolve_host("localhost:5", environ={"OLLAMA_HOST": "127.0.0.1:1234"}).port == 5
    with pytest.raises(LlmforgeError, match="not this machine") as info:
        resolve_host(None, environ={"OLLAMA_HOST": "192.168.1.5"})
    assert "--host" in info.value.hint
    assert not resolve_host("192.168.1.5").is_loopback  # explicit: allowed
    with pytest.raises(LlmforgeError, match="credentials"):
        parse_host("http://user:secret@127.0.0.1:11434")
    with pytest.raises(LlmforgeError, match="scheme"):
        parse_host("ftp://127.0.0.1")


@pytest.mark.parametrize("name", ["tiny", "tiny:latest", "me/tiny:q4_K_M", "registry.local:5000/me/tiny:v1.2",
                                  "llama3.2", "a_b-c:1", "_x"])
def test_valid_names(name):
    validate_model_name(name)


@pytest.mark.parametrize("name", ["", "bad name", "tiny:", ":tag", "-x", "x/-y", "ns.dot/model", "m:t:a:g/x",
                                  "tiny@sha256:abc", "a/b/c/d", "m:" + "t" * 81, "m" * 81, "ünïcode"])
def test_invalid_names(name):
    with pytest.raises(LlmforgeError, match="model name"):
        validate_model_name(name)


def test_show_parameters_parse_go_formatting():
    text = ('num_ctx                        4096\nstop                           "<|im_end|>"\n'
            'stop                           "line\\nbreak \\"q\\""\ntemperature                    0.7\n'
            'use_mmap                       false')
    shown = parse_show_parameters(text)
    assert shown == {"num_ctx": 4096, "stop": ["<|im_end|>", 'line\nbreak "q"'], "temperature": 0.7,
                     "use_mmap": False}
    assert parameter_differences({"num_ctx": 4096.0, "stop": ["<|im_end|>", 'line\nbreak "q"']}, shown) == []
    assert parameter_differences({"stop": ["<|im_end|>"]}, shown) == [
        "stop: sent ['<|im_end|>'], server has ['<|im_end|>', 'line\\nbreak \"q\"']"]


def test_versions():
    assert parse_version("0.11.5") == (0, 11, 5) and parse_version("v0.12.0-rc1") == (0, 12, 0)
    assert parse_version("0.0.0") > (0, 30, 0)  # source builds are treated as new


def test_native_jinja_heuristic():
    tools_jinja = "{% if tools %}{{ tools | tojson }}{% endif %}<tool_call>"
    go_without_round_trip = "{{ range .Messages }}{{ .Content }}{{ end }}"
    go_with_round_trip = '{{ if .Tools }}{{ json .Tools }}{{ end }}{{ range .Messages }}{{ if .ToolCalls }}x' \
                         '{{ else if eq .Role "tool" }}y{{ end }}{{ end }}'
    assert prefers_gguf_jinja(tools_jinja, go_without_round_trip)
    assert not prefers_gguf_jinja(tools_jinja, go_with_round_trip)
    assert not prefers_gguf_jinja("{{ messages }}", go_without_round_trip)
    assert prefers_gguf_jinja("{{ '<think>' }}...</think>", go_without_round_trip)


def test_session_ignores_netrc_and_proxies(tmp_path, monkeypatch):
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with FakeOllama() as server:
        seen = []
        client = OllamaClient(parse_host(server.url), timeouts=Timeouts(1, 1, 1), progress=io.StringIO())
        original = client.session.request

        def spy(method, url, **kwargs):
            response = original(method, url, **kwargs)
            seen.append(response.request.headers)
            return response

        client.session.request = spy
        assert client.version() == server.version  # no proxy was used
    assert seen and all("Authorization" not in h and "hf_secret" not in str(h) for h in seen)


def test_uploads_stream_the_file_instead_of_reading_it(tmp_path):
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF")
        for _ in range(48):
            f.write(b"\0" * (1 << 20))
    with FakeOllama() as server:
        client = OllamaClient(Endpoint("http", "127.0.0.1", int(server.url.rsplit(":", 1)[1])),
                              timeouts=Timeouts(2, 10, 10), progress=io.StringIO())
        tracemalloc.start()
        try:
            digest, uploaded = client.ensure_blob(big)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert uploaded and server.uploads == 1
    assert peak < 12 * (1 << 20), f"peak {peak / 2**20:.1f} MiB for a 48 MiB upload"
