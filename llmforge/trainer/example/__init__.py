"""The bundled example: a tiny Llama built from a config on the shipped tokenizer, taught to answer
"What is the capital of X?" with "The capital of X is Y." (checkable by greedy decoding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "config.yaml"
DATA_PATH = HERE / "data.jsonl"
TOKENIZER_DIR = HERE / "tokenizer"

MODEL_CONFIG = dict(
    model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
    initializer_range=0.1,
)


def build_base_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the example's random-initialised base model and tokenizer to ``out_dir`` (a HF folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = dict(MODEL_CONFIG)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


def demo_pairs() -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer) for every bundled conversation."""
    pairs = []
    for line in DATA_PATH.read_text().splitlines():
        messages = json.loads(line)["messages"]
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs
