"""llama.cpp's quant mixtures: which ggml type each tensor gets under an ftype such as ``q4_k_m``.

Mirrors ``llama_tensor_get_type`` / ``llama_tensor_get_type_impl`` / ``tensor_type_fallback`` of
``src/llama-quant.cpp`` in the llama.cpp vendored by llama-cpp-python 0.3.36 (llama.cpp 0c1e570).
Mixture rules change between llama.cpp releases; this table is for that pin. Only the ftypes llmforge
offers are covered (no IQ*/TQ*/MXFP4 ftypes, no Falcon-specific rows: no supported arch is Falcon).

The rules are a table per tensor category; the first row whose ftype matches and whose condition
holds picks the type, exactly like the C if/else chains. ``i_wv`` counts attn_v-like tensors in
llama.cpp's ``weights_map`` order, which is why :class:`TypePlanner` is stateful.

llama-quantize's overrides (``--pure``, ``--leave-output-tensor``, ``--output-tensor-type``,
``--token-embedding-type``, ``--tensor-type REGEX=TYPE``, ``--tensor-type-file``) are :class:`TypeOverrides`,
applied in ``llama_tensor_get_type``'s order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from gguf.constants import GGML_QUANT_SIZES

from ..errors import LlmforgeError

LLAMA_CPP_PIN = "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"


@dataclass(frozen=True)
class Mixture:
    """A user-facing quant name and the facts ``llmforge quants`` prints."""

    name: str
    file_type: F
    base_type: T
    bpw: float          # bits per weight of the base type (a mixture's files come out a little larger)
    description: str


# name, llama_ftype, default type (llama_ftype_get_default_type), bits/weight of that type, description
MIXTURES: tuple[Mixture, ...] = (
    Mixture("q2_k", F.MOSTLY_Q2_K, T.Q2_K, 2.625, "Q2_K; attn_v Q3_K/Q4_K, ffn_down and attn_output Q3_K, output Q6_K"),
    Mixture("q3_k_s", F.MOSTLY_Q3_K_S, T.Q3_K, 3.4375, "Q3_K throughout, output Q6_K"),
    Mixture("q3_k_m", F.MOSTLY_Q3_K_M, T.Q3_K, 3.4375, "Q3_K; attn_v/ffn_down/attn_output Q4_K-Q5_K, output Q6_K"),
    Mixture("q3_k_l", F.MOSTLY_Q3_K_L, T.Q3_K, 3.4375, "Q3_K; attn_v, ffn_down, attn_output Q5_K, output Q6_K"),
    Mixture("q4_0", F.MOSTLY_Q4_0, T.Q4_0, 4.5, "legacy 4-bit round-to-nearest, blocks of 32, output Q6_K"),
    Mixture("q4_1", F.MOSTLY_Q4_1, T.Q4_1, 5.0, "legacy 4-bit with min, blocks of 32, output Q6_K"),
    Mixture("q4_k_s", F.MOSTLY_Q4_K_S, T.Q4_K, 4.5, "Q4_K; first attn_v and ffn_down layers Q5_K, output Q6_K"),
    Mixture("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K, 4.5, "Q4_K; half of attn_v and ffn_down Q6_K, output Q6_K (recommended)"),
    Mixture("q5_0", F.MOSTLY_Q5_0, T.Q5_0, 5.5, "legacy 5-bit round-to-nearest, blocks of 32, output Q6_K"),
    Mixture("q5_1", F.MOSTLY_Q5_1, T.Q5_1, 6.0, "legacy 5-bit with min, blocks of 32, output Q6_K"),
    Mixture("q5_k_s", F.MOSTLY_Q5_K_S, T.Q5_K, 5.5, "Q5_K throughout, output Q6_K"),
    Mixture("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K, 5.5, "Q5_K; half of attn_v and ffn_down Q6_K, output Q6_K"),
    Mixture("q6_k", F.MOSTLY_Q6_K, T.Q6_K, 6.5625, "Q6_K throughout, nearly lossless"),
    Mixture("q8_0", F.MOSTLY_Q8_0, T.Q8_0, 8.5, "8-bit round-to-nearest, blocks of 32"),
    Mixture("f16", F.MOSTLY_F16, T.F16, 16.0, "16-bit float"),
    Mixture("bf16", F.MOSTLY_BF16, T.BF16, 16.0, "bfloat16, lossless from bf16 checkpoints"),
    Mixture("f32", F.ALL_F32, T.F32, 32.0, "32-bit float, lossless"),
)
BY_NAME: dict[str, Mixture] = {m.name: m for m in MIXTURES}
BY_FILE_TYPE: dict[F, Mixture] = {m.file_type: m for m in MIXTURES}


def describe_quants() -> list[tuple[str, float, str]]:
    """(name, bits per weight of the base type, one-line description) for ``llmforge quants``."""
    return [(m.name, m.bpw, m.description) for m in MIXTURES]


# ----------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelFacts:
    """What the rules read from the model's hyper-parameters."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    has_output: bool = True       # output.weight present; otherwise token_embd is tied and follows output
    has_imatrix: bool = False

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's ``LLM_TYPE_70B`` for the supported archs (llama: 80 layers + GQA; qwen2: 80 layers)."""
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv)


@dataclass(frozen=True)
class Site:
    """One tensor as the rules see it: counters are llama.cpp's, taken in weights_map order."""

    facts: ModelFacts
    nx: int            # ne[0], the row length
    i_wv: int          # attn_v-like tensors seen before this one
    n_wv: int          # attn_v-like tensors in the model
    i_layer: int       # ffn counter (== layer index for dense models)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# ----------------------------------------------------------------------------- categories


def tensor_category(name: str) -> str:
    """``tensor_get_category``: first matching substring wins, in this order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for tag, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if tag in name:
            return cat
    return "other"


ATTN_V_LIKE = {"attn_v", "attn_qkv", "attn_kv_b"}   # category_is_attn_v: these share the attn_v rules


# ----------------------------------------------------------------------------- the rules

Rule = tuple[frozenset[str], Callable[[Site], bool], Callable[[Site], T]]
ALWAYS: Callable[[Site], bool] = lambda s: True


def _fts(*names: str) -> frozenset[str]:
    return frozenset(names)


def _const(t: T) -> Callable[[Site], T]:
    return lambda s: t


RULES: dict[str, list[Rule]] = {
    # llama_tensor_get_type_impl, `else if (category_is_attn_v(category))` chain
    "attn_v": [
        (_fts("q2_k"), ALWAYS, lambda s: T.Q4_K if s.facts.n_gqa >= 4 else T.Q3_K),       # Q2_K: gqa >= 4 ? Q4_K : Q3_K
        (_fts("q3_k_m"), ALWAYS, lambda s: T.Q5_K if s.i_wv < 2 else T.Q4_K),             # Q3_K_M: first two Q5_K
        (_fts("q3_k_l"), ALWAYS, _const(T.Q5_K)),                                         # Q3_K_L: Q5_K
        (_fts("q4_k_m", "q5_k_m"), lambda s: use_more_bits(s.i_wv, s.n_wv), _const(T.Q6_K)),  # *_K_M: more bits
        (_fts("q4_k_s"), lambda s: s.i_wv < 4, _const(T.Q5_K)),                           # Q4_K_S: first four Q5_K
    ],
    # `else if (category == tensor_category::ATTENTION_K)`: 8 experts -> Q8_0
    "attn_k": [
        (_fts(*BY_NAME), lambda s: s.facts.n_expert == 8, _const(T.Q8_0)),
    ],
    # `else if (category == tensor_category::FFN_DOWN)` (non-Falcon branches)
    "ffn_down": [
        (_fts("q2_k"), ALWAYS, _const(T.Q3_K)),                                           # Q2_K: Q3_K
        (_fts("q3_k_m"), ALWAYS,
         lambda s: T.Q5_K if s.i_layer < s.facts.n_layer // 16 else T.Q4_K),              # Q3_K_M: n/16 Q5_K, else Q4_K
        (_fts("q3_k_l"), ALWAYS, _const(T.Q5_K)),                                         # Q3_K_L: Q5_K
        (_fts("q4_k_m", "q5_k_m"), lambda s: use_more_bits(s.i_layer, s.facts.n_layer),
         _const(T.Q6_K)),                                                                 # *_K_M: more bits -> Q6_K
        (_fts("q4_k_s"), lambda s: s.i_layer < s.facts.n_layer // 8, _const(T.Q5_K)),      # Q4_K_S: first n/8 Q5_K
        (_fts("q4_0"), lambda s: s.facts.has_imatrix and s.i_layer < s.facts.n_layer // 8,
         _const(T.Q4_1)),                                                                 # imatrix guard: Q4_0 -> Q4_1
        (_fts("q5_0"), lambda s: s.facts.has_imatrix and s.i_layer < s.facts.n_layer // 8,
         _const(T.Q5_1)),                                                                 # imatrix guard: Q5_0 -> Q5_1
    ],
    # `else if (category == tensor_category::ATTENTION_OUTPUT)` (non-Falcon)
    "attn_output": [
        (_fts("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"), lambda s: s.facts.n_expert == 8,
         _const(T.Q5_K)),                                                                 # 8 experts: Q5_K
        (_fts("q2_k"), lambda s: s.facts.n_expert != 8, _const(T.Q3_K)),                  # Q2_K: Q3_K
        (_fts("q3_k_m"), lambda s: s.facts.n_expert != 8, _const(T.Q4_K)),                # Q3_K_M: Q4_K
        (_fts("q3_k_l"), lambda s: s.facts.n_expert != 8, _const(T.Q5_K)),                # Q3_K_L: Q5_K
    ],
}

# tensor_type_fallback: the type used when ne[0] is not a multiple of the chosen type's block
FALLBACK: dict[T, T] = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

QUANTIZED_DEFAULTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def output_type(mixture: Mixture, nx: int) -> T:
    """The OUTPUT (and tied token_embd) rule: Q8_0 if ne[0] misses the base block, else Q6_K unless Q8_0."""
    if nx % block_size(mixture.base_type):
        return T.Q8_0
    return mixture.base_type if mixture.base_type == T.Q8_0 else T.Q6_K


def impl_type(mixture: Mixture, name: str, site: Site, output_override: T | None = None) -> T:
    """``llama_tensor_get_type_impl`` for the supported ftypes; ``output_override`` is
    ``--output-tensor-type``, which reaches this point only for a tied token_embd."""
    category = tensor_category(name)
    if category == "output" or (category == "token_embd" and not site.facts.has_output):
        return output_override if output_override is not None else output_type(mixture, site.nx)
    if category == "token_embd":
        return mixture.base_type
    rules = RULES.get("attn_v" if category in ATTN_V_LIKE else category, [])
    new_type = mixture.base_type
    for ftypes, condition, pick in rules:
        if mixture.name in ftypes and condition(site):
            new_type = pick(site)
            break
    if category in ATTN_V_LIKE:
        if site.facts.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K          # 70B: attn_v is 8x smaller, give it more bits
        if site.facts.n_expert == 8:
            new_type = T.Q8_0          # 8 experts: attn_v Q8_0
    return new_type


def fallback(new_type: T, nx: int) -> T:
    """``tensor_type_fallback``."""
    if nx % block_size(new_type) == 0:
        return new_type
    alt = FALLBACK.get(new_type, new_type)
    return alt if nx % block_size(alt) == 0 else T.F16


def allows_quantization(name: str, n_dims: int, leave_output: bool = False) -> bool:
    """``tensor_allows_quantization`` for the names that occur in the supported archs; ``leave_output`` is
    llama-quantize's ``--leave-output-tensor`` (``quantize_output_tensor = false``)."""
    if n_dims < 2 or not name.endswith("weight") or (leave_output and name == "output.weight"):
        return False
    banned = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
              "ssm_conv1d", "attn_rel_b.weight", ".position_embd", ".patch_embd", ".rel_pos")
    return not any(b in name for b in banned) and name not in ("position_embd.weight", "token_types.weight")


_LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def weights_map_key(name: str) -> tuple[int, bytes]:
    """llama.cpp's ``weight_name_comparer``: layer number (-1 without one), then name bytewise."""
    return layer_of(name), name.encode()


def weights_map_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=weights_map_key)


# ----------------------------------------------------------------------------- llama-quantize's overrides

# the ggml types llmforge can write, i.e. what an override may name
OVERRIDE_TYPES: tuple[T, ...] = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                                 T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _type_label(t: T) -> str:
    """ggml's own spelling (``ggml_type_name``): q4_0, q4_K, f16."""
    return t.name.lower().replace("_k", "_K")


def override_type_names() -> list[str]:
    """The type names an override accepts, spelled as llama-quantize prints them."""
    return [_type_label(t) for t in OVERRIDE_TYPES]


def parse_ggml_type(text: str | T, option: str = "type") -> T:
    """A ggml type name as llama-quantize reads it: ``ggml_type_name`` compared case-insensitively."""
    if isinstance(text, T):
        found: T | None = text
    else:
        found = next((t for t in T if t.name.lower() == str(text).strip().lower()), None)
    valid = "valid: " + ", ".join(override_type_names())
    if found is None:
        if str(text).strip().lower() in BY_NAME:
            raise LlmforgeError(f"{option}: {text!r} is a mixture, not a tensor type", hint=valid)
        raise LlmforgeError(f"{option}: unknown ggml type {text!r}", hint=valid)
    if found not in OVERRIDE_TYPES:
        raise LlmforgeError(f"{option}: ggml type {_type_label(found)} is not supported by llmforge", hint=valid)
    return found


def parse_tensor_type_rule(rule: str, where: str | None = None) -> tuple[re.Pattern[str], T]:
    """``REGEX=TYPE`` as llama-quantize's ``parse_tensor_type`` reads it: split at the first '=', the
    regex lower-cased. Python's ``re`` stands in for C++'s ECMAScript ``std::regex``; they agree on the
    usual syntax (literals, ``.``, ``\\d``, ``[...]``, ``|``, groups, ``*+?{m,n}``, ``^$``).
    ``where`` names the rule in errors (default ``--tensor-type 'RULE'``)."""
    where = where or f"--tensor-type {rule!r}"
    pattern, sep, type_name = rule.partition("=")
    if not sep or not pattern or not type_name:
        raise LlmforgeError(f"{where} is not REGEX=TYPE", hint="e.g. --tensor-type 'attn_v=q8_0'")
    try:
        regex = re.compile(pattern.lower())
    except re.error as exc:
        raise LlmforgeError(f"{where}: bad regular expression ({exc})",
                            hint="e.g. 'blk\\.[0-3]\\.ffn_down=q6_k'") from None
    return regex, parse_ggml_type(type_name, where)


def read_tensor_type_file(path: str | Path) -> list[tuple[re.Pattern[str], T]]:
    """llama-quantize's ``--tensor-type-file``: REGEX=TYPE rules separated by spaces or newlines (its
    ``file >> arg`` loop: no comments, no quoting), in file order. Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LlmforgeError(f"--tensor-type-file {path}: cannot read it ({exc.strerror or exc})",
                            hint="pass a text file of REGEX=TYPE rules") from None
    except UnicodeDecodeError:
        raise LlmforgeError(f"--tensor-type-file {path} is not UTF-8 text",
                            hint="pass a text file of REGEX=TYPE rules") from None
    return [parse_tensor_type_rule(rule, f"{path}:{lineno}: {rule!r}")
            for lineno, line in enumerate(text.splitlines(), 1) for rule in line.split()]


@dataclass(frozen=True)
class TypeOverrides:
    """llama-quantize's per-tensor overrides, in the order ``llama_tensor_get_type`` applies them.

    ``token_embd_type``/``output_type`` are used as given (llama.cpp applies no row-length fallback to
    them); a ``tensor_types`` match or ``pure`` replaces the mixture rule, and the fallback still applies.
    ``leave_output`` keeps output.weight in its source type, before any of them (it is then not quantizable).
    """

    pure: bool = False
    output_type: T | None = None
    token_embd_type: T | None = None
    tensor_types: tuple[tuple[re.Pattern[str], T], ...] = ()
    leave_output: bool = False

    @property
    def active(self) -> bool:
        return (self.pure or self.leave_output or self.output_type is not None or self.token_embd_type is not None
                or bool(self.tensor_types))

    def manual_type(self, name: str) -> T | None:
        """The first ``--tensor-type`` rule whose regex occurs in ``name`` (``std::regex_search``)."""
        return next((t for regex, t in self.tensor_types if regex.search(name)), None)


NO_OVERRIDES = TypeOverrides()


def type_overrides(*, pure: bool = False, output_tensor_type: str | T | None = None,
                   token_embedding_type: str | T | None = None, tensor_types: Sequence[str] = (),
                   tensor_type_file: str | Path | None = None, leave_output_tensor: bool = False) -> TypeOverrides:
    """Parse llama-quantize's options (type names as ``llama-quantize`` spells them: q8_0, q6_K, f16 ...).

    ``tensor_type_file``'s rules come after ``tensor_types`` (llama-quantize keeps command-line order;
    the first matching rule wins)."""
    rules = [parse_tensor_type_rule(r) for r in tensor_types]
    if tensor_type_file is not None:
        rules += read_tensor_type_file(tensor_type_file)
    return TypeOverrides(
        pure=pure,
        output_type=None if output_tensor_type is None else parse_ggml_type(output_tensor_type, "--output-tensor-type"),
        token_embd_type=None if token_embedding_type is None else
        parse_ggml_type(token_embedding_type, "--token-embedding-type"),
        tensor_types=tuple(rules),
        leave_output=leave_output_tensor,
    )


def check_overrides(overrides: TypeOverrides, mixture: Mixture) -> None:
    """Refuse what llama.cpp would silently ignore: rules for a float ftype (it only applies
    ``--tensor-type`` when the ftype's base type is quantized)."""
    if overrides.tensor_types and mixture.base_type not in QUANTIZED_DEFAULTS:
        raise LlmforgeError(f"--tensor-type applies to quantized mixtures, not {mixture.name}",
                            hint="llama-quantize ignores it there; pick e.g. -q q8_0 with --tensor-type")


def override_warnings(overrides: TypeOverrides, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Overrides that change nothing for this model (``{tensor name: shape}``): llama-quantize ignores them
    silently, llmforge says so (a typo in a regex is the usual cause). The bytes are the same either way."""
    names = [n for n, s in shapes.items() if allows_quantization(n, len(s), overrides.leave_output)]
    found = [f"tensor type rule '{regex.pattern}={_type_label(t)}' matches no quantizable tensor"
             for regex, t in overrides.tensor_types if not any(regex.search(n) for n in names)]
    if overrides.leave_output and "output.weight" not in shapes:
        found.append("--leave-output-tensor: the model has no output.weight (tied embeddings)")
    return found


def _as_given(t: T, name: str, nx: int, option: str) -> T:
    """An override used without fallback: llama.cpp aborts when its blocks do not fit the rows."""
    if nx % block_size(t):
        raise LlmforgeError(f"{option} {_type_label(t)} does not fit {name}: rows of {nx} values are not a "
                            f"multiple of its block of {block_size(t)}", hint="pick q8_0, f16 or a 32-block type")
    return t


class TypePlanner:
    """Chooses each tensor's type as ``llama_model_quantize`` does, keeping llama.cpp's counters.

    Create one per model with all tensor names, then call :meth:`tensor_type` for every tensor in
    weights_map order (:func:`weights_map_order`); the attn_v counter depends on that order, and a
    tensor matched by a ``--tensor-type`` rule does not advance the counters (llama.cpp skips the
    mixture rules, where they are counted).
    """

    def __init__(self, mixture: Mixture, facts: ModelFacts, tensor_names: Iterable[str],
                 overrides: TypeOverrides | None = None):
        names = list(tensor_names)
        self.mixture = mixture
        self.facts = facts
        self.overrides = overrides if overrides is not None else NO_OVERRIDES
        self.n_wv = sum(tensor_category(n) in ATTN_V_LIKE for n in names)
        self.i_wv = 0
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def tensor_type(self, name: str, shape: tuple[int, ...], source_type: T = T.F32) -> T:
        """The type of tensor ``name`` (numpy-order ``shape``) stored as ``source_type`` in the input."""
        if not allows_quantization(name, len(shape), self.overrides.leave_output):
            return source_type
        ov, category, nx = self.overrides, tensor_category(name), shape[-1]
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type rule names it
        if ov.token_embd_type is not None and category == "token_embd" and not (
                name == "per_layer_token_embd.weight" and ov.manual_type(name) is not None):
            return _as_given(ov.token_embd_type, name, nx, "--token-embedding-type")
        if ov.output_type is not None and category == "output":
            return _as_given(ov.output_type, name, nx, "--output-tensor-type")
        base = self.mixture.base_type
        if base not in QUANTIZED_DEFAULTS:
            return base
        new_type = ov.manual_type(name)
        if new_type is None:
            new_type = base if ov.pure else self._mixture_type(name, category, nx)
        return fallback(new_type, nx)

    def _mixture_type(self, name: str, category: str, nx: int) -> T:
        """``llama_tensor_get_type_impl`` with its counters."""
        i_layer = self.i_ffn.get(category, 0)
        if self.facts.n_expert > 1 and category in self.i_ffn:
            i_layer = layer_of(name)    # layer_info: MoE layers come from the name
        site = Site(self.facts, nx, self.i_wv, self.n_wv, i_layer)
        new_type = impl_type(self.mixture, name, site, self.overrides.output_type)
        if category in ATTN_V_LIKE:
            self.i_wv += 1
        if category in self.i_ffn:
            self.i_ffn[category] += 1
        return new_type


def plan_types(mixture: Mixture, facts: ModelFacts, shapes: Mapping[str, tuple[int, ...]],
               overrides: TypeOverrides | None = None) -> dict[str, T]:
    """Types of every quantizable tensor of a model (``{gguf name: numpy shape}``), planned in weights_map
    order: what exporters use when counters matter (overrides, MoE)."""
    order = weights_map_order(shapes)
    planner = TypePlanner(mixture, facts, order, overrides)
    leave = overrides is not None and overrides.leave_output
    return {n: planner.tensor_type(n, shapes[n]) for n in order if allows_quantization(n, len(shapes[n]), leave)}


def stateless_type(mixture: Mixture, facts: ModelFacts, name: str, shape: tuple[int, ...],
                   source_type: T = T.F32) -> T:
    """The same choice without a planner, for dense models (one attn_v and one ffn_* per layer).

    There weights_map order visits layers in order, so the counters equal the layer index and
    n_attention_wv equals n_layer.
    """
    planner = TypePlanner(mixture, facts, ())
    planner.n_wv = facts.n_layer
    layer = max(layer_of(name), 0)
    planner.i_wv = layer
    planner.i_ffn = {k: layer for k in planner.i_ffn}
    return planner.tensor_type(name, shape, source_type)
