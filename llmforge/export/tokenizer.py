"""The tokenizer part of a GGUF: vocabulary, scores, token types, merges, special ids, chat template, ``pre``.

Three vocabulary kinds, recognised from the files (not from the model's architecture):

* byte-level BPE (``tokenizer.json`` with a ByteLevel pre-tokenizer): ``tokenizer.ggml.model = gpt2`` with
  merges and a ``pre`` found from llama.cpp's chktxt hash table or, when the hash is unknown (a re-saved or
  edited tokenizer), from the ``pre_tokenizer`` regexes;
* SentencePiece (``tokenizer.model``): ``llama`` with scores and types;
* Gemma-style BPE over ``▁``-replaced text with byte fallback and no ``tokenizer.model``: ``gemma4``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import sha256
from importlib import resources
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from ..errors import LlmforgeError

# end-of-turn tokens of the chat formats we know (first present wins)
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<turn|>", "<|END_OF_TURN_TOKEN|>")
PAD_SCORE = -1000.0
SPM_UNUSED_SCORE = -10000.0   # llama.cpp's converter: SentencePiece slots no piece fills
# Added tokens llama.cpp's converter types CONTROL even when the tokenizer does not mark them special
# (convert_hf_to_gguf's does_token_look_special: command-r, deepseek-coder, gemma{,-2}, Qwen's FIM tokens).
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
LOOKS_SPECIAL_WRAPS = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))


def added_token_type(text: str, special: bool) -> TokenType:
    """The GGUF type of an added token, as llama.cpp's converter gives it."""
    looks_special = text in LOOKS_SPECIAL or any(text.startswith(a) and text.endswith(b) for a, b in LOOKS_SPECIAL_WRAPS)
    return TokenType.CONTROL if special or looks_special else TokenType.USER_DEFINED
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class VocabData:
    """Everything the writer puts under ``tokenizer.*``."""

    model: str                              # tokenizer.ggml.model
    tokens: list[str]
    scores: list[float] | None
    types: list[int]
    pre: str | None = None                  # tokenizer.ggml.pre (BPE)
    pre_source: str = ""                    # how ``pre`` was found: "hash" or "regex"
    special: gguf.SpecialVocab | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. add_space_prefix

    def summary(self) -> str:
        pre = f", pre={self.pre} (from {self.pre_source})" if self.pre else ""
        return f"tokenizer: {self.model}, {len(self.tokens)} tokens{pre}"


@lru_cache(maxsize=1)
def _vendor(name: str) -> dict:
    return json.loads(resources.files("llmforge.vendor").joinpath(name).read_text(encoding="utf-8"))


def pre_tokenizer_signature(pre_tokenizer: dict | None) -> list[list]:
    """A canonical form of tokenizer.json's ``pre_tokenizer`` (the parts that change the splitting)."""
    if not pre_tokenizer:
        return []
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer["type"] == "Sequence" \
        else [pre_tokenizer]
    out: list[list] = []
    for step in steps:
        kind = step["type"]
        if kind == "Split":
            pattern = step.get("pattern", {})
            out.append(["Split", pattern.get("Regex", pattern.get("String")), step.get("behavior"),
                        bool(step.get("invert"))])
        elif kind == "ByteLevel":
            out.append(["ByteLevel", bool(step.get("use_regex", True))])
        elif kind == "Digits":
            out.append(["Digits", bool(step.get("individual_digits"))])
        else:
            out.append([kind])
    return out


def pre_from_hash(tokenizer) -> str | None:
    """llama.cpp's way: sha256 of the ids of chktxt (special tokens added) against its table."""
    table = _vendor("pre_tokenizer_hashes.json")
    ids = tokenizer.encode(table["chktxt"]).ids
    return table["hashes"].get(sha256(str(ids).encode()).hexdigest())


def pre_from_regex(tokenizer_json: dict) -> str | None:
    """Recognise the pre-tokenizer from its regexes, so a re-saved tokenizer (new hash) still exports."""
    sig = pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    for row in _vendor("pre_tokenizer_regexes.json")["signatures"]:
        if row["pre_tokenizer"] == sig:
            return row["pre"]
    return None


def _is_byte_level(tj: dict) -> bool:
    text = json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
    return '"ByteLevel"' in text


def _normalizer_steps(tj: dict) -> list[str]:
    norm = tj.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return [s.get("type", "") for s in steps if s]


def _load_tokenizer_json(tok_dir: Path) -> tuple[dict, Any]:
    from tokenizers import Tokenizer

    path = tok_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        return tj, Tokenizer.from_file(str(path))
    except (OSError, ValueError, Exception) as exc:  # tokenizers raises plain Exception on bad files
        raise LlmforgeError(f"cannot read {path} ({exc})", hint="re-save the tokenizer with transformers") from exc


def _pad(tokens: list[str], scores: list[float] | None, types: list[int], vocab_size: int, where: Path) -> None:
    if len(tokens) > vocab_size:
        raise LlmforgeError(f"tokenizer in {where} has {len(tokens)} tokens but config.json vocab_size is "
                            f"{vocab_size}", hint="the tokenizer does not belong to this model")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(PAD_SCORE)


def _added_tokens(tj: dict) -> dict[int, dict]:
    return {int(t["id"]): t for t in tj.get("added_tokens", [])}


def _bpe_vocab(tj: dict, tok, vocab_size: int, where: Path) -> VocabData:
    vocab = tok.get_vocab(with_added_tokens=True)
    added = _added_tokens(tj)
    n = max(vocab.values()) + 1 if vocab else 0
    tokens: list[str | None] = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(TokenType.UNUSED)
        elif i in added:
            types.append(added_token_type(text, bool(added[i].get("special"))))
        else:
            types.append(TokenType.NORMAL)
    _pad(tokens, None, types, vocab_size, where)
    pre, how = pre_from_hash(tok), "hash"
    if pre is None:
        pre, how = pre_from_regex(tj), "pre_tokenizer regex"
    if pre is None:
        raise LlmforgeError(f"unknown BPE pre-tokenizer in {where / 'tokenizer.json'}",
                            hint="neither llama.cpp's chktxt hash nor the pre_tokenizer regexes are known")
    return VocabData("gpt2", tokens, None, types, pre=pre, pre_source=how)


def _gemma_bpe_vocab(tj: dict, tok, vocab_size: int, where: Path) -> VocabData:
    """Gemma 3n/4-style BPE (byte fallback over ▁-text): llama.cpp's ``gemma4`` tokenizer model."""
    data = _bpe_vocab_plain(tj, tok)
    _pad(data.tokens, data.scores, data.types, vocab_size, where)
    data.extra["add_space_prefix"] = False
    return data


def _bpe_vocab_plain(tj: dict, tok) -> VocabData:
    vocab = tok.get_vocab(with_added_tokens=True)
    added = _added_tokens(tj)
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif BYTE_TOKEN.fullmatch(text):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return VocabData("gemma4", tokens, [PAD_SCORE] * len(tokens), types)


def _spm_vocab(tok_dir: Path, tj: dict | None, vocab_size: int) -> VocabData:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(tok_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as exc:
        raise LlmforgeError(f"cannot read {tok_dir / 'tokenizer.model'} ({exc})",
                            hint="re-save the tokenizer") from exc
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        kind = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
        types.append(kind)
    # as llama.cpp's converter: added tokens (tokenizer.json's list, else added_tokens.json) override the
    # SentencePiece pieces too, with score -1000; slots no one fills are UNUSED [PADi] at -10000
    added: dict[int, dict] = _added_tokens(tj) if tj else {}
    added_json = tok_dir / "added_tokens.json"
    if not added and added_json.is_file():
        added = {int(i): {"content": t, "special": False} for t, i in json.loads(added_json.read_text()).items()}
    for i in sorted(added):
        if i >= vocab_size:
            continue
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(SPM_UNUSED_SCORE)
            types.append(TokenType.UNUSED)
        text = added[i]["content"]
        kind = added_token_type(text, bool(added[i].get("special")))
        tokens[i] = text if kind == TokenType.CONTROL else text.replace("\u2581", " ")
        scores[i] = PAD_SCORE
        types[i] = kind
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(SPM_UNUSED_SCORE)
        types.append(TokenType.UNUSED)
    _pad(tokens, scores, types, vocab_size, tok_dir)
    return VocabData("llama", tokens, scores, types)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "config.json", "chat_template.jinja", "chat_template.json")
_CACHE: dict[tuple, VocabData] = {}


def load_vocab(tok_dir: Path, vocab_size: int) -> VocabData:
    """Read the tokenizer in ``tok_dir`` into GGUF form, padded to ``vocab_size`` tokens.

    The result is cached per folder (keyed on the tokenizer files' mtimes and sizes): exporting several quant
    types of one model reads a 10^5-token vocabulary once. Treat the returned object as read-only.
    """
    tok_dir = Path(tok_dir).resolve()
    stamp = []
    for name in TOKENIZER_FILES:
        f = tok_dir / name
        stamp.append((name, f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (name,))
    key = (str(tok_dir), vocab_size, tuple(stamp))
    if key not in _CACHE:
        _CACHE.clear()  # one vocabulary at a time: they are large
        _CACHE[key] = _load_vocab(tok_dir, vocab_size)
    return _CACHE[key]


def _load_vocab(tok_dir: Path, vocab_size: int) -> VocabData:
    has_json, has_spm = (tok_dir / "tokenizer.json").is_file(), (tok_dir / "tokenizer.model").is_file()
    if not has_json and not has_spm:
        raise LlmforgeError(f"no tokenizer in {tok_dir} (tokenizer.json or tokenizer.model)",
                            hint="copy the model's tokenizer files into the folder")
    tj, tok = _load_tokenizer_json(tok_dir) if has_json else (None, None)
    if tj is not None and tj.get("model", {}).get("type") == "BPE" and _is_byte_level(tj):
        data = _bpe_vocab(tj, tok, vocab_size, tok_dir)
        load_merges = True
    elif has_spm:
        data = _spm_vocab(tok_dir, tj, vocab_size)
        load_merges = False
    elif tj is not None and tj["model"].get("type") == "BPE" and tj["model"].get("byte_fallback") \
            and "Prepend" not in _normalizer_steps(tj):
        data = _gemma_bpe_vocab(tj, tok, vocab_size, tok_dir)
        load_merges = True
    else:
        raise LlmforgeError(f"unsupported tokenizer in {tok_dir}",
                            hint="llmforge reads byte-level BPE tokenizer.json, SentencePiece tokenizer.model, "
                                 "or Gemma-style BPE")
    merges = _merges(tj) if load_merges else None
    del tj, tok  # ~100 MB of parsed JSON and Rust tokenizer: gone before SpecialVocab parses the file again
    data.special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=len(data.tokens))
    if merges is not None:
        data.special.merges = merges
    if data.model == "gemma4":
        data.special.add_special_token["bos"] = True
    return data


def _merges(tj: dict) -> list[str]:
    """tokenizer.json merges as GGUF wants them ("a b"), from either spelling (strings or pairs)."""
    merges = tj["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):
        return [" ".join(pair) for pair in merges]
    return list(merges)


def eot_id(data: VocabData) -> int | None:
    """The chat end-of-turn token id, from the known end-of-turn strings present in the vocabulary."""
    index = {t: i for i, t in enumerate(data.tokens) if data.types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)}
    for text in EOT_TOKENS:
        if text in index:
            return index[text]
    return None


def add_vocab_to_gguf(w: gguf.GGUFWriter, data: VocabData, *, add_bos: bool | None = None) -> None:
    """Write ``tokenizer.ggml.*`` keys and the chat template."""
    w.add_tokenizer_model(data.model)
    if data.pre:
        w.add_tokenizer_pre(data.pre)
    w.add_token_list(data.tokens)
    if data.scores is not None:
        w.add_token_scores(data.scores)
    w.add_token_types([int(t) for t in data.types])
    if "add_space_prefix" in data.extra:
        w.add_add_space_prefix(data.extra["add_space_prefix"])
    special = data.special
    if special is not None:
        if add_bos is not None:
            special = copy.copy(special)
            special.add_special_token = {**special.add_special_token, "bos": add_bos}
        special.add_to_gguf(w, quiet=True)
    eot = eot_id(data)
    if eot is not None:
        w.add_eot_token_id(eot)
