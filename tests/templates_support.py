"""Shared helpers for the template tests: fixture templates, their special tokens, the summary table."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tiny_models import TEMPLATES

REPO = Path(__file__).resolve().parents[1]
TOKEN_TABLE = json.loads((REPO / "llmforge" / "vendor" / "chat_template_tokens.json").read_text())["families"]
JINJA_DIR = TEMPLATES / "jinja"


def fixture_templates() -> list[Path]:
    return sorted(JINJA_DIR.glob("*.jinja"))


def tokens_for(name: str) -> dict[str, str]:
    """bos/eos of the family a fixture template belongs to (llmforge/vendor/chat_template_tokens.json)."""
    for pattern, bos, eos in TOKEN_TABLE:
        if re.search(pattern, name):
            return {"bos_token": bos, "eos_token": eos}
    raise AssertionError(f"no token family for {name}")
