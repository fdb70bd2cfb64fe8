"""The bundled vision example: a tiny Gemma 3 vision-language model (SigLIP tower + Gemma 3 projector + Gemma 3
text model) built from a config on the shipped tokenizer, taught to name the colour of a square in a 32x32 image.

The sizes keep every export path exercised: 32x32 images in 4x4 patches (64 patches), pooled 2x2 into 16 image
tokens (llama.cpp's ``clip.vision.projector.scale_factor`` = 2), row lengths multiples of 32 for q8_0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "config.yaml"
DATA_PATH = HERE / "data.jsonl"
TOKENIZER_DIR = HERE / "tokenizer"
IMAGES_DIR = HERE / "images"

IMAGE_SIZE, PATCH_SIZE, IMAGE_TOKENS = 32, 4, 16


def _token_ids() -> dict[str, int]:
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


def model_config(text_layers: int = 2, vision_layers: int = 2):
    """The tiny Gemma3Config (transformers)."""
    from transformers import Gemma3Config

    ids = _token_ids()
    vocab = len(json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, vocab_size=vocab,
                sliding_window=64, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
                layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(text_layers)],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False, layer_norm_eps=1e-6)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_TOKENS,
                        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                        image_token_index=ids["<image_soft_token>"], initializer_range=0.05)


def save_processor(out_dir: Path) -> None:
    """The Gemma 3 processor (image processor at the model's image size + the shipped tokenizer) into out_dir."""
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template, image_seq_length=IMAGE_TOKENS)
    processor.save_pretrained(str(out_dir))
    for f in TOKENIZER_DIR.iterdir():  # the shipped files as they are (save_pretrained rewrites the config)
        shutil.copy(f, out_dir / f.name)


def build_base_model(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    """Write the example's random-initialised Gemma 3 VLM, tokenizer and processor to ``out_dir``."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(model_config(**sizes)).to(torch.float32)
    with torch.no_grad():
        # norms random around their neutral value, so norm handling (Gemma's 1+w, SigLIP's bias) is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                gemma_norm = "language_model" in name or "soft_emb_norm" in name
                neutral = 0.0 if gemma_norm or name.endswith("bias") else 1.0
                p.copy_(neutral + 0.1 * torch.randn_like(p))
            elif not p.any():  # Gemma 3 starts its projector at zero: image features would vanish
                p.normal_(0.0, 0.05)
        # tied embeddings of 64 dims at the usual std cap the logits at a few units, too flat to learn from
        model.get_input_embeddings().weight.normal_(0.0, 0.4)
    model.save_pretrained(out_dir)
    hub_layout(out_dir / "model.safetensors")
    save_processor(out_dir)
    return out_dir


def hub_layout(path: Path) -> None:
    """Rename transformers 5's saved ``vision_tower.*`` keys to the published Gemma 3 checkpoints' layout
    (``vision_tower.vision_model.*``), which transformers loads as well and llama.cpp's converter expects."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def example_rows() -> list[dict]:
    """The bundled rows with absolute image paths."""
    rows = []
    for line in DATA_PATH.read_text().splitlines():
        row = json.loads(line)
        for message in row["messages"]:
            for part in message["content"]:
                if part.get("type") == "image":
                    part["image"] = str(HERE / part["image"])
        rows.append(row)
    return rows
