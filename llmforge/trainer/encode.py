"""Turn normalised examples into token ids and labels (response-only or all tokens), with length limits."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import LlmforgeError
from .data import Example
from .masking import IGNORE_INDEX, assistant_spans, make_renderer, special_tokens_of, token_labels


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    row: int


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    no_trainable: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} examples", f"{self.tokens} tokens ({self.trainable_tokens} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the max length")
        if self.dropped:
            parts.append(f"{self.dropped} dropped as too long")
        if self.no_trainable:
            parts.append(f"{self.no_trainable} skipped with no trainable tokens")
        return "data: " + ", ".join(parts)

    def add(self, ids: list[int], labels: list[int]) -> bool:
        """Count one row; False (counted as skipped) when none of its labels is trained."""
        trainable = sum(1 for x in labels[1:] if x != IGNORE_INDEX)   # the first token is never predicted
        if trainable == 0:
            self.no_trainable += 1
            return False
        self.examples += 1
        self.tokens += len(ids)
        self.trainable_tokens += trainable
        return True

    def check_trainable(self) -> None:
        """One error when no row was kept."""
        if not self.examples:
            raise LlmforgeError("no example has trainable tokens",
                                hint="check that rows contain assistant replies and fit model.max_seq_length")


def resolve_chat_template(tokenizer: Any, named: str | None) -> str | None:
    """The template to train with: a named llmforge template if given, else the tokenizer's own."""
    if named:
        from ..templates.named import get_named_template

        template = get_named_template(named)
        tokenizer.chat_template = template
        return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def encode_example(example: Example, tokenizer: Any, render: Any, response_only: bool) -> tuple[list[int], list[int]]:
    """Ids and labels of one example (no length limit applied)."""
    if example.text is not None:
        text = example.text + (tokenizer.eos_token or "")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    try:
        rendered = assistant_spans(render, example.messages, example.tools)
    except LlmforgeError as exc:
        raise LlmforgeError(f"row {example.row}: the chat template rejects this conversation: {exc.message}",
                            hint=exc.hint or "fix the row or choose another template with model.chat_template") from None
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if not response_only:
        return ids, list(ids)
    return ids, token_labels(ids, encoding["offset_mapping"], rendered.spans)


def encode_all(examples: list[Example], tokenizer: Any, chat_template: str | None, max_length: int,
               response_only: bool = True, overlong: str = "truncate") -> tuple[list[Encoded], EncodeStats]:
    """Encode every example; over-long ones are truncated or dropped (counted), untrainable ones skipped."""
    needs_template = any(e.messages is not None for e in examples)
    if needs_template and not chat_template:
        raise LlmforgeError("the tokenizer has no chat template for conversation data",
                            hint="set model.chat_template to a named template (see `llmforge template --help`)")
    render = make_renderer(chat_template, special_tokens_of(tokenizer)) if needs_template else None
    stats = EncodeStats()
    out: list[Encoded] = []
    for example in examples:
        ids, labels = encode_example(example, tokenizer, render, response_only)
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if stats.add(ids, labels):
            out.append(Encoded(ids, labels, example.row))
    if stats.truncated or stats.dropped:
        verb = "truncated" if stats.truncated else "dropped"
        print(f"warning: {stats.truncated or stats.dropped} sequences longer than {max_length} tokens were {verb}",
              file=sys.stderr)
    if stats.no_trainable:
        print(f"warning: {stats.no_trainable} examples have no trainable tokens (no assistant text left) and are "
              "skipped", file=sys.stderr)
    stats.check_trainable()
    return out, stats


def check_token_ids(rows: Iterable[tuple[int, Sequence[int]]], model: Any, tokenizer: Any, model_path: Any) -> None:
    """Every token id of the data, ``(row, ids)`` pairs, has a row in the model's input embeddings. A tokenizer
    with added tokens that the model was not resized for otherwise fails mid-step: an IndexError on the CPU, a
    device-side assert on a GPU."""
    embeddings = model.get_input_embeddings()
    size = int(getattr(embeddings, "num_embeddings", 0) or embeddings.weight.shape[0])
    for row, ids in rows:
        largest = max(ids, default=-1)
        if largest >= size:
            token = tokenizer.convert_ids_to_tokens(int(largest))
            raise LlmforgeError(
                f"row {row}: token {token!r} (id {largest}) has no embedding in {model_path}: its input embeddings "
                f"have {size} rows, its tokenizer {len(tokenizer)} tokens",
                hint="use the tokenizer that came with the model, or resize the model's embeddings to the tokenizer "
                     "(model.resize_token_embeddings(len(tokenizer))) and save it")
