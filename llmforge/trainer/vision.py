"""LoRA SFT of vision-language models (``llmforge.export.vision``'s families): rows with images in the HF
processor's chat format, images through the model's own processor, LoRA on the language model only.

A row is an OpenAI-style ``messages`` list whose contents may be lists of parts: ``{"type": "text", "text": ...}``
and ``{"type": "image", "image": PATH}`` (relative paths are relative to the dataset file's folder). The chat
template renders each image part as the processor's image placeholder; the processor expands it (Gemma 3:
``\\n\\n<start_of_image>`` + image tokens + ``<end_of_image>\\n\\n``) and reports where, so the response-only
spans found on the rendered text (``masking.assistant_spans``) are moved onto the expanded text. Image tokens
are never trained. The vision tower stays frozen; ``lora.modules_to_save: [multi_modal_projector]`` also trains
the projector (saved whole in the adapter, written into the mmproj by ``llmforge convert``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LlmforgeError
from ..export.vision import GEMMA3, VisionArch, find_vision_arch
from .config import Config, LoraConfig
from .data import Example
from .encode import EncodeStats, check_token_ids
from .masking import IGNORE_INDEX, assistant_spans, make_renderer, special_tokens_of, token_labels


@dataclass
class VisionEncoded:
    """One training row: token ids, labels, token types (1 on image tokens) and its images."""

    input_ids: list[int]
    labels: list[int]
    token_type_ids: list[int]
    pixel_values: torch.Tensor | None    # Gemma 3: (images, channels, height, width); Qwen2-VL: (patches, dim)
    row: int
    types_key: str = "token_type_ids"    # the name the model takes the token types under
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)   # other per-image inputs (grid sizes)
    n_images: int = 0


def is_vision_model(path: str | Path) -> bool:
    """True when ``path`` holds a vision-language model llmforge can train and export."""
    from ..export.vision import find_vision_arch

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        return find_vision_arch(json.loads(config_path.read_text(encoding="utf-8"))) is not None
    except ValueError:
        return False


def image_parts(messages: list[dict]) -> list[dict]:
    """The image parts of a conversation, in order."""
    return [part for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]


def load_images(example: Example, base_dir: Path) -> list[Any]:
    """PIL images of an example's image parts (``image``, ``path`` or ``url`` holding a file path)."""
    try:
        from PIL import Image
    except ImportError:
        raise LlmforgeError("training on images needs Pillow", hint="pip install 'llmforge[vision]'") from None
    images = []
    for part in image_parts(example.messages or []):
        ref = part.get("image", part.get("path", part.get("url")))
        if not isinstance(ref, str) or not ref:
            raise LlmforgeError(f"row {example.row}: an image part has no file path",
                                hint='write {"type": "image", "image": "path/to/file.png"}')
        if "://" in ref and not ref.startswith("file://"):
            raise LlmforgeError(f"row {example.row}: image {ref} is a URL; training reads local files",
                                hint="download it and give its path (relative to the dataset file)")
        path = Path(ref.removeprefix("file://"))
        path = path if path.is_absolute() else base_dir / path
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise LlmforgeError(f"row {example.row}: cannot read image {path} ({exc.__class__.__name__})",
                                hint="fix the path (relative to the dataset file) or the file") from None
    return images


def _shift(pos: int, replacements: list[dict]) -> int:
    """A rendered-text offset moved onto the processor's expanded text (``text_replacement_offsets``)."""
    shift = 0
    for r in replacements:
        (start, end), (new_start, new_end) = r["span"], r["new_span"]
        if pos >= end:
            shift += (new_end - new_start) - (end - start)
        elif pos > start:
            return new_start   # inside a placeholder: its start
    return pos + shift


def encode_vision_example(example: Example, processor: Any, render: Any, response_only: bool, base_dir: Path,
                          spec: VisionArch = GEMMA3) -> tuple[list[int], list[int], list[int], dict[str, torch.Tensor]]:
    """(ids, labels, token types, the processor's per-image inputs) of one conversation."""
    if example.messages is None:
        raise LlmforgeError(f"row {example.row}: vision training takes conversations (messages)",
                            hint="write rows as {\"messages\": [...]} with image parts in user turns")
    try:
        rendered = assistant_spans(render, example.messages, example.tools)
    except LlmforgeError as exc:
        raise LlmforgeError(f"row {example.row}: the chat template rejects this conversation: {exc.message}",
                            hint=exc.hint or "fix the row") from None
    images = load_images(example, base_dir)
    placeholder = getattr(processor, "image_token", None)
    if placeholder and rendered.text.count(placeholder) != len(images):
        raise LlmforgeError(f"row {example.row}: {len(images)} image part(s) but the chat template wrote "
                            f"{rendered.text.count(placeholder)} image placeholder(s)",
                            hint="put images in user turns as {\"type\": \"image\", \"image\": PATH}")
    out = processor(text=[rendered.text], images=[images] if images else None, add_special_tokens=False,
                    return_offsets_mapping=True, return_text_replacement_offsets=True)
    ids = list(out["input_ids"][0])
    replacements = out.get("text_replacement_offsets", [[]])[0] if images else []
    types = list(out[spec.token_types][0]) if spec.token_types in out else [0] * len(ids)
    if response_only:
        spans = [(_shift(a, replacements), _shift(b, replacements)) for a, b in rendered.spans]
        labels = token_labels(ids, [tuple(o) for o in out["offset_mapping"][0]], spans)
    else:
        labels = list(ids)
    for r in replacements:   # image tokens (and the processor's markers around them) are inputs only
        lo, hi = r["new_span"]
        for i, (a, b) in enumerate(out["offset_mapping"][0]):
            if a < hi and b > lo:
                labels[i] = IGNORE_INDEX
    inputs = {k: torch.as_tensor(np.stack(out[k])) for k in spec.image_inputs} if images else {}
    return ids, labels, types, inputs


def encode_vision_all(examples: list[Example], processor: Any, chat_template: str, max_length: int,
                      base_dir: Path, response_only: bool = True,
                      spec: VisionArch = GEMMA3) -> tuple[list[VisionEncoded], EncodeStats]:
    """Encode every conversation; rows longer than ``max_length`` are dropped (cutting would split images)."""
    tokenizer = processor.tokenizer
    render = make_renderer(chat_template, special_tokens_of(tokenizer))
    stats = EncodeStats()
    out: list[VisionEncoded] = []
    for example in examples:
        ids, labels, types, inputs = encode_vision_example(example, processor, render, response_only, base_dir,
                                                           spec)
        if len(ids) > max_length:
            stats.dropped += 1
            continue
        if stats.add(ids, labels):
            pixels = inputs.pop("pixel_values", None)
            out.append(VisionEncoded(ids, labels, types, pixels, example.row, spec.token_types, inputs,
                                     len(image_parts(example.messages))))
    if stats.dropped:
        print(f"warning: {stats.dropped} conversations longer than {max_length} tokens (images included) were "
              "dropped", file=sys.stderr)
    stats.check_trainable()
    return out, stats


def collate_vision(rows: list[VisionEncoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch with ``token_type_ids`` and the batch's images in row order."""
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    types = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
        types[i, :n] = torch.tensor(r.token_type_ids)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, rows[0].types_key: types}
    pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    for key in rows[0].image_inputs:
        batch[key] = torch.cat([r.image_inputs[key] for r in rows if key in r.image_inputs])
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- model and LoRA


def int8_skip_patterns(spec: Any) -> list[str]:
    """bitsandbytes' skip list for ``spec``'s 16-bit parts and lm_head, wherever the architecture nests them.

    transformers matches each pattern from the start of a module's full name (or as its suffix), so a bare
    ``vision_tower`` would not keep ``model.vision_tower.encoder...`` in 16 bits: allow any prefix.
    """
    return [rf"(?:.*\.)?{part}" for part in spec.keep_16bit] + ["lm_head"]


def load_vision_model(path: str | Path, load_in_4bit: bool, dtype: str, max_seq_length: int,
                      chat_template: str | None = None, spec: VisionArch = GEMMA3) -> tuple[Any, Any]:
    """(model, processor) for LoRA training; 4-bit NF4 on CUDA keeps the vision tower and projector in 16-bit."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .load import from_pretrained, pick_dtype

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype, cuda)}
    if load_in_4bit and not cuda:
        print(f"note: 4-bit loading needs CUDA; loading in {str(kwargs['dtype']).removeprefix('torch.')} instead",
              file=sys.stderr)
    elif load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
            llm_int8_skip_modules=int8_skip_patterns(spec))
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise LlmforgeError(f"cannot load the processor of {path}", hint=str(exc).splitlines()[0]) from None
    except (ImportError, AttributeError) as exc:   # transformers 5 builds Qwen2-VL processors only with torchvision
        hint = "install torchvision (matching torch)" if _lacks_torchvision() else str(exc).splitlines()[0]
        raise LlmforgeError(f"cannot load the processor of {path}", hint=hint) from None
    model = from_pretrained(AutoModelForImageTextToText, Path(path), **kwargs)   # misfit weights: one line
    if cuda and not load_in_4bit:
        model = model.to("cuda")
    model.config.use_cache = False
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    if chat_template:
        tokenizer.chat_template = processor.chat_template = chat_template
    return model, processor


def _lacks_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is None


LANGUAGE_MODEL = r"(?:.*\.)?language_model\..*\.({})"


def language_targets(model: Any, config: LoraConfig) -> str:
    """``lora.target_modules`` as a PEFT regex over the language model's projections only (the vision tower
    stays frozen)."""
    from .lora import PROJECTIONS

    language = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                if ".language_model." in f".{n}" and isinstance(m, torch.nn.Linear)}
    available = sorted(language & set(PROJECTIONS))
    wanted = available if config.target_modules == "all-linear" else (
        [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules))
    unknown = [t for t in wanted if t not in language]
    if unknown:
        raise LlmforgeError(f"lora.target_modules {unknown[0]!r} is not a projection of the language model",
                            hint=f"choose from {', '.join(available)} or 'all-linear'")
    return LANGUAGE_MODEL.format("|".join(wanted))


# ----------------------------------------------------------------------------- the run


def train_vision(config: Config, resume: bool = False):
    """``llmforge train`` for a vision-language base: the same loop, checkpoints and adapter layout as text SFT."""
    from .data import load_examples
    from .run import ADAPTER_DIR, TrainResult, maybe_patch_kernels, save_adapter, start_output, train_lora
    from .sft import train_loop

    if not config.data.path:
        raise LlmforgeError("data.path is not set", hint="set it in the config or with --set data.path=FILE")
    if config.data.packing:
        raise LlmforgeError("data.packing does not apply to vision-language training",
                            hint="set data.packing: false")
    out_dir = start_output(config)
    started = time.perf_counter()
    print(f"[1/4] reading data {config.data.path}", file=sys.stderr)
    data_format, examples = load_examples(config.data.path, config.data.format)
    print(f"[2/4] loading vision-language model {config.model.path}", file=sys.stderr)
    spec = find_vision_arch(json.loads((Path(config.model.path) / "config.json").read_text(encoding="utf-8")))
    model, processor = load_vision_model(config.model.path, config.model.load_in_4bit, config.model.dtype,
                                         config.model.max_seq_length, config.model.chat_template, spec)
    template = processor.tokenizer.chat_template
    if not isinstance(template, str):
        raise LlmforgeError(f"the processor of {config.model.path} has no chat template",
                            hint="set model.chat_template")
    rows, stats = encode_vision_all(examples, processor, template, config.model.max_seq_length,
                                    Path(config.data.path).resolve().parent, config.data.response_only, spec)
    check_token_ids(((r.row, r.input_ids) for r in rows), model, processor.tokenizer, config.model.path)
    images = sum(r.n_images for r in rows)
    model = train_lora(model, config, language_targets(model, config.lora))
    kernels = maybe_patch_kernels(model, config, host_weights=False)   # the language model's; as for text SFT
    summary = f"{stats.summary()}, {images} images"
    print(f"[3/4] training ({data_format} data, {summary.removeprefix('data: ')})", file=sys.stderr)
    loop = train_loop(model, rows, config.train, out_dir, processor.tokenizer.pad_token_id, resume=resume,
                      collate_fn=collate_vision)
    print(f"[4/4] saving the adapter to {out_dir / ADAPTER_DIR}", file=sys.stderr)
    adapter_dir = save_adapter(model, processor.tokenizer, config, out_dir / ADAPTER_DIR)
    return TrainResult(adapter_dir=adapter_dir, output_dir=out_dir, base_model=Path(config.model.path),
                       steps=loop.steps, first_loss=loop.first_loss, last_loss=loop.last_loss, losses=loop.losses,
                       data_summary=summary, seconds=time.perf_counter() - started, tokens=loop.tokens,
                       resumed_from=loop.resumed_from, kernels=kernels)
