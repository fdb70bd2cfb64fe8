"""Training data: read local JSONL / JSON / Parquet files or a ``datasets`` folder, normalise rows to messages.

Supported row formats (detected from the first row's columns, or forced with ``format``):
OpenAI ``messages``, ShareGPT ``conversations`` (``from``/``value``), Alpaca ``instruction``/``input``/``output``,
and plain ``text`` (trained on every token).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}


@dataclass
class Example:
    """One training example: a conversation, or raw text when ``text`` is set."""
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict] | None = None
    row: int = 0


def read_rows(path: str | Path) -> list[dict]:
    """Read the rows of a JSONL / JSON / Parquet file or a ``datasets`` folder (``save_to_disk``)."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise LlmforgeError(f"dataset {path} not found", hint="set data.path to a JSONL/JSON/Parquet file or folder")
    reader = READERS.get(path.suffix.lower()) if path.is_file() else read_datasets_folder
    if reader is None:
        raise LlmforgeError(f"dataset {path} has an unknown extension {path.suffix!r}",
                            hint="use .jsonl, .json or .parquet, or a datasets folder")
    rows = reader(path)
    if not rows:
        raise LlmforgeError(f"dataset {path} is empty", hint="add at least one row")
    return rows


def read_text(path: Path) -> str:
    """A dataset file's text: UTF-8, a leading byte-order mark (Windows editors) dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise LlmforgeError(f"{path} line {line} is not UTF-8 text (byte {exc.object[exc.start]:#04x})",
                            hint="re-save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LlmforgeError(f"{path} line {number} is not valid JSON", hint=exc.msg) from None
        if not isinstance(row, dict):
            raise LlmforgeError(f"{path} line {number} is not a JSON object", hint="one object per line")
        rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise LlmforgeError(f"{path} is not valid JSON (line {exc.lineno})", hint=exc.msg) from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LlmforgeError(f"{path} must hold a list of objects", hint="or use JSONL, one object per line")
    return data


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_datasets_folder(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise LlmforgeError(f"{path} is not a datasets folder", hint="save it with Dataset.save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds.to_list()


READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet,
}


CONTENT_PARTS = ("text", "image")   # the HF processor chat format's part types that llmforge trains on


def from_messages(row: dict, n: int) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise LlmforgeError(f"row {n}: 'messages' must be a non-empty list", hint="[{role, content}, ...]")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise LlmforgeError(f"row {n}: each message needs a 'role'", hint="[{role, content}, ...]")
        for part in m["content"] if isinstance(m.get("content"), list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in CONTENT_PARTS:   # anything else would be dropped silently by the chat template
                raise LlmforgeError(f"row {n}: a {m['role']} message has a content part of type {kind!r}",
                                    hint='parts are {"type": "text", "text": ...} or {"type": "image", '
                                         '"image": PATH}')
            if kind == "text" and not isinstance(part.get("text"), str):
                raise LlmforgeError(f"row {n}: a text part of a {m['role']} message has no 'text' string",
                                    hint='write {"type": "text", "text": "..."}')
    return Example(messages=[dict(m) for m in messages], tools=row.get("tools"), row=n)


def from_sharegpt(row: dict, n: int) -> Example:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise LlmforgeError(f"row {n}: 'conversations' must be a non-empty list", hint="[{from, value}, ...]")
    messages = []
    for turn in turns:
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise LlmforgeError(f"row {n}: unknown ShareGPT speaker {speaker!r}",
                                hint=f"use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value", turn.get("content", ""))})
    return Example(messages=messages, tools=row.get("tools"), row=n)


def from_alpaca(row: dict, n: int) -> Example:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise LlmforgeError(f"row {n}: Alpaca column {key!r} is missing or not text",
                                hint="rows need instruction, output and optionally input")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return Example(messages=messages, row=n)


def from_text(row: dict, n: int) -> Example:
    if not isinstance(row.get("text"), str) or not row["text"]:
        raise LlmforgeError(f"row {n}: column 'text' is missing or empty", hint="plain-text rows need 'text'")
    return Example(text=row["text"], row=n)


# format name -> (identifying columns, converter); detection tries them in this order
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict, int], Example]]] = {
    "messages": (("messages",), from_messages),
    "sharegpt": (("conversations",), from_sharegpt),
    "alpaca": (("instruction", "output"), from_alpaca),
    "text": (("text",), from_text),
}


def detect_format(row: dict, where: str) -> str:
    for name, (columns, _) in FORMATS.items():
        if all(c in row for c in columns):
            return name
    raise LlmforgeError(f"{where}: cannot tell the data format from columns {sorted(row)}",
                        hint="need 'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'text'")


def normalise(rows: Iterable[dict], format: str = "auto", where: str = "dataset") -> tuple[str, list[Example]]:
    """Convert rows to :class:`Example`s; returns the format used. Row numbers in errors count from 1."""
    rows = list(rows)
    if not rows:
        raise LlmforgeError(f"{where} is empty", hint="add at least one row")
    name = detect_format(rows[0], where) if format == "auto" else format
    columns, convert = FORMATS[name]
    examples = []
    for n, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise LlmforgeError(f"{where} row {n}: missing column {missing[0]!r} ({name} format)",
                                hint=f"every row needs {', '.join(columns)}")
        examples.append(convert(row, n))
    return name, examples


def load_examples(path: str | Path, format: str = "auto") -> tuple[str, list[Example]]:
    """Read and normalise a dataset file or folder."""
    return normalise(read_rows(path), format, where=str(path))
