"""Test oracles: llama.cpp (through llama-cpp-python) and transformers, on the same token ids.

``rel_error(a, b)`` is max |a - b| / max |b|: the largest absolute difference relative to the largest
magnitude of the reference ``b`` (a single scale for the whole logits matrix).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

N_CTX = 256


def _llama(gguf_path: str | Path, vocab_only: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                 type_k=0, type_v=0, verbose=False, n_threads=2, vocab_only=vocab_only, seed=0)


def llama_cpp_logits(gguf_path: str | Path, token_ids: list[int]) -> np.ndarray:
    """Logits [n_tokens, vocab] from llama.cpp with an f32 KV cache."""
    llm = _llama(gguf_path)
    try:
        llm.reset()
        llm.eval(list(token_ids))
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
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
