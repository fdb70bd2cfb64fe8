"""Vision-language LoRA SFT, Qwen2.5-VL and Qwen2-VL: the bundled colour example on a tiny model of each, then
adapter -> GGUF (every test runs for both versions).

Oracles: the labels (only the assistant reply; never an image token); the loss on the bundled example (falls
by > 4x in 40 CPU steps: ~14 -> ~2); PEFT's ``merge_and_unload()`` in transformers against llama.cpp's multimodal
runtime on the text GGUF + mmproj written by ``llmforge convert adapter/`` (last-position logits, f32, relative
error < 2e-3; greedy replies identical); the reply's form through llama.cpp ("The square is ..." for most images).

Unlike the tiny Gemma 3, this tiny Qwen2.5-VL does not learn *which* colour in 40 CPU steps (it answers one colour
for every image; loss plateaus near 2): its vocabulary is Qwen2's 151,936 tokens against frozen tied 64-wide
embeddings, so a reply token's margin over the random rest is small. Tried: lr 0.005-0.02, r 16-64, 80 steps,
embedding std 0.05-0.4.

The patch merger trains too (``lora.modules_to_save: [merger]``, the example's projector setting for this
architecture), so the merged mmproj carries trained weights.

The same adapter then goes through ``llmforge merge`` (a folder under the names transformers saves Qwen2.5-VL
with, converting to the same text GGUF and mmproj tensor bytes as the adapter) and ``ship`` to the fake Ollama
server (the projector is sent and the Modelfile's second FROM names it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.export.convert import convert
from llmforge.export.vision import mmproj_path
from llmforge.trainer.config import load_config
from llmforge.trainer.vision_example import CONFIG_PATH, DATA_PATH, IMAGES_DIR
from vision_qwen_model import build_qwen_vlm, processor

PROMPT = "<|im_start|>user\n{marker}What colour is the square?<|im_end|>\n<|im_start|>assistant\n"
STEPS = 40


# version -> (transformers class name, llmforge's vision spec name)
VERSIONS = {"2.5": ("Qwen2_5_VLForConditionalGeneration", "QWEN25VL"), "2": ("Qwen2VLForConditionalGeneration", "QWEN2VL")}


@pytest.fixture(scope="module", params=list(VERSIONS), ids=lambda v: f"qwen{v}-vl")
def base_dir(request, tmp_path_factory) -> Path:
    path = build_qwen_vlm(tmp_path_factory.mktemp("qwen-vlm-base") / "tiny-qwen-vlm", version=request.param)
    path.joinpath(".version").write_text(request.param)
    return path


def model_class(base_dir: Path):
    import transformers

    return getattr(transformers, VERSIONS[base_dir.joinpath(".version").read_text()][0])


def vision_spec(base_dir: Path):
    from llmforge.export import vision

    return getattr(vision, VERSIONS[base_dir.joinpath(".version").read_text()][1])


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    import transformers

    from llmforge.trainer.run import train

    out = tmp_path_factory.mktemp("qwen-vlm-train")
    config = load_config(CONFIG_PATH, [f"model.path={base_dir}", f"train.output_dir={out}",
                                       "lora.modules_to_save=[merger]", f"train.max_steps={STEPS}", "train.lr=0.01"])
    with pytest.MonkeyPatch.context() as mp:   # see vision_qwen_model.processor
        mp.setattr(transformers.AutoProcessor, "from_pretrained", lambda path, **kw: processor(path))
        return train(config)


def test_labels_cover_only_the_reply(base_dir):
    from llmforge.trainer.data import load_examples
    from llmforge.trainer.vision import collate_vision, encode_vision_all

    proc = processor(base_dir)
    tok = proc.tokenizer
    _, examples = load_examples(DATA_PATH)
    rows, stats = encode_vision_all(examples, proc, tok.chat_template, 128, DATA_PATH.parent,
                                      spec=vision_spec(base_dir))
    assert stats.examples == len(examples) == 12
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    for row, example in zip(rows, examples):
        reply = example.messages[-1]["content"][0]["text"]
        trained_ids = [i for i, label in zip(row.input_ids, row.labels) if label != -100]
        assert tok.decode(trained_ids) == reply + "<|im_end|>"
        # 8x8 patches of 3*2*4*4 values, merged 2x2 into 16 image tokens
        assert row.input_ids.count(image_token) == 16 and row.pixel_values.shape == (64, 96)
        assert row.image_inputs["image_grid_thw"].tolist() == [[1, 8, 8]] and row.n_images == 1
        assert all(t == (i == image_token) for i, t in zip(row.input_ids, row.token_type_ids))
    batch = collate_vision(rows[:3], tok.pad_token_id, __import__("torch").device("cpu"))
    assert batch["pixel_values"].shape == (192, 96) and batch["image_grid_thw"].shape == (3, 3)
    assert "mm_token_type_ids" in batch and "token_type_ids" not in batch


def test_loss_falls_and_only_the_language_model_is_adapted(trained):
    assert trained.steps == STEPS
    assert trained.kernels and f"kernels: {trained.kernels}" in trained.summary_lines()  # asked for, as in SFT
    assert trained.last_loss < trained.first_loss / 4, trained.losses
    from safetensors import safe_open

    with safe_open(trained.adapter_dir / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
    lora = [k for k in keys if ".lora_" in k]
    assert lora and all(".language_model." in k for k in lora)
    assert {k for k in keys if ".lora_" not in k} and all(".visual.merger." in k for k in keys if ".lora_" not in k)


def test_adapter_gguf_runs_like_the_peft_merge(trained, base_dir, tmp_path):
    import numpy as np
    import torch
    from llama_cpp import mtmd_cpp
    from peft import PeftModel
    from vision_mtmd import generate_in, mtmd_session, rgb_pixels

    text = tmp_path / "tuned-f32.gguf"
    report = convert(trained.adapter_dir, text, "f32")
    proj = mmproj_path(text)
    assert proj.is_file() and any("mmproj: wrote" in c for c in report.checks)

    base = model_class(base_dir).from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    merged = PeftModel.from_pretrained(base, trained.adapter_dir).merge_and_unload().eval()
    proc = processor(base_dir)
    marker = mtmd_cpp.mtmd_default_marker().decode()
    with mtmd_session(text, proj) as session:
        answers = {image: generate_in(session, PROMPT.format(marker=marker), [rgb_pixels(image)], 6)
                   for image in sorted(IMAGES_DIR.glob("*.png"))}
    for n, (image, (_, last, new)) in enumerate(answers.items()):
        if n % 4:   # logits and greedy replies against the PEFT merge on three images
            continue
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "What colour is the square?"}]}]
        inputs = proc(text=[proc.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False)],
                      images=[rgb_pixels(image)], return_tensors="pt")
        with torch.no_grad():
            reference = merged(**inputs).logits[0, -1].numpy()
            greedy = merged.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert np.abs(last - reference).max() / np.abs(reference).max() < 2e-3
        greedy = greedy.tolist()   # transformers stops at the end-of-turn token; llama.cpp's loop runs 6 tokens
        stops = merged.generation_config.eos_token_id
        stops = set(stops) if isinstance(stops, list) else {stops}
        assert new[:len(greedy)] == greedy and (len(greedy) == len(new) or greedy[-1] in stops), (new, greedy)
    # the reply's form is learned (which colour is not: see the module docstring)
    replies = {image.stem: proc.tokenizer.decode(new) for image, (_, _, new) in answers.items()}
    assert sum(r.startswith("The square is") for r in replies.values()) >= 8, replies


def test_merge_writes_a_published_layout_folder_that_converts_like_the_adapter(trained, base_dir, tmp_path):
    import torch
    from safetensors import safe_open

    from vision_checks import assert_merge_converts_like_the_adapter

    from llmforge.export.merge import merge_to_hf

    merged_dir = tmp_path / "merged"
    merge_to_hf(trained.adapter_dir, merged_dir, dtype="f32", progress=False)
    assert (merged_dir / "preprocessor_config.json").is_file()
    # the names transformers saves a Qwen2.5-VL under (visual.*, model.*; tied: no lm_head), as in the base folder
    names, merger = {}, {}
    for folder in (merged_dir, base_dir):
        with safe_open(folder / "model.safetensors", "np") as f:
            names[folder], merger[folder] = set(f.keys()), f.get_tensor("visual.merger.mlp.0.weight")
    assert names[merged_dir] == names[base_dir]
    assert {n.split(".")[0] for n in names[merged_dir]} == {"model", "visual"}
    assert not any(n.startswith(("model.visual.", "model.language_model.")) for n in names[merged_dir])
    assert not (merger[merged_dir] == merger[base_dir]).all()   # the trained merger (modules_to_save)
    _, info = model_class(base_dir).from_pretrained(merged_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_merge_converts_like_the_adapter(merged_dir, trained.adapter_dir, tmp_path)


def test_ship_sends_the_projector_and_the_modelfile_names_it(trained, tmp_path):
    from vision_checks import assert_ship_sends_the_projector

    assert_ship_sends_the_projector(trained.adapter_dir, "tiny-qwen-vision:q8", tmp_path)
