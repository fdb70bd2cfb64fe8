"""The exported vocabulary: llama.cpp tokenizes like the Hugging Face tokenizer; ``pre`` found by hash or regex."""

from __future__ import annotations

import json
import shutil
import tarfile
from functools import lru_cache
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from llmforge.errors import LlmforgeError
from llmforge.export.tokenizer import add_vocab_to_gguf, load_vocab, pre_from_hash, pre_from_regex
from llmforge.export.writer import StreamingGGUFWriter
from oracles import llama_cpp_tokenize_many
from tiny_models import TOKENIZERS

# fixture -> (GGUF vocabulary size as llama.cpp's own vocab file has it, expected tokenizer.ggml.model, pre)
FIXTURES = {
    "llama-bpe": (128256, "gpt2", "llama-bpe"),
    "qwen2": (151936, "gpt2", "qwen2"),
    "gpt-2": (50257, "gpt2", "gpt-2"),
    "command-r": (256000, "gpt2", "command-r"),
    "llama-spm": (32000, "llama", None),
    "phi-3": (32064, "llama", None),
    "gemma-4": (262144, "gemma4", None),
}

TEXTS = [
    "Hello world", " Hello world", "Hello World!", "  leading spaces", "trailing   ", "\n\n\ttabs\tand\nnewlines\n",
    "   \n  \n", "", " ", "numbers 1 12 123 1234 12345 3.14159 1,000,000", "don't I'll we've THEY'RE it's",
    "naïve café résumé Äpfel", "нещо на Български", "我想在apple工作1314151天～", "ကာန်တဲ့ ภาษาไทย 한국어 العربية",
    "emoji 🦙🦙 😶‍🌫️ ✅ 🚀", "code: def f(x):\n    return x**2  # square", "------======= !!!??? ''''''```````",
    "<html><body class=\"a\">text</body></html>", "a" * 50, "The quick brown fox jumps over the lazy dog.",
]


@lru_cache(maxsize=1)
def _llama_cpp_vocab_inputs() -> dict[str, list[str]]:
    from test_export_anchor import find_sdist

    sdist = find_sdist()
    if sdist is None:
        return {}
    out = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if "/models/ggml-vocab-" in member.name and name.endswith(".gguf.inp"):
                text = tar.extractfile(member).read().decode("utf-8")
                out[name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp")] = \
                    text.split("\n__ggml_vocab_test__\n")[:-1]
    return out


def llama_cpp_vocab_tests(fixture: str) -> list[str]:
    """llama.cpp's own tokenizer test inputs (``models/ggml-vocab-<fixture>.gguf.inp`` in the sdist), if present."""
    return _llama_cpp_vocab_inputs().get(fixture, [])


def _special_texts(tok_json: dict) -> list[str]:
    specials = [t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")][:6]
    texts = []
    for i, tok in enumerate(specials):
        texts.append(f"{tok}Hello{specials[(i + 1) % len(specials)]} world")
        texts.append(f"say {tok} now{tok}\n")
    return texts


def write_vocab_gguf(tok_dir: Path, out: Path, vocab_size: int) -> None:
    """A vocabulary-only GGUF (llama hparams, no tensors) that llama.cpp opens with ``vocab_only``."""
    data = load_vocab(tok_dir, vocab_size)
    w = StreamingGGUFWriter("llama")
    w.gguf.add_name(tok_dir.name)  # llama.cpp keys Phi-3's rstrip special tokens on general.name
    for key, value in {"llama.context_length": 256, "llama.embedding_length": 256, "llama.block_count": 1,
                       "llama.feed_forward_length": 512, "llama.attention.head_count": 4}.items():
        w.gguf.add_uint32(key, value)
    w.gguf.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    add_vocab_to_gguf(w.gguf, data)
    w.write(out, lambda t: None, progress=False)


@pytest.fixture(scope="module")
def vocab_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    cache = {}

    def get(fixture: str) -> Path:
        if fixture not in cache:
            out = root / f"{fixture}.gguf"
            write_vocab_gguf(TOKENIZERS / fixture, out, FIXTURES[fixture][0])
            cache[fixture] = out
        return cache[fixture]

    return get


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_llama_cpp_tokenizes_like_hf(fixture, vocab_ggufs):
    from llmforge.export.inspect import inspect_gguf

    path = vocab_ggufs(fixture)
    info = inspect_gguf(path)
    _, model, pre = FIXTURES[fixture]
    assert info["tokenizer"]["model"] == model
    assert info["tokenizer"]["pre"] == pre
    tok_json = json.loads((TOKENIZERS / fixture / "tokenizer.json").read_text())
    hf = Tokenizer.from_file(str(TOKENIZERS / fixture / "tokenizer.json"))
    texts = TEXTS + _special_texts(tok_json) + llama_cpp_vocab_tests(fixture)
    mismatches = []
    for text, got in zip(texts, llama_cpp_tokenize_many(path, texts, special=True)):
        want = hf.encode(text, add_special_tokens=True).ids
        if got != want:
            mismatches.append((text, want, got))
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]}"


def _resave_without_bos(src: Path, dst: Path) -> None:
    """A re-saved tokenizer whose post-processor no longer adds BOS: chktxt's ids (so the hash) change."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                            "use_regex": False}
    (dst / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("fixture", ["llama-bpe", "qwen2", "command-r"])
def test_pre_tokenizer_found_from_regex_when_hash_unknown(fixture, tmp_path):
    src = TOKENIZERS / fixture
    resaved = tmp_path / "tok"
    _resave_without_bos(src, resaved)
    tj = json.loads((resaved / "tokenizer.json").read_text())
    # renamed/re-saved: swap the ids of two tokens the check text uses, so no table entry can match
    from llmforge.export.tokenizer import _vendor

    chk_ids = Tokenizer.from_file(str(resaved / "tokenizer.json")).encode(_vendor("pre_tokenizer_hashes.json")["chktxt"]).ids
    vocab = tj["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = [by_id[i] for i in dict.fromkeys(chk_ids) if i in by_id][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (resaved / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_file(str(resaved / "tokenizer.json"))
    assert pre_from_hash(tok) is None
    assert pre_from_regex(tj) == FIXTURES[fixture][2]
    assert load_vocab(resaved, FIXTURES[fixture][0]).pre == FIXTURES[fixture][2]


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path):
    resaved = tmp_path / "tok"
    _resave_without_bos(TOKENIZERS / "llama-bpe", resaved)
    tj = json.loads((resaved / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    (resaved / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(LlmforgeError, match="unknown BPE pre-tokenizer"):
        load_vocab(resaved, 128256)


def test_special_ids_and_chat_template(vocab_ggufs):
    from llmforge.export.inspect import inspect_gguf

    info = inspect_gguf(vocab_ggufs("llama-bpe"))
    tok = info["tokenizer"]
    assert (tok["bos_id"], tok["eos_id"], tok["eot_id"]) == (128000, 128001, 128009)  # <|eot_id|> = 128009
    assert info["chat_template"] and tok["add_bos"] is True
    info = inspect_gguf(vocab_ggufs("qwen2"))
    hf = Tokenizer.from_file(str(TOKENIZERS / "qwen2" / "tokenizer.json"))
    assert info["tokenizer"]["eot_id"] == hf.token_to_id("<|im_end|>")
    assert info["tokenizer"]["n_tokens"] == 151936  # padded with [PAD] to the GGUF vocabulary size
