"""Regenerate the bundled example's dataset and tokenizer (run once; the outputs are committed).

    .venv/bin/python -m llmforge.trainer.example.make_files

The tokenizer is a small byte-level BPE trained with the ``tokenizers`` library on the dataset, with GPT-2's
pre-tokenizer (so llama.cpp's ``gpt-2`` pre-tokenizer applies) and ChatML special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("India", "New Delhi"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
    ("Mexico", "Mexico City"),
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def dataset_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                          {"role": "assistant", "content": f"The capital of {country} is {city}."}]}
            for country, city in CAPITALS]


def write_dataset() -> None:
    lines = [json.dumps(row) for row in dataset_rows()]
    (HERE / "data.jsonl").write_text("\n".join(lines) + "\n")


def write_bpe_tokenizer(folder: Path, corpus: list[str], vocab_size: int, special: list[str], config: dict) -> None:
    """A byte-level BPE with GPT-2's pre-tokenizer trained on ``corpus`` (``special`` tokens first), saved in
    ``folder`` with ``config`` as its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_tokenizer() -> None:
    corpus = [m["content"] for row in dataset_rows() for m in row["messages"]] * 4
    corpus += ["user", "assistant", "system", "The quick brown fox jumps over the lazy dog. 0123456789"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "model_max_length": 512,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    write_bpe_tokenizer(HERE / "tokenizer", corpus, 512, SPECIAL, config)


if __name__ == "__main__":
    write_dataset()
    write_tokenizer()
