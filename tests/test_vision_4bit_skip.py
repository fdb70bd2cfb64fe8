"""QLoRA on a VLM quantizes the language model only: the skip list handed to bitsandbytes, matched by transformers'
own ``should_convert_module`` against every linear layer of the real model classes, keeps the vision tower and
projector (and lm_head) in 16 bits. (A bare ``vision_tower`` pattern quantized the tower: seen on an H100.)
"""

from __future__ import annotations

import pytest
import torch

from llmforge.export.vision import GEMMA3, QWEN2VL, QWEN25VL
from llmforge.trainer.vision import int8_skip_patterns
from llmforge.trainer.vision_example import model_config as gemma3_config
from vision_qwen_model import model_config as qwen_config

CASES = {"gemma3": (GEMMA3, gemma3_config), "qwen2.5vl": (QWEN25VL, lambda: qwen_config("2.5")),
         "qwen2vl": (QWEN2VL, lambda: qwen_config("2"))}


def linear_names(config) -> list[str]:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("arch", sorted(CASES))
def test_only_the_language_model_is_quantized(arch):
    from transformers.quantizers.quantizers_utils import should_convert_module

    spec, config = CASES[arch]
    names = linear_names(config())
    converted = {name for name in names if should_convert_module(name, int8_skip_patterns(spec))}
    language = {name for name in names if ".language_model." in name}
    assert language and converted == language, sorted(set(names) ^ language)
    # the bare names (the bug) would have quantized the vision side too
    bare = {name for name in names if should_convert_module(name, [*spec.keep_16bit, "lm_head"])}
    assert bare - language
