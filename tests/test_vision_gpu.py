"""Vision-language LoRA/QLoRA on CUDA: the bundled vision example in bf16 and in 4-bit NF4 (vision tower and
projector kept 16-bit), then adapter -> q8_0 GGUF + mmproj and the learned colours through llama.cpp (CPU).

Skipped without CUDA. On a GPU machine: `python3 -m pytest -q -s tests/test_vision_gpu.py`; a summary goes to
``$OUT/vision_gpu.txt`` when ``OUT`` is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("PIL")

PROMPT = "<start_of_turn>user\n\n\n{marker}\n\nWhat colour is the square?<end_of_turn>\n<start_of_turn>model\n"


def record(line: str) -> None:
    print(line)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "vision_gpu.txt", "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from llmforge.trainer.vision_example import build_base_model

    return build_base_model(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


def learned_colours(adapter_dir: Path, out: Path) -> int:
    from llama_cpp import mtmd_cpp

    from llmforge.export.convert import convert
    from llmforge.export.vision import mmproj_path
    from llmforge.trainer.vision_example import IMAGES_DIR
    from vision_mtmd import generate_in, mtmd_session, rgb_pixels

    text = out / "tuned-q8_0.gguf"
    convert(adapter_dir, text, "q8_0", backend="cpu")
    marker = mtmd_cpp.mtmd_default_marker().decode()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    correct = 0
    with mtmd_session(text, mmproj_path(text)) as session:
        for image in sorted(IMAGES_DIR.glob("*.png")):
            _, _, new = generate_in(session, PROMPT.format(marker=marker), [rgb_pixels(image)], 6)
            correct += tok.decode(new).startswith(f"The square is {image.stem.split('_')[0]}.")
    return correct


@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "nf4"])
def test_vision_lora_on_cuda(four_bit, base, tmp_path):
    from llmforge.trainer.config import load_config
    from llmforge.trainer.run import train
    from llmforge.trainer.vision_example import CONFIG_PATH

    config = load_config(CONFIG_PATH, [f"model.path={base}", f"train.output_dir={tmp_path / 'out'}",
                                       f"model.load_in_4bit={str(four_bit).lower()}", "model.dtype=auto",
                                       "train.threads=0"])
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    correct = learned_colours(result.adapter_dir, tmp_path)
    record(f"vision {'nf4' if four_bit else 'bf16'} on {torch.cuda.get_device_name()}: loss "
           f"{result.first_loss:.3f} -> {result.last_loss:.3f} in {result.steps} steps, {seconds:.1f} s, peak "
           f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; colours through llama.cpp {correct}/12")
    assert result.last_loss < result.first_loss / 10, result.losses
    assert "on gemma3 (language model model.language_model)" in result.kernels, result.kernels
    assert correct >= 9


def test_nf4_keeps_the_vision_tower_16_bit(base):
    from llmforge.trainer.vision import load_vision_model

    model, _ = load_vision_model(base, load_in_4bit=True, dtype="auto", max_seq_length=128)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "Linear"
