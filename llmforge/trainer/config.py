"""One training schema (dataclasses), read from YAML with ``--set key=value`` overrides and validated.

Unknown keys and wrong types are user mistakes: they raise :class:`LlmforgeError` naming the key.
Relative paths in a config file are resolved against the file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import LlmforgeError


@dataclass
class ModelConfig:
    path: str = ""                      # Hugging Face model folder
    load_in_4bit: bool = True           # NF4 + double quant on CUDA; 16-bit elsewhere
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_seq_length: int = 2048
    chat_template: str | None = None    # a named template (llmforge's set) instead of the tokenizer's


@dataclass
class DataConfig:
    path: str = ""                      # JSONL / JSON / Parquet file or a `datasets` folder
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = "auto"
    response_only: bool = True          # loss on assistant turns only
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    output_dir: str = "out/train"
    epochs: float = 1.0
    max_steps: int = 0                  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 0                 # 0: only the final adapter
    save_total_limit: int = 2
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"   # auto: on with CUDA
    kernels: bool = True                # llmforge's fused kernels when CUDA is present
    offload_embeddings: Literal["auto", "on", "off"] = "off"  # frozen untied embeddings + lm_head in host memory
    #   (kernels only; auto: on for SFT with CUDA, off for GRPO's generation; off by default: at the 8B shape on
    #   an H100 it took 28% less GPU memory for 0-6% fewer tokens/s)
    fp8: bool = False                   # the MLP's frozen base matmuls on FP8 (e4m3) operands (Hopper GPUs; less exact)
    cuda_graphs: bool = False           # text SFT with the kernels: each checkpointed layer replayed as CUDA graphs;
    #   every batch is padded to model.max_seq_length (one shape; pair it with data.packing); at the 8B shape on an
    #   H100: 1.11x faster per FP8 step for ~2 GiB more reserved memory
    threads: int = 0                    # torch CPU threads; 0 = torch's default
    method: Literal["sft", "grpo"] = "sft"   # grpo: reinforcement learning with the `grpo:` section


@dataclass
class RewardConfig:
    """One GRPO reward: a built-in ``name`` or a ``python`` function (TRL's signature), times ``weight``."""
    name: str = ""                      # exact_match | regex_format | length | contains
    python: str = ""                    # file.py:function or package.module:function
    weight: float = 1.0
    column: str | None = None           # exact_match: reference column (default answer); contains: text from a column
    pattern: str | None = None          # regex_format: the whole completion's pattern; exact_match: answer's group
    text: str | None = None             # contains: the text to find
    target: int = 0                     # length: the wanted completion length in tokens


@dataclass
class GrpoConfig:
    num_generations: int = 4            # completions per prompt (the group); train.batch_size must be a multiple
    max_prompt_length: int = 512        # longer prompts keep their last tokens
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: off
    beta: float = 0.0                   # KL coefficient; 0: no reference pass
    use_bias_correction_kl: bool = True # KL term times the ratio (unbiased gradient; TRL 1.x's default)
    epsilon: float = 0.2                # clip range (lower)
    epsilon_high: float | None = None   # clip range (upper); default epsilon (DAPO uses 0.28)
    num_iterations: int = 1             # optimizer steps per generated batch (mu)
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    rewards: list[RewardConfig] = field(default_factory=list)


@dataclass
class ShipConfig:
    name: str = ""                      # Ollama model name (default: output folder name)
    quant: str = "q4_k_m"
    output_dir: str = ""                # default: <train.output_dir>/ship
    host: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    ship: ShipConfig = field(default_factory=ShipConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PATH_KEYS = ("model.path", "data.path", "train.output_dir", "ship.output_dir")


def load_config(source: str | Path | dict | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read ``source`` (YAML path, dict or None for defaults), apply ``KEY=VALUE`` overrides, validate."""
    overrides = list(overrides)
    base_dir = Path(".")
    origin = "config"
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise LlmforgeError(f"config file {path} {'is a folder' if path.is_dir() else 'not found'}",
                                hint="pass the path of a YAML training config")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise LlmforgeError(f"config file {path} line {line} is not UTF-8 text (byte {exc.object[exc.start]:#04x})",
                                hint="re-save it as UTF-8") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise LlmforgeError(f"config file {path}{where} is not valid YAML",
                                hint=str(getattr(exc, "problem", exc))) from None
        if not isinstance(raw, dict):
            raise LlmforgeError(f"config file {path} must hold a mapping of sections", hint="see examples/train.yaml")
        base_dir = path.parent
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, value = parse_override(item)
        section, _, leaf = key.partition(".")
        if not leaf:
            raise LlmforgeError(f"override {item!r} must name section.key", hint="e.g. --set train.lr=1e-4")
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise LlmforgeError(f"config section {section!r} must be a mapping", hint=f"in {origin}")
        target[leaf] = value
        if key in PATH_KEYS and isinstance(value, str) and value:  # paths on the command line: from the cwd
            target[leaf] = str(Path(value).resolve())
    try:
        config = build(Config, raw, "", origin)
    except LlmforgeError as exc:   # a value given with --set: say so, not "in <the YAML file>"
        keys = [parse_override(item)[0] for item in overrides]
        key = next((k for k in keys if re.search(rf"config key '?{re.escape(k)}[' .\[]", exc.message)), None)
        if key is None:
            raise
        hint = f"from --set {key}" if exc.hint == f"in {origin}" else exc.hint
        raise LlmforgeError(exc.message.replace(f" in {origin}", " (from --set)"), hint=hint) from None
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = getattr(getattr(config, section), leaf)
        if value and not Path(value).is_absolute():
            setattr(getattr(config, section), leaf, str((base_dir / value).resolve()))
    rewards_dir = Path(".") if any(o.strip().startswith("grpo.rewards") for o in overrides) else base_dir
    for reward in config.grpo.rewards:   # python: file.py:function is read from the config's folder
        file, sep, function = reward.python.rpartition(":")
        if sep and file.endswith(".py") and not Path(file).is_absolute():
            reward.python = f"{(rewards_dir / file).resolve()}:{function}"
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 0.0001): the value is read as YAML (numbers, booleans, lists)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise LlmforgeError(f"override {item!r} is not KEY=VALUE", hint="e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def build(cls: type, raw: Any, prefix: str, origin: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, raising one clear error for the first bad key or value."""
    if not isinstance(raw, dict):
        raise LlmforgeError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}",
                            hint=f"in {origin}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise LlmforgeError(f"unknown config key '{prefix}{key}' in {origin}", hint=hint)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = build(kind, value if value is not None else {}, f"{prefix}{key}.", origin)
        else:
            values[key] = coerce(value, kind, f"{prefix}{key}", origin)
    return cls(**values)


def coerce(value: Any, kind: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints are accepted where floats are expected."""
    origin_type = typing.get_origin(kind)
    if origin_type in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(kind):
            try:
                return coerce(value, option, key, origin)
            except LlmforgeError as exc:
                errors.append(exc)
        raise errors[-1]
    if kind is type(None):
        if value is None:
            return None
        raise wrong_type(key, "null", value, origin)
    if origin_type is Literal:
        choices = typing.get_args(kind)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        if value in choices:
            return value
        raise LlmforgeError(f"config key {key} must be one of {', '.join(map(str, choices))}, got {value!r}",
                            hint=f"in {origin}")
    if dataclasses.is_dataclass(kind):
        return build(kind, value, f"{key}.", origin)
    if origin_type is list:
        (item_kind,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise wrong_type(key, "a list", value, origin)
        return [coerce(v, item_kind, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise wrong_type(key, "true or false", value, origin)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong_type(key, "an integer", value, origin)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong_type(key, "a number", value, origin)
    if kind is str:
        if isinstance(value, str):
            return value
        raise wrong_type(key, "a string", value, origin)
    raise TypeError(f"unsupported annotation {kind!r} for {key}")


def wrong_type(key: str, expected: str, value: Any, origin: str) -> LlmforgeError:
    return LlmforgeError(f"config key {key} must be {expected}, got {value!r} ({type(value).__name__})",
                         hint=f"in {origin}")
