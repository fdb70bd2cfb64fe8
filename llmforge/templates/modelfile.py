"""Ollama Modelfiles: build one for a model (TEMPLATE, stops, num_ctx, SYSTEM, ADAPTER, LICENSE), write it with
Ollama's quoting rules, and parse one back the way ``parser/parser.go`` does.

Ollama's parser processes no escapes: a ``\"\"\"`` value ends at the first line whose trimmed buffer ends with
``\"\"\"``, and non-printable runes are dropped. Go templates can still carry such text, as string actions
(``{{ "\\"" }}``); plain values (SYSTEM, LICENSE) that cannot be written are left out with a note, and the HTTP
push sends them in JSON instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError
from ..vendor.ollama_api import (DEPRECATED_PARAMETERS, MESSAGE_ROLES, MODELFILE_COMMANDS, PARAMETER_TYPES)
from .modelfile_stops import default_system_prompt, stop_tokens

NUM_CTX_CAP = 8192  # KV cache memory grows with num_ctx; users raise it with PARAMETER num_ctx


@dataclass
class Modelfile:
    """One Ollama Modelfile. ``parameters`` is the JSON form /api/create takes (``stop`` is a list)."""

    from_: str
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    license: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    projector: str | None = None      # a vision model's mmproj GGUF: a second FROM line (Ollama: projector layer)

    @property
    def stops(self) -> list[str]:
        return list(self.parameters.get("stop", []))

    @property
    def text(self) -> str:
        return format_modelfile(self)


# ---------------------------------------------------------------- writing

_NEWLINES = "\r\n"
_GO_SPACE = " \t\r\n"  # the only whitespace that can sit in the parser's buffer (others are non-printable)


def _is_printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch.isprintable()


def _survives_parser(ch: str) -> bool:
    return _is_printable(ch) or ch in " \t\r\n"


def go_template_segments(template: str) -> list[tuple[bool, str]]:
    """Split a Go template into (is_action, text) pieces, honouring strings, raw strings and comments."""
    pieces: list[tuple[bool, str]] = []
    i, n = 0, len(template)
    while i < n:
        start = template.find("{{", i)
        if start < 0:
            pieces.append((False, template[i:]))
            break
        if start > i:
            pieces.append((False, template[i:start]))
        j = start + 2
        while j < n and not template.startswith("}}", j):
            ch = template[j]
            if template.startswith("/*", j):
                end = template.find("*/", j + 2)
                j = n if end < 0 else end + 2
                continue
            if ch in "\"'":
                j += 1
                while j < n and template[j] != ch:
                    j += 2 if template[j] == "\\" else 1
            elif ch == "`":
                end = template.find("`", j + 1)
                j = n if end < 0 else end
            j += 1
        end = min(j + 2, n)
        pieces.append((True, template[start:end]))
        i = end
    return pieces


def _go_string_action(ch: str) -> str:
    code = ord(ch)
    escaped = '\\"' if ch == '"' else (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '{{ "' + escaped + '" }}'


def _quote_at_line_end(text: str, i: int) -> bool:
    rest = text[i + 1:]
    stripped = rest.lstrip(" \t")
    return stripped != "" and stripped[0] in _NEWLINES  # a piece's end is followed by an action, not a newline


def escape_go_template(template: str) -> str:
    """Rewrite text the Modelfile parser would lose (line-final quotes, non-printable runes) as string actions.

    Rendering is unchanged: ``{{ "\\"" }}`` prints a quote, and trim markers of neighbouring actions still
    trim the same whitespace.
    """
    out = []
    for is_action, piece in go_template_segments(template):
        if is_action:
            out.append(piece)
            continue
        for i, ch in enumerate(piece):
            if not _survives_parser(ch) or (ch == '"' and _quote_at_line_end(piece, i)):
                out.append(_go_string_action(ch))
            else:
                out.append(ch)
    return "".join(out)


def _plain_value(value: str) -> str:
    return f'"{value}"' if any(c in value for c in " \t") or value == "" else value


def _format_parameter(key: str, value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    lines = []
    for v in values:
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, str):
            text = f'"{v}"'
        else:
            text = str(v)
        line = f"PARAMETER {key} {text}"
        lines.append(line if _reads_back(line, ("parameter", key, str(v) if not isinstance(v, bool) else text))
                     else f"# note: PARAMETER {key} {v!r} left out: a Modelfile cannot quote it; use llmforge push")
    return lines


def _reads_back(line: str, expected: tuple[str, str, str]) -> bool:
    """Does Ollama's parser read ``line`` back as exactly ``expected`` (command, sub, value)?"""
    try:
        return parse_commands(line + "\n") == [expected]
    except LlmforgeError:
        return False


def _block(keyword: str, value: str, sub: str = "") -> str:
    head = f"{keyword} {sub + ' ' if sub else ''}"
    line = f'{head}"""{value}"""'
    if _reads_back(line, (keyword.lower(), sub, value)):
        return line
    return f"# note: a {keyword} was left out: its text cannot be quoted in a Modelfile; use llmforge push"


def format_modelfile(mf: Modelfile) -> str:
    """The Modelfile text. Values Ollama's parser cannot carry are left out with a ``# note`` line."""
    lines = ["# Modelfile generated by llmforge"]
    lines += [f"# note: {' '.join(note.split())}" for note in mf.notes]  # one line each: a comment ends at a newline
    lines.append(f"FROM {_plain_value(mf.from_)}")
    if mf.projector:
        lines.append(f"FROM {_plain_value(mf.projector)}")
    if mf.adapter:
        lines.append(f"ADAPTER {_plain_value(mf.adapter)}")
    if mf.template is not None:
        lines.append(_block("TEMPLATE", escape_go_template(mf.template)))
    if mf.system is not None:
        lines.append(_block("SYSTEM", mf.system))
    for key, value in mf.parameters.items():
        lines += _format_parameter(key, value)
    for message in mf.messages:
        lines.append(_block("MESSAGE", message["content"], message["role"]))
    if mf.license is not None:
        lines.append(_block("LICENSE", mf.license))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- parsing (parser/parser.go rules)

_NIL, _NAME, _VALUE, _PARAM, _MESSAGE, _COMMENT = range(6)


def _is_alpha(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _next_state(ch: str, state: int, line: int) -> tuple[int, str | None]:
    """One step of the parser's state machine: (next state, rune to keep or None)."""
    space, newline = ch in " \t", ch in _NEWLINES
    if state == _NIL:
        if ch == "#":
            return _COMMENT, None
        return (_NIL, None) if space or newline else (_NAME, ch)
    if state == _NAME:
        if _is_alpha(ch):
            return _NAME, ch
        if space:
            return _VALUE, None
        raise LlmforgeError(f"Modelfile line {line}: invalid command",
                            hint=f"commands are {', '.join(sorted(c.upper() for c in MODELFILE_COMMANDS))}")
    if state == _VALUE:
        return (_NIL, ch) if space or newline else (_VALUE, ch)
    if state in (_PARAM, _MESSAGE):
        if _is_alpha(ch) or (state == _PARAM and (ch.isdigit() or ch == "_")):
            return state, ch
        if space:
            return _VALUE, None
        what = "PARAMETER" if state == _PARAM else "MESSAGE"
        raise LlmforgeError(f"Modelfile line {line}: unexpected end of a {what}",
                            hint="write `PARAMETER name value` / `MESSAGE role text`")
    return (_NIL, None) if newline else (_COMMENT, None)


def parse_commands(text: str) -> list[tuple[str, str, str]]:
    """Ollama's Modelfile tokenizer: a list of (command, parameter-or-role, value)."""
    text = text.removeprefix("\ufeff")
    commands: list[tuple[str, str, str]] = []
    state, buffer, line = _NIL, [], 1
    command = sub = ""
    for ch in text:
        if ch in _NEWLINES:
            line += 1
        nxt, keep = _next_state(ch, state, line)
        if nxt != state:
            word = "".join(buffer)
            if state == _NAME:
                command = word.lower()
                if command not in MODELFILE_COMMANDS:
                    raise LlmforgeError(f"Modelfile line {line}: unknown command {word!r}",
                                        hint=f"commands are {', '.join(sorted(c.upper() for c in MODELFILE_COMMANDS))}")
                sub = ""
                nxt = {"parameter": _PARAM, "message": _MESSAGE}.get(command, nxt)
            elif state in (_PARAM, _MESSAGE):
                if state == _MESSAGE and word not in MESSAGE_ROLES:
                    raise LlmforgeError(f"Modelfile line {line}: invalid MESSAGE role {word!r}",
                                        hint="roles are system, user, assistant")
                sub = word
            elif state == _VALUE:
                value, ok = _unquote(word.strip(_GO_SPACE))
                if not ok or ch in " \t":
                    buffer.append(ch)  # written raw: newlines and tabs survive inside values
                    continue
                commands.append((command, sub, value))
            buffer, state = [], nxt
        if keep is not None and _is_printable(keep):
            buffer.append(keep)
    if state == _VALUE:
        value, ok = _unquote("".join(buffer).strip(_GO_SPACE))
        if not ok:
            raise LlmforgeError(f"Modelfile line {line}: unterminated quoted value",
                                hint='close it with the same quotes ("" or """)')
        commands.append((command, sub, value))
    elif state not in (_NIL, _COMMENT):
        raise LlmforgeError(f"Modelfile line {line}: unexpected end of file")
    return commands


def parameter_value(key: str, raw: str) -> Any:
    """Convert a PARAMETER string to the JSON type Ollama's API expects for ``key``."""
    kind = PARAMETER_TYPES.get(key)
    if kind is None:
        raise LlmforgeError(f"unknown Modelfile parameter {key!r}",
                            hint=f"valid parameters: {', '.join(sorted(PARAMETER_TYPES))}")
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if kind is list:
            return raw
        return kind(raw)
    except ValueError:
        raise LlmforgeError(f"parameter {key} needs a {kind.__name__} value, got {raw!r}") from None


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text as Ollama does (no escapes, triple quotes, dropped non-printables)."""
    fields: dict[str, Any] = {"parameters": {}, "messages": [], "notes": []}
    licenses: list[str] = []
    for command, sub, value in parse_commands(text):
        if command == "from" and "from_" in fields:   # FROM text.gguf, then FROM mmproj.gguf
            fields["projector"] = value
        elif command == "from":
            fields["from_"] = value
        elif command in ("template", "system", "adapter"):
            fields[command] = value
        elif command == "license":
            licenses.append(value)
        elif command == "message":
            fields["messages"].append({"role": sub, "content": value})
        elif command == "parameter":
            if sub in DEPRECATED_PARAMETERS:
                fields["notes"].append(f"parameter {sub} is deprecated and ignored by Ollama")
                continue
            converted = parameter_value(sub, value)
            if sub == "stop":
                fields["parameters"].setdefault("stop", []).append(converted)
            else:
                fields["parameters"][sub] = converted
        else:
            fields["notes"].append(f"{command.upper()} is kept by Ollama >= 0.14 only; llmforge ignores it")
    if "from_" not in fields:
        raise LlmforgeError("the Modelfile has no FROM line", hint="add `FROM ./model.gguf`")
    if licenses:
        fields["license"] = "\n\n".join(licenses)
    return Modelfile(**fields)


# ---------------------------------------------------------------- building

def build_modelfile(from_: str, *, template: str | None = None, system: str | None = None,
                    stops: Sequence[str] = (), num_ctx: int | None = None,
                    extra_parameters: Mapping[str, Any] | None = None, adapter: str | None = None,
                    license: str | None = None, notes: Iterable[str] = ()) -> Modelfile:
    """A Modelfile from already-known parts; ``extra_parameters`` override the derived ones (stops add up)."""
    parameters: dict[str, Any] = {}
    if stops:
        parameters["stop"] = list(dict.fromkeys(stops))
    if num_ctx:
        parameters["num_ctx"] = int(num_ctx)
    for key, value in (extra_parameters or {}).items():
        if key not in PARAMETER_TYPES:
            raise LlmforgeError(f"unknown Ollama parameter {key!r}",
                                hint=f"valid parameters: {', '.join(sorted(PARAMETER_TYPES))}")
        if key == "stop":  # extra stops add to the derived ones
            value = list(dict.fromkeys([*parameters.get("stop", []), *value]))
        parameters[key] = value
    return Modelfile(from_=from_, template=template, system=system, parameters=parameters, adapter=adapter,
                     license=license, notes=list(notes))


def parse_param_options(params: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` CLI options -> typed parameters (``stop`` may repeat)."""
    out: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LlmforgeError(f"--param {item!r} is not KEY=VALUE", hint="e.g. --param temperature=0.7")
        value = parameter_value(key, raw)
        if key == "stop":
            out.setdefault("stop", []).append(value)
        else:
            out[key] = value
    return out


def modelfile_for_source(source: Path, *, from_: str | None = None, adapter: str | None = None,
                         system: str | None = None, extra_parameters: Mapping[str, Any] | None = None,
                         template_source: Path | None = None, loaded: Any = None) -> Modelfile:
    """Everything a Modelfile needs, derived from a model folder, adapter folder or GGUF.

    The chat template is translated to Go; stops come from rendering the Jinja template; num_ctx from the
    model's context length (capped at NUM_CTX_CAP); SYSTEM from the default the template injects.
    ``loaded``: a callable returning the already loaded ``TemplateSource`` (saves reading a GGUF twice).
    """
    from . import load_template_source, translate_template

    source = Path(source)
    loaded = loaded() if loaded is not None else load_template_source(template_source or source)
    notes: list[str] = []
    go_template = default = None
    extra_eos = [t for t in loaded.eos_tokens if t]
    if loaded.chat_template:
        try:
            translation = translate_template(loaded.chat_template, loaded.special_tokens)
        except LlmforgeError as exc:  # still ship: without TEMPLATE, Ollama picks a template by itself
            translation = None
            notes.append(f"no TEMPLATE written: {exc.one_line()}")
        go_template = translation.go_template if translation else None
        notes += [f"template: {problem}" for problem in (translation.problems if translation else [])]
        vocab = added_tokens(template_source or source)
        stops = []
        if translation and translation.fallback:  # Ollama renders the named template: its turn markers must stop generation
            from . import get_named_template

            notes.append(f"template: used the named template {translation.fallback}")
            stops = stop_tokens(get_named_template(translation.fallback), special_tokens=loaded.special_tokens,
                                vocab_specials=vocab)
        stops += stop_tokens(loaded.chat_template, special_tokens=loaded.special_tokens, vocab_specials=vocab)
        stops += extra_eos
        default = default_system_prompt(loaded.chat_template, special_tokens=loaded.special_tokens)
    else:
        notes.append("no chat template found: Ollama will pick a template by itself; pass a model that has one")
        stops = extra_eos
    num_ctx = min(int(loaded.context_length), NUM_CTX_CAP) if loaded.context_length else None
    if from_ is None:
        from_ = f"./{source.name}" if source.suffix == ".gguf" else str(source)
    return build_modelfile(from_, template=go_template, system=system if system is not None else default,
                           stops=stops, num_ctx=num_ctx, extra_parameters=extra_parameters, adapter=adapter,
                           license=loaded.license_text, notes=notes)


def added_tokens(path: Path) -> list[str]:
    """The tokenizer's added tokens (special or not) in a model folder; [] for other sources."""
    path = Path(path)
    found: list[str] = []
    tokenizer_json, config = path / "tokenizer.json", path / "tokenizer_config.json"
    try:
        if tokenizer_json.is_file():
            found += [t["content"] for t in json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])]
        if config.is_file():
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            found += [t["content"] for t in decoder.values() if isinstance(t, dict) and "content" in t]
    except (OSError, ValueError, TypeError):
        return []
    return list(dict.fromkeys(found))


def projector_beside(source: Path, projector: Path | None = None) -> Path | None:
    """A vision model's mmproj for SOURCE: ``projector`` (checked), else ``mmproj-<name>.gguf`` beside a GGUF."""
    from ..export.gguf_header import read_header

    if projector is None:
        beside = source.with_name(f"mmproj-{source.name}")
        if source.suffix != ".gguf" or not beside.is_file():
            return None
        projector = beside
    projector = Path(projector)
    if not projector.is_file():
        raise LlmforgeError(f"projector {projector} {'is a folder' if projector.is_dir() else 'does not exist'}",
                            hint="pass the mmproj-*.gguf written by `llmforge convert` for a vision model")
    try:
        arch = read_header(projector).kv.get("general.architecture")
    except (OSError, ValueError) as exc:
        raise LlmforgeError(f"{projector} is not a readable GGUF file ({exc})",
                            hint="pass the mmproj-*.gguf written by `llmforge convert`") from None
    if arch != "clip":
        raise LlmforgeError(f"{projector} is not a vision projector (general.architecture is {arch!r}, not 'clip')",
                            hint="pass the mmproj-*.gguf written by `llmforge convert` for a vision model")
    return projector


def run_modelfile_command(source: Path, *, from_: str | None, adapter: Path | None, system: str | None,
                          params: Sequence[str], output: Path | None, projector: Path | None = None) -> None:
    """``llmforge modelfile``: print (or atomically write) the Modelfile for SOURCE; notes go to stderr.

    A vision GGUF gets a second FROM line for its projector (``projector``, or ``mmproj-<name>`` beside it).
    """
    from ..atomic import atomic_path

    source = Path(source)
    if not source.exists():
        raise LlmforgeError(f"{source} does not exist", hint="pass a model folder, an adapter folder or a .gguf")
    projector = projector_beside(source, projector)
    # Ollama resolves relative paths against the Modelfile's folder: write existing files as absolute paths
    adapter_line = str(Path(adapter).resolve()) if adapter and Path(adapter).is_file() else (
        str(adapter) if adapter else None)
    mf = modelfile_for_source(source, from_=from_ or (str(source.resolve()) if source.suffix == ".gguf" else None),
                              adapter=adapter_line, system=system,
                              extra_parameters=parse_param_options(params))
    if projector is not None:
        mf.projector = str(projector.resolve())
        mf.notes.append(f"projector: FROM {mf.projector} (vision)")
    for note in mf.notes:
        print(f"note: {note}", file=sys.stderr)
    if output is None:
        sys.stdout.write(mf.text)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(mf.text, encoding="utf-8")
    print(f"wrote {output}", file=sys.stderr)
