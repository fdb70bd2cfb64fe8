"""Ship a GGUF to a local Ollama server over its HTTP API, verify what landed, and smoke-chat with it.

Flow (shared/docs/ollama.md section 1): stream each file's sha256 -> ``HEAD /api/blobs/<digest>`` ->
streamed ``POST /api/blobs/<digest>`` only when missing -> ``POST /api/create`` (JSON, NDJSON progress) ->
``POST /api/show`` (template, system, parameters as sent?) -> ``POST /api/chat`` with ``_debug_render_only``
(the server's render of a fixture conversation equals the Jinja chat template's?).

Safety: only loopback unless a host is given explicitly; the session ignores the environment (no netrc
credentials, no proxies) and sends no tokens; model names are checked as Ollama checks them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests
import urllib3

from ..errors import LlmforgeError
from ..vendor.ollama_api import (DEFAULT_HOST, DEFAULT_PORT, FEATURE_VERSIONS, NAME_DEFAULTS,
                                 NAME_PART_EXTRA_CHARS, NAME_PART_MAX_LEN)

CHUNK = 1 << 20
RENDER_CHECK_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


class OllamaUnreachable(LlmforgeError):
    """No Ollama server answers at the host (connection refused, DNS, connect timeout)."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: to connect, for an answer, and between the progress lines of create/chat."""

    connect: float = 5.0
    read: float = 60.0
    stream: float = 600.0


# ---------------------------------------------------------------- host and name

@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"{self.scheme}://{host}:{self.port}"
        return f"{base}/{self.path.strip('/')}" if self.path.strip("/") else base

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_host(text: str) -> Endpoint:
    """Parse a host the way Ollama reads OLLAMA_HOST: ``host``, ``host:port``, ``scheme://host:port[/path]``."""
    text = text.strip().strip("\"'")
    scheme, sep, hostport = text.partition("://")
    default_port = DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    else:
        raise LlmforgeError(f"unsupported scheme in Ollama host {text!r}", hint="use http:// or https://")
    hostport, _, path = hostport.partition("/")
    if "@" in hostport:
        raise LlmforgeError(f"Ollama host {text!r} contains credentials",
                            hint="llmforge never sends credentials; give host[:port] only")
    host, port_text = _split_host_port(hostport)
    if host is None:
        host, port_text = DEFAULT_HOST, str(default_port)
        bare = hostport.strip("[]")
        if bare:
            host = bare
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        port = default_port  # as Ollama does: an invalid port falls back to the default
    # a server listening on all interfaces is reached through loopback
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return Endpoint(scheme, host, port, path)


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    """Go's net.SplitHostPort: (host, port), or (None, '') when there is no port."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1:].startswith(":"):
            return None, ""
        return hostport[1:end], hostport[end + 2:]
    if hostport.count(":") != 1:
        return None, ""
    host, port = hostport.split(":")
    return host, port


def resolve_host(host: str | None = None, *, environ: dict[str, str] | None = None) -> Endpoint:
    """``host`` (explicit), else ``$OLLAMA_HOST``, else 127.0.0.1:11434. Non-loopback only when explicit."""
    environ = os.environ if environ is None else environ
    if host:
        return parse_host(host)
    from_env = environ.get("OLLAMA_HOST", "").strip()
    endpoint = parse_host(from_env) if from_env else Endpoint("http", DEFAULT_HOST, DEFAULT_PORT)
    if not endpoint.is_loopback:
        raise LlmforgeError(f"OLLAMA_HOST points at {endpoint.url}, which is not this machine",
                            hint="llmforge talks to loopback by default; pass --host to send it there on purpose")
    return endpoint


def _valid_part(kind: str, part: str) -> bool:
    if not 1 <= len(part) <= NAME_PART_MAX_LEN[kind]:
        return False
    allowed = set(NAME_PART_EXTRA_CHARS[kind]) | {"-", "_"}
    first = part[0]
    return (first.isascii() and (first.isalnum() or first == "_")) and all(
        (c.isascii() and c.isalnum()) or c in allowed for c in part[1:])


def _cut_last(s: str, sep: str) -> tuple[str, str | None]:
    """(before, after) at the last ``sep``; after is None when absent, "!" (invalid) when empty."""
    i = s.rfind(sep)
    if i < 0:
        return s, None
    return s[:i], s[i + len(sep):] or "!"


def validate_model_name(name: str) -> dict[str, str]:
    """Split and check ``[host/][namespace/]model[:tag]`` as Ollama's ParseName + IsValid do."""
    if "@" in name:
        raise LlmforgeError(f"model name {name!r} contains a digest", hint="give a name like mymodel:latest")
    parts: dict[str, str] = {}
    rest, tag = _cut_last(name, ":")
    parts["tag"] = tag or ""
    rest, model = _cut_last(rest, "/")
    if model is None:
        parts["model"] = rest
    else:
        parts["model"] = model
        rest, namespace = _cut_last(rest, "/")
        parts["namespace"] = rest if namespace is None else namespace
        if namespace is not None:
            parts["host"] = rest.split("://", 1)[-1]
    for key, default in NAME_DEFAULTS.items():
        parts[key] = parts.get(key) or default
    for kind in ("host", "namespace", "model", "tag"):
        if not _valid_part(kind, parts[kind]):
            raise LlmforgeError(f"invalid Ollama model name {name!r} ({kind} part {parts[kind]!r})",
                                hint="use [namespace/]model[:tag]: letters, digits, _ - and . (not in the "
                                     "namespace), up to 80 characters each, starting with a letter, digit or _")
    return parts


# ---------------------------------------------------------------- progress

class Progress:
    """Byte progress on a stream: redraws one line on a terminal, prints quarter steps otherwise."""

    def __init__(self, label: str, total: int, out: TextIO):
        self.label, self.total, self.out, self.done = label, max(total, 1), out, 0
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.shown = -1

    def update(self, n: int) -> None:
        self.done += n
        percent = min(100, self.done * 100 // self.total)
        step = percent if self.tty else percent // 25 * 25
        if step != self.shown:
            self.shown = step
            end = "\r" if self.tty and percent < 100 else "\n"
            print(f"{self.label}: {percent:3d}% of {_size(self.total)}", end=end, file=self.out, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def file_sha256(path: Path, out: TextIO | None = None) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    progress = Progress(f"hashing {path.name}", size, out) if out and size > 16 * CHUNK else None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress.update(len(chunk))
    return f"sha256:{digest.hexdigest()}"


class FileBody:
    """A request body that streams a file chunk by chunk; ``len()`` gives requests its Content-Length."""

    def __init__(self, path: Path, progress: Progress | None = None):
        self.path, self.size, self.progress = path, path.stat().st_size, progress

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                if self.progress:
                    self.progress.update(len(chunk))
                yield chunk


# ---------------------------------------------------------------- client

STATUS_HINTS = {
    400: "the server rejected the request; fix what the message names",
    404: "it does not exist on this server",
    500: "the Ollama server failed; see its log (`ollama serve` output) and retry",
    503: "the server is busy or starting; retry in a moment",
}


def parse_version(text: str) -> tuple[int, int, int]:
    """``0.11.5`` / ``0.12.0-rc1`` / ``v0.5.4`` -> (0, 11, 5); unknown -> a large version (assume new)."""
    numbers = []
    for piece in text.lstrip("v").split("-")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    version = tuple((numbers + [0, 0, 0])[:3])
    return version if any(version) else (999, 0, 0)  # 0.0.0 is a source build


class OllamaClient:
    """A thin client for Ollama's HTTP API, turning every failure into one LlmforgeError line."""

    def __init__(self, endpoint: Endpoint, *, timeouts: Timeouts = Timeouts(), progress: TextIO = sys.stderr):
        self.endpoint, self.timeouts, self.progress = endpoint, timeouts, progress
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc credentials, no proxy settings
        self.session.headers.update({"User-Agent": "llmforge", "Accept": "application/json"})

    def _call(self, method: str, path: str, *, stream: bool = False, read_timeout: float | None = None,
              action: str | None = None, accept: tuple[int, ...] = (), **kwargs: Any) -> requests.Response:
        url = f"{self.endpoint.url}{path}"
        what = action or f"{method} {path}"
        timeout = (self.timeouts.connect, read_timeout or self.timeouts.read)
        try:
            response = self.session.request(method, url, stream=stream, timeout=timeout, allow_redirects=False,
                                            **kwargs)
        except requests.exceptions.ConnectTimeout:
            raise OllamaUnreachable(f"no Ollama server answered at {self.endpoint.url} within "
                                    f"{self.timeouts.connect:g} s",
                                    hint="start it with `ollama serve` or pass --host") from None
        except requests.exceptions.ReadTimeout:
            raise LlmforgeError(f"Ollama at {self.endpoint.url} did not answer {what} within "
                                f"{timeout[1]:g} s", hint="the server is busy or stuck; retry later") from None
        except requests.exceptions.ConnectionError as exc:
            if kwargs.get("data") is not None:
                raise LlmforgeError(f"the connection to Ollama at {self.endpoint.url} was lost during {what}",
                                    hint="re-run the same command: nothing half-written is kept") from None
            if _refused(exc):
                raise OllamaUnreachable(f"no Ollama server at {self.endpoint.url}",
                                        hint="start it with `ollama serve` or pass --host") from None
            raise LlmforgeError(f"the connection to Ollama at {self.endpoint.url} failed during {what}",
                                hint="check the server; re-run the same command") from None
        if response.status_code >= 400 and response.status_code not in accept:
            raise self._http_error(response, what)
        return response

    @staticmethod
    def _http_error(response: requests.Response, what: str) -> LlmforgeError:
        try:
            message = response.json().get("error") or response.text
        except ValueError:
            message = response.text.strip() or response.reason
        status = response.status_code
        hint = STATUS_HINTS.get(status) or STATUS_HINTS[500 if status >= 500 else 400]
        if "digest mismatch" in str(message):
            hint = "the file changed or was corrupted while uploading; re-run to upload it again"
        return LlmforgeError(f"Ollama refused {what} (HTTP {status}): {str(message).strip()[:300]}", hint=hint)

    def _ndjson(self, response: requests.Response, what: str) -> Iterator[dict[str, Any]]:
        """Each line of a streamed answer; a line with ``error`` raises (HTTP 200 was already sent)."""
        try:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise LlmforgeError(f"Ollama sent a line that is not JSON during {what}: {line[:120]!r}") from None
                if item.get("error"):
                    raise LlmforgeError(f"Ollama failed during {what}: {item['error']}",
                                        hint="fix what it names and re-run; the model was not created")
                yield item
        except requests.exceptions.ReadTimeout:
            raise LlmforgeError(f"Ollama stopped sending progress during {what} for {self.timeouts.stream:g} s",
                                hint="the server is stuck; retry later") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
            raise LlmforgeError(f"the connection to Ollama was lost during {what}",
                                hint="re-run the same command; it is safe to repeat") from None
        finally:
            response.close()

    # -------- endpoints

    def version(self) -> str:
        return str(self._call("GET", "/api/version").json().get("version", "0.0.0"))

    def has_blob(self, digest: str) -> bool:
        return self._call("HEAD", f"/api/blobs/{digest}", action="the blob check", accept=(404,)).status_code != 404

    def upload_blob(self, path: Path, digest: str) -> None:
        progress = Progress(f"uploading {path.name}", path.stat().st_size, self.progress)
        self._call("POST", f"/api/blobs/{digest}", data=FileBody(path, progress),
                   headers={"Content-Type": "application/octet-stream"}, action=f"the upload of {path.name}")

    def ensure_blob(self, path: Path) -> tuple[str, bool]:
        """Upload ``path`` unless the server has it: (digest, uploaded?)."""
        digest = file_sha256(path, self.progress)
        if self.has_blob(digest):
            return digest, False
        self.upload_blob(path, digest)
        return digest, True

    def create(self, request: dict[str, Any]) -> list[str]:
        response = self._call("POST", "/api/create", json={**request, "stream": True}, stream=True,
                              read_timeout=self.timeouts.stream, action="create")
        statuses = []
        for item in self._ndjson(response, "create"):
            status = item.get("status", "")
            if status and (not statuses or statuses[-1] != status):
                statuses.append(status)
                print(f"ollama: {status}", file=self.progress)
        if statuses[-1:] != ["success"]:
            raise LlmforgeError("Ollama's create ended without success",
                                hint="re-run; if it repeats, see the server log")
        return statuses

    def show(self, name: str) -> dict[str, Any]:
        return self._call("POST", "/api/show", json={"model": name}, action=f"show {name}").json()

    def render_only(self, name: str, messages: list[dict[str, Any]]) -> str:
        body = {"model": name, "messages": messages, "stream": False, "_debug_render_only": True}
        answer = self._call("POST", "/api/chat", json=body, read_timeout=self.timeouts.stream,
                            action="the render check").json()
        info = answer.get("_debug_info") or {}
        if "rendered_template" not in info:
            raise LlmforgeError("the server ignored _debug_render_only", hint="it may be older than 0.11.5")
        return info["rendered_template"]

    def chat(self, name: str, messages: list[dict[str, Any]], options: dict[str, Any]) -> Iterator[dict[str, Any]]:
        body = {"model": name, "messages": messages, "stream": True, "options": options}
        response = self._call("POST", "/api/chat", json=body, stream=True, read_timeout=self.timeouts.stream,
                              action=f"chat with {name}")
        yield from self._ndjson(response, f"chat with {name}")

    def delete(self, name: str) -> None:
        self._call("DELETE", "/api/delete", json={"model": name}, action=f"delete {name}")


def _refused(exc: requests.exceptions.ConnectionError) -> bool:
    """Nothing listens there (refused, unknown name), as opposed to a connection that broke."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


# ---------------------------------------------------------------- verification helpers

def parse_show_parameters(text: str) -> dict[str, Any]:
    """/api/show ``parameters`` (``%-30s %#v`` lines) -> {key: value}; repeated keys (stop) become lists."""
    out: dict[str, Any] = {}
    for line in (text or "").splitlines():
        key, _, raw = line.strip().partition(" ")
        if not key:
            continue
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if key == "stop":
            out.setdefault("stop", []).append(value)
        else:
            out[key] = value
    return out


def parameter_differences(sent: dict[str, Any], shown: dict[str, Any]) -> list[str]:
    """Keys whose value on the server differs from what was sent."""
    problems = []
    for key, value in sent.items():
        got = shown.get(key)
        same = (list(got or []) == list(value)) if key == "stop" else (
            got == value or (isinstance(value, (int, float)) and isinstance(got, (int, float))
                             and float(got) == float(value)))
        if not same:
            problems.append(f"{key}: sent {value!r}, server has {got!r}")
    return problems


def first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: server {a[i:i + 40]!r} vs chat template {b[i:i + 40]!r}"


def prefers_gguf_jinja(gguf_jinja: str | None, go_template: str | None) -> bool:
    """Ollama >= 0.30's PreferChatTemplate heuristic (server/images.go, doc section 6)."""
    from llmforge.templates.ollama_choice import prefers_gguf_jinja as prefers

    return prefers(gguf_jinja, go_template)


# ---------------------------------------------------------------- push

@dataclass
class PushReport:
    name: str
    host: str
    server_version: str
    digest: str
    uploaded: bool
    adapter_digest: str | None = None
    adapter_uploaded: bool = False
    projector_digest: str | None = None
    projector_uploaded: bool = False
    statuses: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    render_check: str = "not run"
    template_in_use: str = "Go TEMPLATE"
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = [f"created {self.name} on Ollama {self.server_version} at {self.host}",
                 f"model blob {self.digest[:19]}... " + ("uploaded" if self.uploaded else "already on the server")]
        if self.adapter_digest:
            lines.append(f"adapter blob {self.adapter_digest[:19]}... "
                         + ("uploaded" if self.adapter_uploaded else "already on the server"))
        if self.projector_digest:
            lines.append(f"projector blob {self.projector_digest[:19]}... "
                         + ("uploaded" if self.projector_uploaded else "already on the server"))
        lines += [f"verified: {', '.join(self.verified) or 'nothing'}",
                  f"render check: {self.render_check}", f"template in use: {self.template_in_use}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"try it: llmforge run {self.name} \"Hello\"   (or: ollama run {self.name})")
        return lines


def _load_modelfile(modelfile: Any, gguf: Path, loaded: Any) -> tuple[Any, Path | None]:
    """(Modelfile, folder its relative paths are relative to)."""
    from ..templates.modelfile import Modelfile, modelfile_for_source, parse_modelfile

    if isinstance(modelfile, Modelfile):
        return modelfile, None
    if modelfile is None:
        return modelfile_for_source(gguf, from_=f"./{gguf.name}", loaded=loaded), gguf.parent
    path = Path(modelfile)
    if not path.is_file():
        raise LlmforgeError(f"Modelfile {path} does not exist", hint="pass an existing file to --modelfile")
    return parse_modelfile(path.read_text(encoding="utf-8")), path.parent


def _create_request(name: str, gguf: Path, digest: str, mf: Any, adapter: tuple[Path, str] | None,
                    projector: tuple[Path, str] | None = None) -> dict:
    request: dict[str, Any] = {"model": name, "files": {gguf.name: digest}}
    if projector:   # Ollama files a clip GGUF among `files` as the model's projector layer
        request["files"][projector[0].name if projector[0].name != gguf.name else f"mmproj-{gguf.name}"] = projector[1]
    if adapter:
        key = adapter[0].name if adapter[0].name != gguf.name else f"adapter-{adapter[0].name}"
        request["adapters"] = {key: adapter[1]}
    for key, value in (("template", mf.template), ("system", mf.system), ("license", mf.license)):
        if value is not None:
            request[key] = value
    if mf.parameters:
        request["parameters"] = dict(mf.parameters)
    if mf.messages:
        request["messages"] = list(mf.messages)
    return request


def _check_render(client: OllamaClient, name: str, loaded: Any, version: tuple[int, int, int],
                  report: PushReport, go_template: str | None) -> None:
    if version < FEATURE_VERSIONS["render_only"]:
        report.render_check = "skipped (the server is older than 0.11.5: no _debug_render_only)"
        return
    chat_template, tokens = loaded().chat_template, loaded().special_tokens
    if not chat_template:
        report.render_check = "skipped (no chat template to compare with)"
        return
    from ..templates.jinja_render import render_jinja

    for conversation in (RENDER_CHECK_CONVERSATION, RENDER_CHECK_CONVERSATION[1:]):
        try:
            expected = render_jinja(chat_template, conversation, special_tokens=tokens)
            break
        except LlmforgeError:
            continue
    else:
        report.render_check = "skipped (the chat template rejects the check conversation)"
        return
    bos = tokens.get("bos_token")
    if bos and expected.startswith(bos):
        expected = expected[len(bos):]  # llama.cpp adds BOS itself
    rendered = client.render_only(name, conversation)
    report.render_check = ("server render equals the chat template" if rendered == expected else
                           f"DIFFERS from the chat template {first_difference(rendered, expected)}")
    if version >= FEATURE_VERSIONS["native_jinja"] and report.template_in_use == "Go TEMPLATE":
        prefer = prefers_gguf_jinja(chat_template, go_template)
        report.template_in_use = ("the GGUF's Jinja template (Ollama >= 0.30 prefers it: the Go template lacks a "
                                  "tool round trip; OLLAMA_GO_TEMPLATE=1 on the server forces the Go one)" if prefer
                                  else "Go TEMPLATE (Ollama >= 0.30 keeps it unless the server sets "
                                       "OLLAMA_GO_TEMPLATE=0)")


def _require_gguf(path: Path) -> Any:
    """``path``'s GGUF header; a file that is not a GGUF, or is cut short, is one error line (before uploading)."""
    from .gguf_header import read_header, truncated_tensor

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LlmforgeError(f"{path} is not a GGUF file", hint="pass the .gguf written by `llmforge convert`")
    try:
        header = read_header(path)
    except ValueError as exc:
        raise LlmforgeError(f"{path} is not a readable GGUF file ({exc})", hint="re-create it") from None
    short = truncated_tensor(header)
    if short is not None:
        raise LlmforgeError(f"{path} is truncated: tensor {short[0]} needs {short[1]} bytes, the file has "
                            f"{header.file_size}", hint="copy or download it again, or re-convert it")
    return header


def push_model(gguf: Path, name: str, modelfile: Any = None, adapter: Path | None = None,
               host: str | None = None, *, template_source: Any = None, timeouts: Timeouts = Timeouts(),
               progress: TextIO = sys.stderr, projector: Path | None = None) -> PushReport:
    """Upload ``gguf`` (and ``adapter``) to Ollama and create ``name`` from it, then verify what landed.

    ``projector``: a vision model's mmproj GGUF, sent as a second file (default: the Modelfile's second FROM,
    else ``mmproj-<gguf name>`` beside ``gguf`` when there is one, as ``llmforge convert`` writes it); the
    server must then report the vision capability.

    ``modelfile`` is a Modelfile path, a :class:`llmforge.templates.modelfile.Modelfile`, or None (derive
    one from the GGUF's own chat template). ``template_source`` (a ``TemplateSource``) gives the Jinja chat
    template for the render check; by default it is read from the GGUF.
    """
    validate_model_name(name)
    endpoint = resolve_host(host)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise LlmforgeError(f"{gguf} {'is a folder' if gguf.is_dir() else 'does not exist'}",
                            hint="pass the .gguf written by `llmforge convert` (a folder: `llmforge ship`)")
    if _require_gguf(gguf).kv.get("general.architecture") == "clip":
        raise LlmforgeError(f"{gguf} is a vision projector (mmproj), not a model",
                            hint="push the text GGUF; its mmproj-*.gguf goes with it")
    if not endpoint.is_loopback:
        print(f"warning: sending {gguf.name} to {endpoint.url}, which is not this machine", file=progress)
    client = OllamaClient(endpoint, timeouts=timeouts, progress=progress)
    version_text = client.version()
    version = parse_version(version_text)
    if version < FEATURE_VERSIONS["json_create"]:
        raise LlmforgeError(f"Ollama {version_text} at {endpoint.url} predates the JSON create API (0.5.5)",
                            hint=f"upgrade Ollama, or run `ollama create {name} -f Modelfile` by hand")
    cache: list[Any] = [template_source] if template_source is not None else []

    def loaded() -> Any:  # reading a GGUF's metadata is slow for big vocabularies: once, and only if needed
        if not cache:
            from ..templates import load_template_source

            cache.append(load_template_source(gguf))
        return cache[0]

    mf, base_dir = _load_modelfile(modelfile, gguf, loaded if modelfile is None else None)
    adapter_path = Path(adapter) if adapter else None
    if adapter_path is None and mf.adapter and base_dir is not None:
        adapter_path = Path(mf.adapter) if Path(mf.adapter).is_absolute() else base_dir / mf.adapter
    if adapter_path is not None and not adapter_path.is_file():
        raise LlmforgeError(f"adapter {adapter_path} does not exist", hint="pass a GGUF LoRA adapter file")
    if adapter_path is not None:
        _require_gguf(adapter_path)
    projector_path = _projector_path(projector, mf, base_dir, gguf)

    notes = list(mf.notes)
    if base_dir is not None and modelfile is not None and mf.from_:
        from_path = Path(mf.from_) if Path(mf.from_).is_absolute() else base_dir / mf.from_
        if from_path.resolve() != gguf.resolve():
            notes.append(f"the Modelfile's FROM {mf.from_} was replaced by {gguf}")
    digest, uploaded = client.ensure_blob(gguf)
    report = PushReport(name=name, host=endpoint.url, server_version=version_text, digest=digest,
                        uploaded=uploaded, notes=notes)
    adapter_blob = None
    if adapter_path is not None:
        report.adapter_digest, report.adapter_uploaded = client.ensure_blob(adapter_path)
        adapter_blob = (adapter_path, report.adapter_digest)
    projector_blob = None
    if projector_path is not None:
        report.projector_digest, report.projector_uploaded = client.ensure_blob(projector_path)
        projector_blob = (projector_path, report.projector_digest)
    request = _create_request(name, gguf, digest, mf, adapter_blob, projector_blob)
    report.statuses = client.create(request)
    _verify(client, name, request, version, report, vision=projector_path is not None)
    _check_render(client, name, loaded, version, report, mf.template)
    return report


def _projector_path(projector: Path | None, mf: Any, base_dir: Path | None, gguf: Path) -> Path | None:
    """The mmproj to send: the argument, the Modelfile's second FROM, or ``mmproj-<name>`` beside the GGUF."""
    if projector is None and mf.projector and base_dir is not None:
        projector = Path(mf.projector) if Path(mf.projector).is_absolute() else base_dir / mf.projector
    if projector is None:
        beside = gguf.with_name(f"mmproj-{gguf.name}")
        projector = beside if beside.is_file() else None
    if projector is None:
        return None
    projector = Path(projector)
    if not projector.is_file():
        raise LlmforgeError(f"projector {projector} {'is a folder' if projector.is_dir() else 'does not exist'}",
                            hint="pass the mmproj GGUF written by convert")
    if _require_gguf(projector).kv.get("general.architecture") != "clip":
        raise LlmforgeError(f"{projector} is not a projector (general.architecture is not clip)",
                            hint="pass the mmproj-*.gguf written by `llmforge convert` for a vision model")
    return projector


def _verify(client: OllamaClient, name: str, request: dict[str, Any], version: tuple[int, int, int],
            report: PushReport, vision: bool = False) -> None:
    shown = client.show(name)
    problems = []
    if vision:
        if "vision" in (shown.get("capabilities") or []):
            report.verified.append("projector (vision capability)")
        else:
            problems.append("the server did not take the projector (no vision capability)")
    if "template" in request:
        if shown.get("template") == request["template"]:
            report.verified.append("template")
        elif version >= FEATURE_VERSIONS["native_jinja"]:
            report.template_in_use = "the GGUF's Jinja template (native mode: /api/show returns it)"
        else:
            problems.append("template differs from the one sent")
    if "system" in request:
        if shown.get("system") == request["system"]:
            report.verified.append("system")
        else:
            problems.append("system differs from the one sent")
    if request.get("parameters"):
        differences = parameter_differences(request["parameters"], parse_show_parameters(shown.get("parameters", "")))
        problems += differences
        if not differences:
            report.verified.append("parameters")
    if problems:
        raise LlmforgeError(f"Ollama created {name} but it differs from what was sent: {'; '.join(problems)}",
                            hint="re-run; if it repeats, the server rewrites these fields")


# ---------------------------------------------------------------- run

@dataclass
class ChatResult:
    text: str
    done_reason: str | None
    eval_count: int | None


def smoke_chat(name: str, prompt: str, host: str | None = None, out: TextIO = sys.stdout, *,
               num_predict: int = 128, timeouts: Timeouts = Timeouts(), progress: TextIO = sys.stderr) -> ChatResult:
    """Chat once with ``name`` (streamed to ``out``) and report whether the answer ended on its own."""
    validate_model_name(name)
    client = OllamaClient(resolve_host(host), timeouts=timeouts, progress=progress)
    pieces: list[str] = []
    thinking: list[str] = []
    final: dict[str, Any] = {}
    for item in client.chat(name, [{"role": "user", "content": prompt}], {"num_predict": num_predict}):
        message = item.get("message") or {}
        if message.get("thinking"):  # thinking-capable templates make Ollama think by default
            thinking.append(message["thinking"])
        if message.get("content"):
            pieces.append(message["content"])
            out.write(message["content"])
            out.flush()
        if item.get("done"):
            final = item
    out.write("\n")
    if thinking:
        print(f"(the model also thought {len(''.join(thinking))} characters, not shown)", file=progress)
    result = ChatResult("".join(pieces), final.get("done_reason"), final.get("eval_count"))
    if not final:
        raise LlmforgeError(f"the chat with {name} ended without a final message", hint="see the server log")
    if result.done_reason == "stop":
        print(f"ok: {name} answered and stopped on its own", file=progress)
    else:
        print(f"warning: {name} did not stop by itself (done_reason={result.done_reason}, limit {num_predict} "
              "tokens): check its stop tokens and template", file=progress)
    if not result.text.strip() and not thinking:
        raise LlmforgeError(f"{name} answered with nothing", hint="check the template and stop tokens")
    return result
