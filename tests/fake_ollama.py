"""A threaded HTTP server on 127.0.0.1 that follows Ollama's documented API closely enough for the tests.

Endpoints (shared/docs/ollama.md): ``GET /api/version``, ``HEAD``/``POST /api/blobs/<digest>`` (digest
checked, blobs written to a temp file and renamed only when complete), ``POST /api/create`` (JSON form,
NDJSON progress, errors as ``{"error": ...}`` JSON or as a streamed line), ``POST /api/show``,
``POST /api/chat`` (streamed answer, ``_debug_render_only`` rendered through llmforge's Go renderer),
``DELETE /api/delete``.

Fault injection: ``fail(route, status, message)``, ``delay(route, seconds)``, ``drop_upload()`` (close the
connection halfway through a blob upload), ``corrupt_upload()`` (the bytes arrive changed),
``stream_error(message)`` (create fails after streaming started, as Ollama does), ``drop_stream()`` (the
server dies while streaming create's progress).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
NAME = re.compile(rf"^(?:[A-Za-z0-9_][A-Za-z0-9_.:-]*/)?(?:[A-Za-z0-9_][A-Za-z0-9_-]*/)?{NAME_PART}(?::{NAME_PART})?$")
KNOWN_PARAMETERS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "num_keep", "seed",
                    "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "temperature",
                    "repeat_penalty", "presence_penalty", "frequency_penalty", "stop"}
REPLY = ["Hello", " from", " a", " fake", " Ollama", "."]


@dataclass
class Fault:
    kind: str                # "fail" | "delay" | "drop" | "corrupt" | "stream_error"
    times: int = 1
    status: int = 500
    message: str = "internal error"
    seconds: float = 0.0


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("-")[0].split(".")[:3])


def _full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _go_repr(value: Any) -> str:
    """Go's %#v for the JSON values Ollama keeps in a params layer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class FakeOllama:
    """Start with ``with FakeOllama() as server:``; ``server.url`` is the base URL."""

    def __init__(self, version: str = "0.12.6", *, native_jinja: bool = False,
                 renderer: Callable[[str, list[dict]], str] | None = None):
        self.version = version
        self.native_jinja = native_jinja
        self.renderer = renderer
        self.blob_dir = Path(tempfile.mkdtemp(prefix="fake-ollama-"))
        self.models: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str]] = []
        self.uploads = 0
        self.faults: dict[str, list[Fault]] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # dropped connections are on purpose
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ---- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeOllama:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.blob_dir, ignore_errors=True)

    # ---- fault injection (route: "POST /api/create", "HEAD /api/blobs", ...)
    def add_fault(self, route: str, fault: Fault) -> None:
        self.faults.setdefault(route, []).append(fault)

    def fail(self, route: str, status: int, message: str, times: int = 1) -> None:
        self.add_fault(route, Fault("fail", times, status=status, message=message))

    def delay(self, route: str, seconds: float, times: int = 1) -> None:
        self.add_fault(route, Fault("delay", times, seconds=seconds))

    def drop_upload(self, times: int = 1) -> None:
        self.add_fault("POST /api/blobs", Fault("drop", times))

    def corrupt_upload(self, times: int = 1) -> None:
        self.add_fault("POST /api/blobs", Fault("corrupt", times))

    def stream_error(self, message: str, times: int = 1) -> None:
        self.add_fault("POST /api/create", Fault("stream_error", times, message=message))

    def drop_stream(self, times: int = 1) -> None:
        """The server dies while streaming create's progress (no final chunk, no success line)."""
        self.add_fault("POST /api/create", Fault("drop", times))

    def take_fault(self, route: str, kind: str) -> Fault | None:
        with self.lock:
            for fault in self.faults.get(route, []):
                if fault.kind == kind and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # ---- state
    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.log if m == method and p.startswith(prefix))

    def partial_files(self) -> list[Path]:
        return [p for p in self.blob_dir.iterdir() if p.name.endswith(".partial")]


def _handler_for(server: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        # ---- plumbing
        def _route(self) -> str:
            path = self.path.split("?")[0]
            base = "/api/blobs" if path.startswith("/api/blobs/") else path
            return f"{self.command} {base}"

        def _send_json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _send_error(self, status: int, message: str) -> None:
            self._send_json(status, {"error": message})

        def _start_stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _stream_line(self, item: dict[str, Any]) -> None:
            data = json.dumps(item).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _end_stream(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _body_chunks(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return
                    yield self.rfile.read(size)
                    self.rfile.readline()
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

        def _json_body(self) -> dict[str, Any] | None:
            try:
                return json.loads(b"".join(self._body_chunks()) or b"{}")
            except ValueError:
                self._send_error(400, "invalid JSON body")
                return None

        def _dispatch(self) -> None:
            route = self._route()
            server.log.append((self.command, self.path))
            delay = server.take_fault(route, "delay")
            if delay:
                time.sleep(delay.seconds)
            failure = server.take_fault(route, "fail")
            if failure:
                for _ in self._body_chunks():
                    pass
                self._send_error(failure.status, failure.message)
                return
            handler = ROUTES.get(route)
            if handler is None:
                self._send_error(404, "404 page not found")
                return
            handler(self)

        do_GET = do_POST = do_HEAD = do_DELETE = _dispatch

        # ---- endpoints
        def version(self) -> None:
            self._send_json(200, {"version": server.version})

        def _digest(self) -> str | None:
            digest = self.path.split("/api/blobs/", 1)[1]
            if not DIGEST.match(digest):
                self._send_error(400, "invalid digest format")
                return None
            return digest.replace("-", ":", 1)

        def head_blob(self) -> None:
            digest = self._digest()
            if digest:
                if server.has_blob(digest):
                    self._send_json(200, {})
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        def post_blob(self) -> None:
            digest = self._digest()
            if not digest:
                return
            if server.has_blob(digest):
                for _ in self._body_chunks():
                    pass
                self._send_json(200, {})
                return
            drop = server.take_fault("POST /api/blobs", "drop")
            corrupt = server.take_fault("POST /api/blobs", "corrupt")
            total = int(self.headers.get("Content-Length") or 0)
            partial = server.blob_path(digest).with_name(f"{server.blob_path(digest).name}.partial")
            sha = hashlib.sha256()
            received = 0
            with open(partial, "wb") as f:
                for chunk in self._body_chunks():
                    if corrupt and received == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    sha.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
                    if drop and received >= total // 2:
                        break
            if drop:  # the server goes away mid-upload: no answer, no blob
                partial.unlink(missing_ok=True)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            got = f"sha256:{sha.hexdigest()}"
            if got != digest:
                partial.unlink(missing_ok=True)
                self._send_error(400, f"digest mismatch, expected {digest!r}, got {got!r}")
                return
            partial.rename(server.blob_path(digest))
            server.uploads += 1
            self._send_json(201, {})

        def create(self) -> None:
            body = self._json_body()
            if body is None:
                return
            if _version_tuple(server.version) < (0, 5, 5) and "modelfile" not in body:
                self._send_error(400, "path or Modelfile are required")
                return
            name = body.get("model") or body.get("name") or ""
            if not NAME.match(name):
                self._send_error(400, "invalid model name")
                return
            files = body.get("files") or {}
            if not files and not body.get("from"):
                self._send_error(400, "neither 'from' or 'files' was specified")
                return
            adapters = body.get("adapters") or {}
            if len(adapters) > 1:
                self._send_error(400, "only one adapter is currently supported")
                return
            for digest in [*files.values(), *adapters.values()]:
                if not server.has_blob(digest):
                    self._send_error(400, f"blob {digest} not found")
                    return
            unknown = set(body.get("parameters") or {}) - KNOWN_PARAMETERS
            if unknown:
                self._send_error(400, f"invalid option provided: {sorted(unknown)[0]}")
                return
            template = body.get("template")
            if template is not None and server.renderer is not None:
                try:
                    server.renderer(template, [{"role": "user", "content": "x"}])
                except Exception as exc:
                    self._send_error(400, f"template error: {exc}")
                    return
            self._start_stream()
            self._stream_line({"status": "parsing GGUF"})
            if server.take_fault("POST /api/create", "drop"):
                self.close_connection = True
                self.connection.shutdown(2)
                return
            failure = server.take_fault("POST /api/create", "stream_error")
            # as server/create.go: a GGUF whose architecture is clip becomes the projector layer
            projectors = [d for d in files.values() if _gguf_architecture(server.blob_path(d)) == "clip"]
            model_digest = next((d for d in files.values() if d not in projectors), next(iter(files.values())))
            if failure or server.blob_path(model_digest).read_bytes()[:4] != b"GGUF":
                self._stream_line({"error": failure.message if failure else "unsupported content type: not GGUF"})
                self._end_stream()
                return
            for digest in [*files.values(), *adapters.values()]:
                self._stream_line({"status": f"using existing layer {digest}"})
            parameters = dict(body.get("parameters") or {})
            server.models[_full_name(name)] = {
                "template": template, "system": body.get("system"), "parameters": parameters,
                "license": body.get("license"), "files": files, "adapters": adapters,
                "messages": body.get("messages") or [], "blob": server.blob_path(model_digest),
                "projectors": projectors,
            }
            self._stream_line({"status": "writing manifest"})
            self._stream_line({"status": "success"})
            self._end_stream()

        def _model(self, body: dict[str, Any]) -> dict[str, Any] | None:
            model = server.models.get(_full_name(body.get("model") or body.get("name") or ""))
            if model is None:
                self._send_error(404, f"model '{body.get('model')}' not found")
            return model

        def show(self) -> None:
            body = self._json_body()
            model = body is not None and self._model(body)
            if not model:
                return
            params = []
            for key, value in model["parameters"].items():
                for v in value if isinstance(value, list) else [value]:
                    params.append(f"{key:<30} {_go_repr(v)}")
            native = server.native_jinja and _version_tuple(server.version) >= (0, 30, 0)
            self._send_json(200, {
                "template": _gguf_jinja(model["blob"]) if native else (model["template"] or "{{ .Prompt }}"),
                "system": model["system"] or "", "parameters": "\n".join(params),
                "license": model["license"] or "", "modelfile": "# fake",
                "capabilities": ["completion"] + (["vision"] if model.get("projectors") else []),
                "details": {"format": "gguf"}, "model_info": {},
            })

        def chat(self) -> None:
            body = self._json_body()
            model = body is not None and self._model(body)
            if not model:
                return
            messages = list(model["messages"]) + list(body.get("messages") or [])
            if model["system"] and (not messages or messages[0].get("role") != "system"):
                messages.insert(0, {"role": "system", "content": model["system"]})
            if body.get("_debug_render_only") and _version_tuple(server.version) >= (0, 11, 5):
                rendered = server.renderer(model["template"], messages) if server.renderer else ""
                self._send_json(200, {"model": body["model"], "done": True,
                                      "_debug_info": {"rendered_template": rendered, "image_count": 0}})
                return
            limit = int((body.get("options") or {}).get("num_predict") or len(REPLY))
            pieces = REPLY[:limit]
            if body.get("stream") is False:
                self._send_json(200, {"model": body["model"], "message": {"role": "assistant",
                                      "content": "".join(pieces)}, "done": True, "done_reason": "stop"})
                return
            self._start_stream()
            if model["template"] and "<think>" in model["template"]:  # thinking-capable: think first
                self._stream_line({"model": body["model"], "message": {"role": "assistant", "content": "",
                                   "thinking": "Let me think."}, "done": False})
            for piece in pieces:
                self._stream_line({"model": body["model"], "message": {"role": "assistant", "content": piece},
                                   "done": False})
            self._stream_line({"model": body["model"], "message": {"role": "assistant", "content": ""},
                               "done": True, "done_reason": "stop" if limit >= len(REPLY) else "length",
                               "eval_count": len(pieces)})
            self._end_stream()

        def delete(self) -> None:
            body = self._json_body()
            if body is not None and self._model(body):
                del server.models[_full_name(body["model"])]
                self._send_json(200, {})

    ROUTES: dict[str, Callable[[Handler], None]] = {
        "GET /api/version": Handler.version, "HEAD /api/blobs": Handler.head_blob,
        "POST /api/blobs": Handler.post_blob, "POST /api/create": Handler.create, "POST /api/show": Handler.show,
        "POST /api/chat": Handler.chat, "DELETE /api/delete": Handler.delete,
    }
    return Handler


def _gguf_jinja(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    except Exception:
        return ""
    return field.contents() if field is not None else ""


def _gguf_architecture(path: Path) -> str | None:
    """general.architecture of a stored blob (None when it is not a readable GGUF)."""
    from llmforge.export.gguf_header import read_header

    try:
        return read_header(path).kv.get("general.architecture")
    except (ValueError, OSError):
        return None
