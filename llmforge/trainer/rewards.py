"""GRPO rewards named in YAML: built-ins (``exact_match``, ``regex_format``, ``length``, ``contains``) and Python
functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.

Every reward gets the same keyword arguments TRL passes: ``prompts``, ``completions`` (strings, or
``[{"role": "assistant", "content": ...}]`` lists for conversational prompts), ``completion_ids`` and one list per
dataset column. ``None`` means "does not apply" and counts as 0 in the weighted sum.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LlmforgeError
from .config import GrpoConfig, RewardConfig

RewardFn = Callable[..., Sequence[float | None]]

# <think>..</think> then <answer>..</answer>, nothing else (DeepSeek-R1's format)
THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
SPEC_KEYS = ("column", "pattern", "text", "target")


@dataclass
class Reward:
    label: str                     # shown in progress lines and the log
    fn: RewardFn
    weight: float
    columns: tuple[str, ...] = ()  # dataset columns a built-in reads (checked against the data up front)


def completion_text(completion: Any) -> str:
    """The text of a completion in either of TRL's formats (string or a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise LlmforgeError(f"{where}: pattern {pattern!r} is not a valid regular expression ({exc})",
                            hint="use Python regex syntax; quote it in YAML") from None


def exact_match(spec: RewardConfig, grpo: GrpoConfig, where: str) -> Reward:
    """1.0 when the completion (or ``pattern``'s first group in it) equals the ``column`` value, stripped."""
    column = spec.column or "answer"
    extract = compile_pattern(spec.pattern, where) if spec.pattern else None

    def answer_of(text: str) -> str | None:
        if extract is None:
            return text
        match = extract.search(text)
        if match is None:
            return None
        return match.group(1) if extract.groups else match.group(0)

    def reward(completions: list, **columns: Any) -> list[float]:
        answers = [answer_of(completion_text(c)) for c in completions]
        return [float(a is not None and ref is not None and a.strip() == str(ref).strip())
                for a, ref in zip(answers, columns[column])]

    return Reward(f"exact_match({column})", reward, spec.weight, (column,))


def regex_format(spec: RewardConfig, grpo: GrpoConfig, where: str) -> Reward:
    """1.0 when the whole completion matches ``pattern`` (default: <think>..</think><answer>..</answer>)."""
    pattern = compile_pattern(spec.pattern or THINK_ANSWER, where)

    def reward(completions: list, **_: Any) -> list[float]:
        return [float(pattern.fullmatch(completion_text(c)) is not None) for c in completions]

    return Reward("regex_format", reward, spec.weight)


def length(spec: RewardConfig, grpo: GrpoConfig, where: str) -> Reward:
    """-|tokens - target| / max_completion_length: 0 at the target length, -1 at the worst."""
    if spec.target < 0:
        raise LlmforgeError(f"{where}: target must be >= 0 tokens, got {spec.target}", hint="e.g. target: 64")
    scale = max(grpo.max_completion_length, 1)

    def reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [-abs(len(ids) - spec.target) / scale for ids in completion_ids]

    return Reward(f"length({spec.target})", reward, spec.weight)


def contains(spec: RewardConfig, grpo: GrpoConfig, where: str) -> Reward:
    """1.0 when the completion contains ``text`` (or the row's ``column`` value)."""
    if (spec.text is None) == (spec.column is None):
        raise LlmforgeError(f"{where}: the contains reward needs exactly one of text or column",
                            hint="e.g. {name: contains, text: 'Paris'} or {name: contains, column: answer}")
    column = spec.column

    def reward(completions: list, **columns: Any) -> list[float]:
        needles = columns[column] if column else [spec.text] * len(completions)
        return [float(n is not None and str(n) in completion_text(c)) for c, n in zip(completions, needles)]

    label = f"contains({column})" if column else f"contains({spec.text!r})"
    return Reward(label, reward, spec.weight, (column,) if column else ())


# name -> (builder, the spec keys it reads)
BUILTINS: dict[str, tuple[Callable[[RewardConfig, GrpoConfig, str], Reward], tuple[str, ...]]] = {
    "exact_match": (exact_match, ("column", "pattern")),
    "regex_format": (regex_format, ("pattern",)),
    "length": (length, ("target",)),
    "contains": (contains, ("text", "column")),
}


def load_function(target: str, where: str) -> RewardFn:
    """Import ``file.py:function`` or ``package.module:function``."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise LlmforgeError(f"{where}: python {target!r} is not MODULE:FUNCTION",
                            hint="e.g. python: rewards.py:my_reward or python: mypkg.rewards:my_reward")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise LlmforgeError(f"{where}: reward file {path} not found",
                                    hint="relative paths are read from the config file's folder")
            spec = importlib.util.spec_from_file_location(f"llmforge_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except LlmforgeError:
        raise
    except ModuleNotFoundError as exc:
        raise LlmforgeError(f"{where}: cannot import {module_name!r} ({exc})",
                            hint="install the module, or name a file: python: path/to/file.py:function") from None
    except Exception as exc:  # the user's module failed while importing
        raise LlmforgeError(f"{where}: importing {module_name} failed: {type(exc).__name__}: {exc}",
                            hint="fix the module so that it imports") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LlmforgeError(f"{where}: {module_name} has no function {attr!r}",
                            hint="functions take (prompts, completions, **columns) and return a list of floats")
    return fn


def build_reward(spec: RewardConfig, grpo: GrpoConfig, where: str) -> Reward:
    """One :class:`Reward` from its YAML spec; unknown names and keys that do not apply are refused."""
    if bool(spec.name) == bool(spec.python):
        raise LlmforgeError(f"{where} needs exactly one of name or python",
                            hint=f"built-ins: {', '.join(BUILTINS)}; or python: file.py:function")
    if not math.isfinite(spec.weight):
        raise LlmforgeError(f"{where}: weight must be a finite number, got {spec.weight}", hint="e.g. weight: 1.0")
    used: tuple[str, ...] = ()
    if spec.name:
        if spec.name not in BUILTINS:
            raise LlmforgeError(f"{where}: unknown reward {spec.name!r}",
                                hint=f"built-ins: {', '.join(BUILTINS)}; custom ones: python: file.py:function")
        builder, used = BUILTINS[spec.name]
    extra = [k for k in SPEC_KEYS if k not in used and getattr(spec, k) != getattr(RewardConfig, k)]
    if extra:
        owner = f"the {spec.name} reward" if spec.name else "a python reward"
        raise LlmforgeError(f"{where}: {extra[0]!r} does not apply to {owner}",
                            hint=f"{spec.name or 'python'} reads {', '.join(used) or 'no other keys'}")
    if spec.name:
        return builder(spec, grpo, where)
    fn = load_function(spec.python, where)
    return Reward(spec.python.rpartition(":")[2], fn, spec.weight)


def build_rewards(grpo: GrpoConfig) -> list[Reward]:
    if not grpo.rewards:
        raise LlmforgeError("GRPO needs at least one reward in grpo.rewards",
                            hint="e.g. rewards: [{name: exact_match}] (see examples/grpo.yaml)")
    return [build_reward(spec, grpo, f"grpo.rewards[{i}]") for i, spec in enumerate(grpo.rewards)]


def check_columns(rewards: list[Reward], rows: list[dict[str, Any]], where: str) -> None:
    """Every column a built-in reads must be present in every row (before any training)."""
    for reward in rewards:
        for column in reward.columns:
            for n, row in enumerate(rows, 1):
                if row.get(column) is None:
                    raise LlmforgeError(f"reward {reward.label} needs column {column!r}; {where} row {n} has none",
                                        hint=f"add {column!r} to every row, or set the reward's column: key")


def score(rewards: list[Reward], kwargs: dict[str, Any], n: int) -> list[list[float]]:
    """Per reward, one value per completion (NaN for None); a failing or malformed reward is one error line."""
    table = []
    for reward in rewards:
        try:
            values = reward.fn(**kwargs)
        except LlmforgeError:
            raise
        except Exception as exc:
            hint = f"dataset columns: {', '.join(k for k in kwargs if k not in ('prompts', 'completions', 'completion_ids'))}"
            raise LlmforgeError(f"reward {reward.label} failed: {type(exc).__name__}: {exc}", hint=hint) from None
        got = type(values).__name__
        try:
            values = list(values) if not isinstance(values, (str, bytes)) else None
            if values is not None and any(isinstance(v, (str, bytes)) for v in values):
                got, values = "text", None   # float("1") would hide a function that returns text
            values = None if values is None else [math.nan if v is None else float(v) for v in values]
        except Exception:   # not numbers, or a generator that raised
            values = None
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else got
            raise LlmforgeError(f"reward {reward.label} must return {n} numbers (one per completion), got {got}",
                                hint="return a list of floats (or None) as long as completions")
        if any(math.isinf(v) for v in values):
            raise LlmforgeError(f"reward {reward.label} returned an infinite value",
                                hint="return finite floats (None or NaN: the reward does not apply)")
        table.append(values)
    return table

