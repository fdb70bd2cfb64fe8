"""QLoRA on CUDA: NF4 double-quant loading, gradient checkpointing, LoRA training, adapter saving.

Skipped without CUDA. On a GPU machine: `.venv/bin/python -m pytest -q tests/test_trainer_gpu.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA (bitsandbytes NF4)")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from llmforge.trainer.example import build_base_model

    return build_base_model(tmp_path_factory.mktemp("base") / "model")


def test_nf4_double_quant_loading(base: Path) -> None:
    from llmforge.trainer.load import load_model

    model, tokenizer = load_model(base, load_in_4bit=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_qlora_training_on_the_bundled_example(base: Path, tmp_path: Path, cuda_graphs: bool, capsys) -> None:
    from llmforge.trainer.example import DATA_PATH
    from llmforge.trainer.config import load_config
    from llmforge.trainer.run import train

    config = load_config({"model": {"path": str(base), "load_in_4bit": True, "max_seq_length": 64},
                          "data": {"path": str(DATA_PATH)}, "lora": {"r": 32, "alpha": 64},
                          "train": {"output_dir": str(tmp_path / "out"), "max_steps": 60, "batch_size": 10,
                                    "lr": 0.003, "lr_scheduler": "cosine", "warmup_steps": 5,
                                    "cuda_graphs": cuda_graphs}})
    result = train(config)
    assert result.last_loss < 0.1 * result.first_loss, result.losses
    if cuda_graphs:   # every layer captured once, then replayed: the batches keep one shape
        stats = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("layer graphs:"))
        print(stats)
        assert "replayed backward" in stats and "more than" not in stats and "capture failed" not in stats, stats
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and set(adapter["target_modules"]) >= {"q_proj", "down_proj"}
