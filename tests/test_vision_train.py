"""Vision-language LoRA SFT on the bundled example (tiny Gemma 3, coloured squares), then adapter -> GGUF.

Oracles: the labels token by token (only the assistant reply; never an image token); the loss on the bundled
example (falls by > 10x in 40 CPU steps); PEFT's ``merge_and_unload()`` in transformers against llama.cpp's
multimodal runtime on the merged text GGUF + mmproj written by ``llmforge convert adapter/`` (last-position logits,
relative error < 2e-3 in f32: ggml's CPU GELU is an f16 table, the converter's input projection f16); and the
learned answers through llama.cpp (the colour of every training image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmforge.export.convert import convert
from llmforge.export.vision import mmproj_path
from llmforge.trainer.config import load_config
from llmforge.trainer.run import train
from llmforge.trainer.vision_example import CONFIG_PATH, DATA_PATH, IMAGES_DIR, build_base_model

PROMPT = "<start_of_turn>user\n\n\n{marker}\n\nWhat colour is the square?<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("vlm-base") / "tiny-vlm")


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-train")
    config = load_config(CONFIG_PATH, [f"model.path={base_dir}", f"train.output_dir={out}"])
    return train(config)


def test_labels_cover_only_the_reply(base_dir):
    from transformers import AutoProcessor

    from llmforge.trainer.data import load_examples
    from llmforge.trainer.vision import encode_vision_all

    processor = AutoProcessor.from_pretrained(base_dir)
    _, examples = load_examples(DATA_PATH)
    rows, stats = encode_vision_all(examples, processor, processor.tokenizer.chat_template, 128, DATA_PATH.parent)
    assert stats.examples == len(examples) == 12
    tok = processor.tokenizer
    image_token = tok.convert_tokens_to_ids("<image_soft_token>")
    for row, example in zip(rows, examples):
        reply = example.messages[-1]["content"][0]["text"]
        trained_ids = [i for i, label in zip(row.input_ids, row.labels) if label != -100]
        assert tok.decode(trained_ids) == reply + "<end_of_turn>"
        assert row.input_ids.count(image_token) == 16 and row.pixel_values.shape == (1, 3, 32, 32)
        assert all(t == (i == image_token) for i, t in zip(row.input_ids, row.token_type_ids))


def test_loss_falls_and_only_the_language_model_is_adapted(trained):
    assert trained.steps == 40
    assert trained.kernels and f"kernels: {trained.kernels}" in trained.summary_lines()  # asked for, as in SFT
    assert trained.last_loss < trained.first_loss / 10, trained.losses
    from safetensors import safe_open

    with safe_open(trained.adapter_dir / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
    assert keys and not any("vision_tower" in k for k in keys)
    lora = [k for k in keys if ".lora_" in k]
    assert lora and all(".language_model." in k for k in lora)
    assert sorted(k for k in keys if ".lora_" not in k) == [
        "base_model.model.model.multi_modal_projector.mm_input_projection_weight",
        "base_model.model.model.multi_modal_projector.mm_soft_emb_norm.weight"]


def test_adapter_gguf_runs_like_the_peft_merge_and_learned_the_colours(trained, base_dir, tmp_path):
    import numpy as np
    import torch
    from llama_cpp import mtmd_cpp
    from peft import PeftModel
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    from vision_mtmd import generate_in, mtmd_session, rgb_pixels

    text = tmp_path / "tuned-f32.gguf"
    report = convert(trained.adapter_dir, text, "f32")
    proj = mmproj_path(text)
    assert proj.is_file() and any("mmproj: wrote" in c for c in report.checks)

    base = Gemma3ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    merged = PeftModel.from_pretrained(base, trained.adapter_dir).merge_and_unload().eval()
    processor = AutoProcessor.from_pretrained(base_dir)
    marker = mtmd_cpp.mtmd_default_marker().decode()
    correct = 0
    with mtmd_session(text, proj) as session:
        answers = {image: generate_in(session, PROMPT.format(marker=marker), [rgb_pixels(image)], 6)
                   for image in sorted(IMAGES_DIR.glob("*.png"))}
    for n, (image, (_, last, new)) in enumerate(answers.items()):
        answer = processor.tokenizer.decode(new)
        correct += answer.startswith(f"The square is {image.stem.split('_')[0]}.")
        if n < 2:   # logits against the PEFT merge on two images
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "What colour is the square?"}]}]
            inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                               images=[rgb_pixels(image)], return_tensors="pt")
            with torch.no_grad():
                reference = merged(**inputs).logits[0, -1].numpy()
            assert np.abs(last - reference).max() / np.abs(reference).max() < 2e-3
    assert correct == 12


def test_lora_only_adapter_of_the_text_gguf_runs_in_llama_cpp_like_the_merge(base_dir, tmp_path):
    """``--lora-only`` on a VLM adapter: a GGUF LoRA adapter for the base's text GGUF (gemma3); llama.cpp applying
    it at run time gives the logits of the merged text GGUF (itself checked against PEFT's merge above)."""
    from transformers import Gemma3ForConditionalGeneration

    from vision_checks import assert_lora_only_runs_like_the_merge, random_adapter

    adapter = random_adapter(Gemma3ForConditionalGeneration, base_dir, tmp_path / "adapter")
    base_gguf = tmp_path / "base.gguf"
    convert(base_dir, base_gguf, "f32")
    assert_lora_only_runs_like_the_merge(adapter, base_gguf, "gemma3", [2, 10, 50, 100, 200, 300, 35, 7, 120, 64],
                                         tmp_path)


def test_lora_only_refuses_what_an_adapter_of_the_text_gguf_cannot_carry(trained, base_dir, tmp_path):
    """The bundled example trains the projector (``modules_to_save``); LoRA on the vision tower is not in the text
    model: one error each, nothing written."""
    from llmforge.errors import LlmforgeError

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LlmforgeError, match="whole tensors"):
        convert(trained.adapter_dir, out / "a.gguf", "f16", lora_only=True)
    from transformers import Gemma3ForConditionalGeneration

    from vision_checks import random_adapter

    tower = random_adapter(Gemma3ForConditionalGeneration, base_dir, tmp_path / "tower",
                           r".*vision_tower.*\.(q_proj|k_proj|v_proj)")
    with pytest.raises(LlmforgeError, match="is not part of the text model of gemma3"):
        convert(tower, out / "b.gguf", "f16", lora_only=True)
    assert list(out.iterdir()) == []


def test_missing_image_is_one_error_naming_the_row(base_dir, tmp_path):
    from llmforge.errors import LlmforgeError

    from llmforge.trainer.vision_example import example_rows

    rows = example_rows()[:2]   # absolute image paths
    rows[1]["messages"][0]["content"][0]["image"] = "images/nope.png"   # relative to the new data file
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CONFIG_PATH, [f"model.path={base_dir}", f"data.path={data}",
                                       f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(LlmforgeError, match=r"row 2: cannot read image .*nope\.png"):
        train(config)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + b"cut" * 8, b"just text", None],
                         ids=["corrupt png", "not an image", "a folder"])
def test_unreadable_image_is_one_error_naming_the_row(base_dir, tmp_path, content):
    from llmforge.errors import LlmforgeError
    from llmforge.trainer.vision_example import example_rows

    bad = tmp_path / "bad.png"
    bad.mkdir() if content is None else bad.write_bytes(content)
    rows = example_rows()[:2]
    rows[1]["messages"][0]["content"][0]["image"] = "bad.png"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CONFIG_PATH, [f"model.path={base_dir}", f"data.path={data}",
                                       f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(LlmforgeError, match=r"row 2: cannot read image .*bad\.png"):
        train(config)
    assert not (tmp_path / "out" / "adapter").exists()


def test_an_image_url_is_one_error(base_dir, tmp_path):
    from llmforge.errors import LlmforgeError
    from llmforge.trainer.vision_example import example_rows

    rows = example_rows()[:2]
    rows[0]["messages"][0]["content"][0]["image"] = "https://example.com/red.png"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CONFIG_PATH, [f"model.path={base_dir}", f"data.path={data}",
                                       f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(LlmforgeError, match=r"row 1: image https://example.com/red.png is a URL"):
        train(config)


def test_a_base_without_its_processor_config_or_tokenizer_or_misfit_is_one_error(base_dir, tmp_path):
    from llmforge.errors import LlmforgeError

    base = tmp_path / "base"
    shutil.copytree(base_dir, base, ignore=shutil.ignore_patterns("processor_config.json", "preprocessor_config.json"))
    config = load_config(CONFIG_PATH, [f"model.path={base}", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(LlmforgeError, match="no preprocessor_config.json or processor_config.json in"):
        train(config)
    shutil.rmtree(base)
    shutil.copytree(base_dir, base, ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer.model"))
    with pytest.raises(LlmforgeError, match=f"no tokenizer in {base} "):   # not: install torchvision
        train(config)
    shutil.rmtree(base)
    shutil.copytree(base_dir, base)
    hf_config = json.loads((base / "config.json").read_text())
    del hf_config["vision_config"]["patch_size"]   # transformers' default then misfits the patch embedding
    (base / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(LlmforgeError, match=f"the weights in {base} do not fit its config.json"):
        train(config)


def test_ship_sends_the_projector_and_the_modelfile_names_it(trained, tmp_path):
    from vision_checks import assert_ship_sends_the_projector

    assert_ship_sends_the_projector(trained.adapter_dir, "tiny-vision:q8", tmp_path)


def test_labels_with_two_images_over_two_turns(base_dir):
    """Spans after several image expansions still land on the replies (offsets shift per image)."""
    from transformers import AutoProcessor

    from llmforge.trainer.data import normalise
    from llmforge.trainer.vision import encode_vision_all

    image = lambda colour: {"type": "image", "image": str(IMAGES_DIR / f"{colour}_0.png")}  # noqa: E731
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image("red"), {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "The square is red."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image("blue")]},
                {"role": "assistant", "content": [{"type": "text", "text": "The square is blue."}]}]
    _, examples = normalise([{"messages": messages}])
    processor = AutoProcessor.from_pretrained(base_dir)
    (row,), _ = encode_vision_all(examples, processor, processor.tokenizer.chat_template, 256, DATA_PATH.parent)
    tok = processor.tokenizer
    trained = [i if label != -100 else None for i, label in zip(row.input_ids, row.labels)]
    runs, current = [], []
    for i in trained + [None]:
        if i is None and current:
            runs.append(tok.decode(current))
            current = []
        elif i is not None:
            current.append(i)
    assert runs == ["The square is red.<end_of_turn>", "The square is blue.<end_of_turn>"]
    assert row.pixel_values.shape == (2, 3, 32, 32) and sum(row.token_type_ids) == 32


def test_images_for_a_text_model_are_one_error(tmp_path):
    from llmforge.errors import LlmforgeError
    from llmforge.trainer.example import build_base_model as build_text_model

    text_model = build_text_model(tmp_path / "text-model")
    config = load_config(CONFIG_PATH, [f"model.path={text_model}", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(LlmforgeError, match="row 1 of .* has an image, but .* is not a vision-language model"):
        train(config)
    assert not (tmp_path / "out" / "adapter").exists()


def test_merge_writes_a_published_layout_folder_that_converts_like_the_adapter(trained, tmp_path):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from llmforge.export.merge import merge_to_hf
    from vision_checks import assert_merge_converts_like_the_adapter

    merged_dir = tmp_path / "merged"
    merge_to_hf(trained.adapter_dir, merged_dir, dtype="f32", progress=False)
    assert (merged_dir / "processor_config.json").is_file()
    _, info = Gemma3ForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_merge_converts_like_the_adapter(merged_dir, trained.adapter_dir, tmp_path)
