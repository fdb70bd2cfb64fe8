"""GRPO prompts: read with the SFT dataset readers, final assistant turn removed, rendered with the chat template.

A ``prompt`` column (text, or a list of messages as in TRL's conversational format) is taken as is; otherwise rows
are read as messages / ShareGPT / Alpaca and the final assistant turn is dropped. Its text becomes the row's
``answer`` column when the row has none, so built-in rewards can compare against it. Every other column is passed
to the reward functions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import LlmforgeError
from .data import normalise, read_rows
from .masking import make_renderer, special_tokens_of

CONVERSATION_COLUMNS = ("prompt", "messages", "conversations", "instruction", "input", "output", "system")


@dataclass
class Prompt:
    messages: list[dict[str, Any]]
    original: Any                                     # what reward functions get as this row's prompt
    columns: dict[str, Any] = field(default_factory=dict)
    conversational: bool = True                       # completions go to rewards as message lists
    row: int = 0
    ids: list[int] = field(default_factory=list)


def from_prompt_column(row: dict, n: int, where: str) -> Prompt:
    if "prompt" not in row:
        raise LlmforgeError(f"{where} row {n} has no 'prompt', but row 1 has one",
                            hint="give every row a 'prompt' (one dataset shape per file)")
    value = row["prompt"]
    columns = {k: v for k, v in row.items() if k != "prompt"}
    if isinstance(value, str) and value:
        return Prompt([{"role": "user", "content": value}], value, columns, conversational=False, row=n)
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return Prompt([dict(m) for m in value], value, columns, row=n)
    raise LlmforgeError(f"{where} row {n}: 'prompt' must be non-empty text or a list of {{role, content}} messages",
                        hint="e.g. {\"prompt\": \"What is 2+2?\", \"answer\": \"4\"}")


def load_prompts(path: str, format: str = "auto") -> list[Prompt]:
    """The prompts of a dataset file or folder (see the module docstring); images are refused (GRPO is
    text-only)."""
    prompts = _read_prompts(path, format)
    from .vision import image_parts

    with_image = next((p.row for p in prompts if image_parts(p.messages)), None)
    if with_image is not None:
        raise LlmforgeError(f"{path} row {with_image} has an image, and GRPO trains on text prompts only",
                            hint="drop the image parts, or train on images with train.method: sft")
    return prompts


def _read_prompts(path: str, format: str) -> list[Prompt]:
    rows = read_rows(path)
    if format == "auto" and "prompt" in rows[0]:
        return [from_prompt_column(row, n, str(path)) for n, row in enumerate(rows, 1)]
    name, examples = normalise(rows, format, where=str(path))
    if name == "text":
        raise LlmforgeError(f"{path}: GRPO needs prompts, and plain 'text' rows have none",
                            hint="use a 'prompt' column, or messages / ShareGPT / Alpaca rows")
    prompts = []
    for example, row in zip(examples, rows):
        messages = list(example.messages)
        answer = None
        if messages[-1].get("role") == "assistant":
            answer = messages.pop().get("content")
        if not messages:
            raise LlmforgeError(f"{path} row {example.row}: nothing is left as a prompt once the final assistant "
                                "turn is removed", hint="each row needs a user turn before the answer")
        columns = {k: v for k, v in row.items() if k not in CONVERSATION_COLUMNS}
        if columns.get("answer") is None and answer is not None:
            columns["answer"] = answer
        prompts.append(Prompt(messages, messages, columns, row=example.row))
    return prompts


def encode_prompts(prompts: list[Prompt], tokenizer: Any, chat_template: str | None, max_length: int) -> int:
    """Render each prompt with ``add_generation_prompt=True`` and tokenize it into ``Prompt.ids``, keeping the
    last ``max_length`` tokens of longer ones; returns how many were cut."""
    if not chat_template:
        raise LlmforgeError("the tokenizer has no chat template to format GRPO prompts with",
                            hint="set model.chat_template to a named template (see `llmforge template --help`)")
    render = make_renderer(chat_template, special_tokens_of(tokenizer))
    truncated = 0
    for prompt in prompts:
        try:
            text = render(prompt.messages, add_generation_prompt=True)
        except LlmforgeError as exc:
            raise LlmforgeError(f"row {prompt.row}: the chat template rejects this prompt: {exc.message}",
                                hint=exc.hint or "fix the row or choose another model.chat_template") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            truncated += 1
            ids = ids[-max_length:]
        prompt.ids = ids
    if truncated:
        print(f"warning: {truncated} prompts longer than {max_length} tokens keep their last {max_length}",
              file=sys.stderr)
    return truncated
