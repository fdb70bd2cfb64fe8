"""Vision-language export, Qwen2-VL (the Qwen2.5-VL row with LayerNorm/GELU blocks and no window attention;
llama.cpp's ``qwen2vl_merger``): mmproj byte-identical to llama.cpp's converter (f16), text keys, and libmtmd's image
embeddings, logits and greedy tokens against transformers' Qwen2VLForConditionalGeneration (f16, < 2e-3; see
test_vision_qwen_export for the Qwen2.5-VL checks this shares)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.export.convert import convert
from llmforge.export.vision import mmproj_path
from llmforge.trainer.vision_example import IMAGES_DIR
from test_vision_export import rel
from test_vision_qwen_export import QUESTION, anchor, contents, hf_reference, same_tensors  # noqa: F401 (fixture)
from vision_qwen_model import build_qwen_vlm


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, text GGUF, mmproj GGUF) in f16."""
    vlm_dir = build_qwen_vlm(tmp_path_factory.mktemp("tiny-qwen2vl") / "tiny-qwen2vl", version="2")
    text = tmp_path_factory.mktemp("qwen2vl-gguf") / "tiny-qwen2vl-f16.gguf"
    convert(vlm_dir, text, "f16")
    return vlm_dir, text, mmproj_path(text)


def test_same_mmproj_as_llama_cpp_converter(exported, anchor, tmp_path):
    vlm_dir, text, proj = exported
    (our_kvs, our_tensors), (their_kvs, their_tensors) = (
        contents(proj), contents(anchor(vlm_dir, tmp_path / "anchor-mmproj.gguf", "f16", True)))
    same_tensors(our_tensors, their_tensors)
    keys = [k for k in their_kvs if k.startswith("clip.") or k in ("general.architecture", "general.file_type")]
    assert {k: our_kvs.get(k) for k in keys} == {k: their_kvs[k] for k in keys}
    assert not {k for k in our_kvs if k.startswith("clip.")} - set(keys)
    assert our_kvs["clip.projector_type"][1] == "qwen2vl_merger"
    assert "clip.vision.n_wa_pattern" not in our_kvs and "v.blk.0.ln1.bias" in our_tensors
    # Qwen2-VL's converter writes the LM width as the feed-forward length (its vision hidden_size)
    assert our_kvs["clip.vision.feed_forward_length"][1] == 64 and our_kvs["clip.vision.embedding_length"][1] == 32
    text_kvs = contents(text)[0]
    assert text_kvs["general.architecture"][1] == "qwen2vl"
    assert text_kvs["qwen2vl.rope.dimension_sections"][1] == [4, 6, 6, 0]


def test_llama_cpp_runs_the_image_prompt_like_transformers(exported):
    from llama_cpp import mtmd_cpp

    from vision_mtmd import generate, image_embeddings, rgb_pixels

    vlm_dir, text, proj = exported
    image = IMAGES_DIR / "green_0.png"
    ids, features, logits, greedy, image_token = hf_reference(vlm_dir, image, 8)
    embeddings = image_embeddings(text, proj, rgb_pixels(image))
    assert embeddings.shape == features.shape == (16, 64)
    assert rel(embeddings, features) < 2e-3
    marker = mtmd_cpp.mtmd_default_marker().decode()
    prompt = f"<|im_start|>user\n{marker}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    text_ids, last, new = generate(text, proj, prompt, [rgb_pixels(image)], 8)
    assert text_ids == [i for i in ids if i != image_token]
    assert rel(last, logits) < 2e-3
    assert new == greedy


def test_lora_only_adapter_of_the_text_gguf_runs_in_llama_cpp_like_the_merge(exported, tmp_path):
    """``--lora-only`` on a Qwen2-VL adapter: the same check as for Qwen2.5-VL (f32 base text GGUF)."""
    from transformers import Qwen2VLForConditionalGeneration

    from test_vision_qwen_export import QWEN_IDS
    from vision_checks import assert_lora_only_runs_like_the_merge, random_adapter

    vlm_dir = exported[0]
    base = tmp_path / "base-f32.gguf"
    convert(vlm_dir, base, "f32")
    adapter = random_adapter(Qwen2VLForConditionalGeneration, vlm_dir, tmp_path / "adapter", seed=8)
    assert_lora_only_runs_like_the_merge(adapter, base, "qwen2vl", QWEN_IDS, tmp_path)
