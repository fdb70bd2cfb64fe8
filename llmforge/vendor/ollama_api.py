"""Facts about Ollama kept as data (ollama/ollama @fb30760, see shared/docs/ollama.md).

Parameter names and types follow ``api/types.go`` (``Options`` and ``Runner``); Modelfile commands and
message roles follow ``parser/parser.go``; model-name part rules follow ``types/model/name.go``.
"""

from __future__ import annotations

# PARAMETER name -> value type (what /api/create's JSON ``parameters`` expects).
PARAMETER_TYPES: dict[str, type] = {
    # Runner
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
    # Options
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
}

# Accepted by the parser but ignored with a warning by current servers.
DEPRECATED_PARAMETERS = frozenset({
    "penalize_newline", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z", "low_vram", "f16_kv",
    "logits_all", "vocab_only", "use_mlock", "numa",
})

MODELFILE_COMMANDS = frozenset({
    "from", "license", "template", "system", "adapter", "renderer", "parser", "parameter", "message", "requires",
    "draft",
})
# Keywords only newer servers know: never emitted by llmforge.
NEWER_COMMANDS = frozenset({"renderer", "parser", "requires", "draft"})
MESSAGE_ROLES = frozenset({"system", "user", "assistant"})

# Model names: host/namespace/model:tag, defaults filled in as Ollama's ParseName does.
NAME_DEFAULTS = {"host": "registry.ollama.ai", "namespace": "library", "tag": "latest"}
NAME_PART_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
# Characters allowed after the first (which must be [A-Za-z0-9_]) in each part, besides [A-Za-z0-9_-].
NAME_PART_EXTRA_CHARS = {"host": ".:", "namespace": "", "model": ".", "tag": "."}

# Feature -> first Ollama version that has it.
FEATURE_VERSIONS: dict[str, tuple[int, int, int]] = {
    "json_create": (0, 5, 5),
    "render_only": (0, 11, 5),
    "native_jinja": (0, 30, 0),
}

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434

# `api/show` formats each parameter as fmt.Sprintf("%-*s %#v", 30, key, value).
SHOW_PARAMETER_KEY_WIDTH = 30
