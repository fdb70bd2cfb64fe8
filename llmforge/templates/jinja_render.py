"""Render a Hugging Face chat template the way transformers' ``apply_chat_template`` does, with sandbox limits.

Mirrors transformers 5.23 ``utils/chat_template_utils.py``: ``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block (body kept),
``raise_exception``, ``strftime_now``, ``dict``, ``namespace``, the non-escaping ``tojson`` filter, reasoning
fields aliased (``reasoning_content``/``thinking``), special tokens and ``add_generation_prompt`` as variables.
On top: a render time limit and an output size cap, so untrusted templates cannot hang or flood us.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LlmforgeError

RENDER_TIME_LIMIT_S = 10
OUTPUT_LIMIT_CHARS = 4_000_000
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers tracks assistant spans here)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class TemplateRaised(LlmforgeError):
    """The template itself called ``raise_exception`` (it rejects this conversation)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")
        super().__setitem__(name, value)


def make_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = _SafeNamespace
    return env


def _location(exc: jinja2.TemplateSyntaxError) -> str:
    return f"line {exc.lineno}" + (f", column {exc.column}" if getattr(exc, "column", None) else "")


def parse_template(chat_template: str) -> jinja2.nodes.Template:
    """Parse with jinja2's own parser; a syntax error becomes a one-line LlmforgeError with line and column."""
    try:
        return make_environment().parse(chat_template)
    except jinja2.TemplateSyntaxError as exc:
        column = _syntax_column(chat_template, exc)
        raise LlmforgeError(f"chat template syntax error at line {exc.lineno}, column {column}: {exc.message}",
                            hint="fix the template or pass --chat-template NAME") from None


def _syntax_column(source: str, exc: jinja2.TemplateSyntaxError) -> int:
    """jinja2 reports only the line; point at the first block/variable tag on it (1-based)."""
    lines = source.splitlines()
    if not exc.lineno or exc.lineno > len(lines):
        return 1
    line = lines[exc.lineno - 1]
    positions = [p for p in (line.rfind("{%"), line.rfind("{{")) if p >= 0]
    return (max(positions) if positions else 0) + 1


@lru_cache(maxsize=512)
def compile_template(chat_template: str) -> jinja2.Template:
    """Compile (sandboxed); unknown filters and tests outside conditional blocks (jinja2 finds those only here,
    and defers the others to render time) become a one-line LlmforgeError."""
    parse_template(chat_template)  # for the one-line syntax error
    environment = make_environment()
    try:
        return environment.from_string(chat_template)
    except jinja2.TemplateAssertionError as exc:
        unknown_name_error(chat_template, exc)


def unknown_name_error(chat_template: str, exc: jinja2.TemplateAssertionError) -> NoReturn:
    """Raise the one-line error for an unknown filter or test, with its line and column."""
    name = re.search(r"named '([^']+)'", exc.message or "")
    line = chat_template.splitlines()[exc.lineno - 1] if exc.lineno else ""
    column = line.find(name.group(1)) + 1 if name and name.group(1) in line else _syntax_column(chat_template, exc)
    raise LlmforgeError(f"chat template error at line {exc.lineno}, column {column}: {exc.message}",
                        hint="jinja2 and transformers have no such filter or test; fix the template or pass "
                             "--chat-template NAME")


@contextmanager
def _time_limit(seconds: int):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def alias_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy a message's reasoning under ``thinking`` and ``reasoning_content``, as transformers does."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_jinja(chat_template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 special_tokens: dict[str, str] | None = None, add_generation_prompt: bool = True,
                 **extra: Any) -> str:
    """Render like ``apply_chat_template(..., tokenize=False)``; raises LlmforgeError on any failure.

    A ``raise_exception`` in the template raises :class:`TemplateRaised` (the template rejects the input).
    """
    template = compile_template(chat_template)
    variables = dict(special_tokens or {})
    variables.update(extra)
    chunks: list[str] = []
    size = 0
    try:
        with _time_limit(RENDER_TIME_LIMIT_S):
            for chunk in template.generate(messages=alias_reasoning(json.loads(json.dumps(messages))),
                                           tools=tools, documents=None,
                                           add_generation_prompt=add_generation_prompt, **variables):
                size += len(chunk)
                if size > OUTPUT_LIMIT_CHARS:
                    raise LlmforgeError(f"chat template output exceeds {OUTPUT_LIMIT_CHARS} characters",
                                        hint="the template loops or prints too much")
                chunks.append(chunk)
    except TimeoutError:
        raise LlmforgeError(f"chat template render exceeded {RENDER_TIME_LIMIT_S} s",
                            hint="the template loops forever or too long") from None
    except jinja2.exceptions.SecurityError as exc:
        raise LlmforgeError(f"chat template blocked by the sandbox: {exc}") from None
    except jinja2.exceptions.UndefinedError as exc:
        raise LlmforgeError(f"chat template uses something undefined: {exc}",
                            hint="the template calls a function or variable transformers does not provide") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateRaised(f"chat template raised: {exc}") from None
    except LlmforgeError:
        raise
    except Exception as exc:  # a template bug (e.g. calling a string) is the template's, not ours
        raise LlmforgeError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    return "".join(chunks)
