"""Vision-language export, Qwen2.5-VL: ``llmforge convert`` writes the text GGUF (llama.cpp's ``qwen2vl``
architecture, M-RoPE) and the mmproj (``clip``, projector ``qwen2.5vl_merger``).

Oracles: llama.cpp's own ``convert_hf_to_gguf.py`` on the same tiny model (tensor names, shapes, types, bytes;
``clip.*`` and ``qwen2vl.*`` keys); libmtmd running an image prompt against transformers'
Qwen2_5_VLForConditionalGeneration on the same image and tokens -- the image's M-RoPE positions (time, row,
column of each merged patch, text resuming after the image's largest side) are llama.cpp's on the text side.

Tolerances (relative to the reference's largest magnitude): image embeddings and last-position logits < 2e-3
for f32/f16 (f16 weights; ggml's CPU SiLU/GELU tables), < 5e-2 for q8_0; greedy tokens identical for f32/f16.
The 32x32 example image is 4x4 merged patches, inside one 112-pixel attention window; a 128x128 image (16x16
merged patches, four uneven windows) checks llama.cpp's window attention against transformers' (f32, < 2e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmforge.export.convert import convert
from llmforge.export.vision import mmproj_path
from llmforge.trainer.vision_example import IMAGES_DIR
from test_export_anchor import extract_converter
from test_vision_export import rel
from vision_qwen_model import build_qwen_vlm, image_processor

QUESTION = "What colour is the square?"
IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return build_qwen_vlm(tmp_path_factory.mktemp("tiny-qwen25vl") / "tiny-qwen-vlm")


@pytest.fixture(scope="module")
def exported(vlm_dir, tmp_path_factory):
    """quant -> (text GGUF, mmproj GGUF), converted once per quant."""
    out_dir, made = tmp_path_factory.mktemp("qwen-vlm-gguf"), {}

    def get(quant: str) -> tuple[Path, Path]:
        if quant not in made:
            text = out_dir / f"tiny-qwen-vlm-{quant}.gguf"
            convert(vlm_dir, text, quant)
            made[quant] = (text, mmproj_path(text))
        return made[quant]

    return get


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    """llama.cpp's converter (the Qwen2 fixture vocabulary's pre-tokenizer hash is one it knows)."""
    root = tmp_path_factory.mktemp("llama.cpp")
    script = extract_converter(root)

    def run(model_dir: Path, out: Path, quant: str, mmproj: bool) -> Path:
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        args = [sys.executable, str(script), str(model_dir), "--outtype", quant, "--outfile", str(out)]
        proc = subprocess.run(args + (["--mmproj"] if mmproj else []), env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out

    return run


def contents(path: Path) -> tuple[dict, dict]:
    """test_vision_export.gguf_contents without the tokenizer's arrays (150k-entry vocabularies are slow to read back; the
    tokenizer export has its own tests)."""
    import gguf

    reader = gguf.GGUFReader(path)
    kvs = {k: (f.types[0].name if f.types else None, f.contents()) for k, f in reader.fields.items()
           if not k.startswith(("GGUF.", "tokenizer.ggml."))}
    tensors = {t.name: (t.shape.tolist(), t.tensor_type.name, t.data.tobytes()) for t in reader.tensors}
    return kvs, tensors


def same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, (shape, qtype, data) in theirs.items():
        assert ours[name][:2] == (shape, qtype), name
        assert ours[name][2] == data, f"{name}: bytes differ"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_same_mmproj_as_llama_cpp_converter(quant, vlm_dir, exported, anchor, tmp_path):
    """f16 and q8_0: the patch embedding is F16 in f16 files only, F32 otherwise."""
    proj = exported(quant)[1]
    (our_kvs, our_tensors), (their_kvs, their_tensors) = (
        contents(proj), contents(anchor(vlm_dir, tmp_path / "anchor-mmproj.gguf", quant, True)))
    same_tensors(our_tensors, their_tensors)
    keys = [k for k in their_kvs if k.startswith("clip.") or k in (
        "general.architecture", "general.type", "general.file_type", "general.quantization_version")]
    assert {k: our_kvs.get(k) for k in keys} == {k: their_kvs[k] for k in keys}
    assert not {k for k in our_kvs if k.startswith("clip.")} - set(keys)
    assert our_kvs["clip.projector_type"][1] == "qwen2.5vl_merger"
    assert our_kvs["clip.vision.n_wa_pattern"][1] == 2
    assert our_tensors["v.patch_embd.weight"][1] == {"f16": "F16", "q8_0": "F32"}[quant]
    # the Conv3D's second frame and the split q/k/v
    assert {"v.patch_embd.weight.1", "v.blk.2.attn_q.bias", "v.blk.2.attn_v.weight", "mm.2.weight"} <= \
        set(our_tensors)


def test_same_text_model_as_llama_cpp_converter(vlm_dir, exported, anchor, tmp_path):
    """q8_0 (the text half goes through the text converter: other quants are the text tests' business)."""
    text = exported("q8_0")[0]
    (our_kvs, our_tensors), (their_kvs, their_tensors) = (
        contents(text), contents(anchor(vlm_dir, tmp_path / "anchor-text.gguf", "q8_0", False)))
    same_tensors(our_tensors, their_tensors)
    assert our_kvs["general.architecture"] == their_kvs["general.architecture"] == ("STRING", "qwen2vl")
    arch_keys = [k for k in their_kvs if k.startswith("qwen2vl.")]
    assert {k: our_kvs.get(k) for k in arch_keys} == {k: their_kvs[k] for k in arch_keys}
    assert our_kvs["qwen2vl.rope.dimension_sections"][1] == [4, 6, 6, 0]


@pytest.fixture(scope="module")
def reference(vlm_dir):
    """transformers' answer for the blue example image, computed once for every quant."""
    return hf_reference(vlm_dir, IMAGES_DIR / "blue_1.png", 8)


def hf_reference(vlm_dir: Path, image: Path, n: int):
    """transformers (Qwen2.5-VL or Qwen2-VL): (input ids, image features, last-position logits, n greedy ids,
    image token id)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from vision_mtmd import rgb_pixels

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    pixels = image_processor()(images=[rgb_pixels(image)], return_tensors="pt")
    n_image = int(pixels["image_grid_thw"].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt.replace(IMAGE_PAD, IMAGE_PAD * n_image), return_tensors="pt")["input_ids"]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_token).long(),
                  **pixels)
    with torch.no_grad():
        features = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output[0]
        logits = model(**inputs).logits[0, -1]
        greedy = model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    return ids[0].tolist(), features.numpy(), logits.numpy(), greedy.tolist(), image_token


@pytest.mark.parametrize("quant,tol", [("f32", 2e-3), ("f16", 2e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_image_prompt_like_transformers(quant, tol, exported, reference):
    from llama_cpp import mtmd_cpp

    from vision_mtmd import generate, image_embeddings, rgb_pixels

    text, proj = exported(quant)
    image = IMAGES_DIR / "blue_1.png"
    ids, features, logits, greedy, image_token = reference
    embeddings = image_embeddings(text, proj, rgb_pixels(image))
    assert embeddings.shape == features.shape == (16, 64)
    assert rel(embeddings, features) < tol
    # mtmd writes <|vision_start|> and <|vision_end|> around the image itself
    marker = mtmd_cpp.mtmd_default_marker().decode()
    prompt = f"<|im_start|>user\n{marker}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    text_ids, last, new = generate(text, proj, prompt, [rgb_pixels(image)], 8)
    assert text_ids == [i for i in ids if i != image_token]
    assert rel(last, logits) < tol
    if quant != "q8_0":
        assert new == greedy


def test_window_attention_matches_transformers(vlm_dir, exported):
    """A 128x128 image: 16x16 merged patches in 112-pixel windows (14x14, 14x2, 2x14, 2x2 merged patches), so
    blocks 0 and 2 attend within windows and block 1 over the image; libmtmd's embeddings vs transformers', f32."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vision_mtmd import image_embeddings

    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    inputs = image_processor()(images=[pixels], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        # the windows matter here: the same tower with full attention in every block answers differently
        model.model.visual.fullatt_block_indexes = [0, 1, 2]
        full = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    assert rel(full.numpy(), features.numpy()) > 1e-2
    embeddings = image_embeddings(*exported("f32"), pixels)
    assert embeddings.shape == features.shape == (256, 64)
    assert rel(embeddings, features.numpy()) < 2e-3


QWEN_IDS = [9707, 11, 1879, 0, 576, 264, 1273, 315, 279, 3974]


def test_lora_only_adapter_of_the_text_gguf_runs_in_llama_cpp_like_the_merge(vlm_dir, exported, tmp_path):
    """``--lora-only`` on a Qwen2.5-VL adapter (LoRA on the language model's projections, biased Q/K/V included): a
    GGUF LoRA adapter of the ``qwen2vl`` text GGUF; llama.cpp applying it gives the merged text GGUF's logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vision_checks import assert_lora_only_runs_like_the_merge, random_adapter

    adapter = random_adapter(Qwen2_5_VLForConditionalGeneration, vlm_dir, tmp_path / "adapter", seed=7)
    assert_lora_only_runs_like_the_merge(adapter, exported("f32")[0], "qwen2vl", QWEN_IDS, tmp_path)
