"""llama.cpp's multimodal runtime (libmtmd through llama-cpp-python) as a test oracle: load a text GGUF with its
mmproj, encode an image, run a prompt with the image through the text model, decode greedily."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from oracles import load_llama

N_CTX = 256


def rgb_pixels(image_path: str | Path) -> np.ndarray:
    """The image as an (H, W, 3) uint8 array (what both runtimes are given)."""
    from PIL import Image

    return np.asarray(Image.open(image_path).convert("RGB"), dtype=np.uint8)


@contextmanager
def mtmd_session(text_gguf: Path, mmproj_gguf: Path):
    """(llama, mtmd, mtmd context) with the projector loaded on the CPU; everything freed on exit."""
    from llama_cpp import mtmd_cpp

    llm = load_llama(text_gguf, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True, type_k=0, type_v=0,
                     verbose=False, n_threads=2, seed=0)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    params.warmup = False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_gguf).encode(), llm.model, params)
    try:
        assert ctx is not None, f"mtmd_init_from_file failed for {mmproj_gguf}"
        yield llm, mtmd_cpp, ctx
    finally:
        if ctx is not None:
            mtmd_cpp.mtmd_free(ctx)
        llm.close()


def _bitmap(mtmd_cpp, pixels: np.ndarray):
    h, w, _ = pixels.shape
    data = np.ascontiguousarray(pixels).tobytes()
    return mtmd_cpp.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))


@contextmanager
def _chunks(mtmd_cpp, ctx, prompt: str, images: list[np.ndarray]):
    bitmaps = [_bitmap(mtmd_cpp, p) for p in images]
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        text = mtmd_cpp.mtmd_input_text()
        raw = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        array = (mtmd_cpp.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        rc = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), array, len(bitmaps))
        assert rc == 0, f"mtmd_tokenize failed ({rc})"
        yield [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            mtmd_cpp.mtmd_bitmap_free(b)


def image_embeddings(text_gguf: Path, mmproj_gguf: Path, pixels: np.ndarray) -> np.ndarray:
    """mtmd's embeddings of one image: (image tokens, text hidden size)."""
    with mtmd_session(text_gguf, mmproj_gguf) as (llm, mtmd_cpp, ctx):
        with _chunks(mtmd_cpp, ctx, mtmd_cpp.mtmd_default_marker().decode(), [pixels]) as chunks:
            image = next(c for c in chunks if mtmd_cpp.mtmd_input_chunk_get_type(c) ==
                         mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            assert mtmd_cpp.mtmd_encode_chunk(ctx, image) == 0
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(image)
            out = mtmd_cpp.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n * llm.n_embd(),)).reshape(n, llm.n_embd()).copy()


def generate(text_gguf: Path, mmproj_gguf: Path, prompt: str, pixels: list[np.ndarray],
             n: int) -> tuple[list[int], np.ndarray, list[int]]:
    """Run ``prompt`` (``mtmd_default_marker()`` where each image goes) and decode ``n`` tokens greedily.
    Returns (the prompt's text token ids by chunk, joined; the last prompt position's logits; the new ids)."""
    with mtmd_session(text_gguf, mmproj_gguf) as session:
        return generate_in(session, prompt, pixels, n)


def generate_in(session, prompt: str, pixels: list[np.ndarray], n: int) -> tuple[list[int], np.ndarray, list[int]]:
    """:func:`generate` in an open :func:`mtmd_session` (the KV cache is reset first)."""
    from llama_cpp import llama_cpp as lc

    llm, mtmd_cpp, ctx = session
    llm.reset()
    llm._ctx.kv_cache_clear()
    text_ids: list[int] = []
    with _chunks(mtmd_cpp, ctx, prompt, pixels) as chunks:
        for chunk in chunks:
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                ids = [ptr[i] for i in range(count.value)]
                text_ids += ids
                llm.eval(ids)
            else:
                new_past = lc.llama_pos(0)
                rc = mtmd_cpp.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, chunk, lc.llama_pos(llm.n_tokens),
                                                           lc.llama_seq_id(0), llm.n_batch, False,
                                                           ctypes.byref(new_past))
                assert rc == 0, f"image chunk failed ({rc})"
                llm.n_tokens = new_past.value
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return text_ids, last, out
