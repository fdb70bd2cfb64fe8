"""A tiny random Qwen2.5-VL (window-attention vision tower + patch merger + M-RoPE Qwen2 text model) on the Qwen2
fixture tokenizer, built from a config on the CPU.

Sizes: 4-pixel patches merged 2x2 (a 32x32 image is 8x8 patches, 16 image tokens), 3 vision blocks (llama.cpp's
tensor map names ``merger.mlp.2`` only below the block count) with full attention in block 1 (window pattern 2),
widths multiples of 32 for q8_0, M-RoPE sections 4/6/6 of the 32-wide heads' 16 rotary pairs.
"""

from __future__ import annotations

from pathlib import Path

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "qwen2"
PATCH, MERGE = 4, 2
# Qwen2-VL's chat template (images as <|vision_start|><|image_pad|><|vision_end|>), without the default system turn
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_config(version: str = "2.5"):
    """The tiny Qwen2_5_VLConfig (or, for ``version="2"``, Qwen2VLConfig: LayerNorm/GELU blocks without windows)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=151936, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                  fullatt_block_indexes=[1], in_channels=3, initializer_range=0.1)
    config_class = Qwen2_5_VLConfig
    if version == "2":
        config_class = Qwen2VLConfig
        vision = dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3, initializer_range=0.1)
    return config_class(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
                        initializer_range=0.05)


def image_processor():
    """Qwen2-VL's image processor at the tiny sizes: images at native size (sides multiples of 8, 8 to 4096
    image tokens pass through unresized). The PIL backend: the default one and the processor's video half need
    torchvision, which the CPU environment lacks."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = (PATCH * MERGE) ** 2
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    min_pixels=8 * factor, max_pixels=4096 * factor)


def save_processor(out_dir: Path) -> None:
    """The image processor's preprocessor_config.json and the fixture tokenizer with the VL chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    image_processor().save_pretrained(str(out_dir))


def build_qwen_vlm(out_dir: str | Path, seed: int = 0, embed_std: float = 0.2, version: str = "2.5") -> Path:
    """Write the random-initialised tiny Qwen2.5-VL (or Qwen2-VL), tokenizer and processor to ``out_dir``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    model = model_class(model_config(version)).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():   # norms and biases random, so their handling is exercised
            if p.ndim == 1:
                p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.1 * torch.randn_like(p))
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.save_pretrained(out_dir)
    save_processor(out_dir)
    return out_dir


def processor(model_dir: str | Path):
    """The model's Qwen2_5_VLProcessor. transformers 5 constructs Qwen2-VL processors only with torchvision (its
    video half); without it (this CPU environment) the same class is put together without the video processor
    -- image and text processing are transformers' own code either way."""
    import importlib.util

    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    made = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    made.image_processor, made.tokenizer, made.video_processor = image_processor(), tokenizer, None
    made.chat_template = tokenizer.chat_template
    made.image_token, made.video_token = "<|image_pad|>", "<|video_pad|>"
    made.image_token_id, made.video_token_id = (tokenizer.convert_tokens_to_ids(t) for t in
                                                (made.image_token, made.video_token))
    return made
