"""Test oracles: llama.cpp (through llama-cpp-python) and transformers, on the same token ids.

``rel_error(a, b)`` is max |a - b| / max |b|: the largest absolute difference relative to the largest
magnitude of the reference ``b`` (a single scale for the whole logits matrix).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

N_CTX = 256


def load_llama(gguf_path: str | Path, **kwargs):
    """A ``llama_cpp.Llama`` without the CPU "extra" buffer types.

    llama.cpp repacks quantized weights into AMX/AVX-512 layouts when the CPU reports AMX; in VMs that do not
    grant AMX tile state this dies with a general-protection fault in libggml-cpu (seen here for Q4_0/Q8_0
    files, llama.cpp's own included). Plain CPU buffers compute the same model; ``Llama`` exposes no option
    for it, so the default model params are wrapped while it is built.
    """
    import llama_cpp
    from llama_cpp import llama as llama_module

    original = llama_cpp.llama_model_default_params

    def params_without_extra_bufts():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = params_without_extra_bufts
    try:
        return llama_module.Llama(model_path=str(gguf_path), **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def _llama(gguf_path: str | Path, vocab_only: bool = False):
    return load_llama(gguf_path, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True, type_k=0,
                      type_v=0, verbose=False, n_threads=2, vocab_only=vocab_only, seed=0)


def llama_cpp_logits(gguf_path: str | Path, token_ids: list[int]) -> np.ndarray:
    """Logits [n_tokens, vocab] from llama.cpp with an f32 KV cache."""
    llm = _llama(gguf_path)
    try:
        llm.reset()
        llm.eval(list(token_ids))
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_logits_and_greedy(gguf_path: str | Path, token_ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Both of the below with one model load (a 256k vocabulary takes seconds to load)."""
    llm = _llama(gguf_path)
    try:
        llm.reset()
        llm.eval(list(token_ids))
        logits = np.array(llm.scores[: len(token_ids)], dtype=np.float32)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return logits, out
    finally:
        llm.close()


def llama_cpp_greedy(gguf_path: str | Path, token_ids: list[int], n: int) -> list[int]:
    """``n`` greedily decoded token ids after ``token_ids`` (argmax of llama.cpp's logits)."""
    llm = _llama(gguf_path)
    try:
        llm.reset()
        ids = list(token_ids)
        llm.eval(ids)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return out
    finally:
        llm.close()


def llama_cpp_tokenize(gguf_path: str | Path, text: str, special: bool = True, add_bos: bool = True) -> list[int]:
    """llama.cpp's tokenization of ``text`` (``special``: parse special tokens in the text)."""
    llm = _llama(gguf_path, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
    finally:
        llm.close()


def llama_cpp_tokenize_many(gguf_path: str | Path, texts: list[str], special: bool = True,
                            add_bos: bool = True) -> list[list[int]]:
    """``llama_cpp_tokenize`` for many texts with one vocabulary load."""
    llm = _llama(gguf_path, vocab_only=True)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=special) for t in texts]
    finally:
        llm.close()


@lru_cache(maxsize=2)
def _hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model_dir: str | Path, token_ids: list[int]) -> np.ndarray:
    """Logits [n_tokens, vocab] from transformers in float32."""
    import torch

    model = _hf_model(str(model_dir))
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)]))
    return out.logits[0].float().numpy()


def hf_greedy(model_dir: str | Path, token_ids: list[int], n: int) -> list[int]:
    """``n`` greedily decoded ids from transformers (full recompute each step: no cache subtleties)."""
    import torch

    model = _hf_model(str(model_dir))
    ids = list(token_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (``b`` is the reference)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 apples, naïve café!"


def sample_ids(model_dir: str | Path, text: str = SAMPLE_TEXT) -> list[int]:
    """Token ids of ``text`` from the model's own tokenizer.json (special tokens added as it says)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids
