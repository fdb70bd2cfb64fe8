"""Regenerate the bundled vision example's images, dataset and tokenizer (run once; the outputs are committed).

    .venv/bin/python -m llmforge.trainer.vision_example.make_files

Images: 32x32 PNGs, a coloured square on a grey background (two sizes/positions per colour). Rows ask for the
colour in the HF processor's chat format (``{"type": "image", "image": path}``); the answer is the colour name.
The tokenizer is a small byte-level BPE with GPT-2's pre-tokenizer and Gemma 3's special tokens (turns, image
markers), so the tiny model is a Gemma 3 vision-language model as llama.cpp and transformers know it.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
           "purple": (140, 40, 170), "white": (250, 250, 250)}
# (left, top, size) of the square, one image per colour each
PLACEMENTS = [(4, 4, 24), (10, 12, 16)]
IMAGE_SIZE = 32
QUESTIONS = ["What colour is the square?", "Which colour is shown?"]

# Gemma 3's special tokens, in Gemma's id order for the first three
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>"]

# Gemma 3's chat template (system text folded into the first user turn, list contents with image parts)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def image_name(colour: str, index: int) -> str:
    return f"{colour}_{index}.png"


def write_images() -> None:
    from PIL import Image

    folder = HERE / "images"
    folder.mkdir(exist_ok=True)
    for colour, rgb in COLOURS.items():
        for i, (left, top, size) in enumerate(PLACEMENTS):
            img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (110, 110, 110))
            img.paste(rgb, (left, top, left + size, top + size))
            img.save(folder / image_name(colour, i), optimize=True)


def dataset_rows() -> list[dict]:
    """Rows with image paths relative to the dataset file."""
    rows = []
    for colour in COLOURS:
        for i in range(len(PLACEMENTS)):
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": f"images/{image_name(colour, i)}"},
                                             {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"The square is {colour}."}]},
            ]})
    return rows


def write_dataset() -> None:
    (HERE / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in dataset_rows()))


def write_tokenizer() -> None:
    from ..example.make_files import write_bpe_tokenizer

    corpus = [f"The square is {c}." for c in COLOURS] * 4 + QUESTIONS * 4
    corpus += ["user", "model", "system", "The quick brown fox jumps over the lazy dog. 0123456789"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False, "model_max_length": 512,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"},
    }
    write_bpe_tokenizer(HERE / "tokenizer", corpus, 384, SPECIAL, config)


if __name__ == "__main__":
    write_images()
    write_dataset()
    write_tokenizer()
