"""Entry points behind ``llmforge train`` and ``llmforge train-and-ship``: config -> model -> data -> loop -> save."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_dir
from ..errors import LlmforgeError
from .config import Config, load_config

if TYPE_CHECKING:
    from ..quant.mixtures import TypeOverrides

ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    adapter_dir: Path
    output_dir: Path
    base_model: Path
    steps: int
    first_loss: float
    last_loss: float
    losses: list[float]
    data_summary: str
    seconds: float
    tokens: int
    resumed_from: int = 0
    rewards: list[float] = field(default_factory=list)   # GRPO: mean reward per step
    kernels: str = ""                                     # what maybe_patch_kernels did ("" = not asked)

    def summary_lines(self) -> list[str]:
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        progress = (f"mean reward {self.rewards[0]:.4f} -> {self.rewards[-1]:.4f}" if self.rewards else
                    f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}")
        return [self.data_summary,
                f"trained {self.steps} steps{resumed} in {self.seconds:.1f} s: {progress}, "
                f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s",
                *([f"kernels: {self.kernels}"] if self.kernels else []),
                f"adapter: {self.adapter_dir} ({dir_size(self.adapter_dir) / 1e6:.1f} MB; base {self.base_model})"]


@dataclass
class ShipResult:
    train: TrainResult
    quant: str
    ship: Any = None                 # llmforge.pipeline.ShipReport
    demo: Any = None                 # llmforge.trainer.demo.DemoReport
    stages: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = ["== train", *self.train.summary_lines()]
        if self.ship is not None:
            lines += ["== ship", *self.ship.summary_lines()]
            size = Path(self.ship.gguf).stat().st_size / 1e6 if Path(self.ship.gguf).exists() else 0
            lines.append(f"quant: {self.quant}, GGUF {size:.1f} MB")
            lines.append(f"Ollama name: {self.ship.name}"
                         + ("" if self.ship.pushed else " (not pushed; see the ollama create command above)"))
        if self.demo is not None:
            lines += ["== check", *self.demo.summary_lines()]
        return lines


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def prepare_output_dir(path: Path) -> None:
    """Create the output folder, or fail with one line when it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmforgeError(f"cannot create the output folder {path}: {exc.strerror}",
                            hint="set train.output_dir to a writable folder") from None
    if not os.access(path, os.W_OK):
        raise LlmforgeError(f"the output folder {path} is not writable", hint="set train.output_dir elsewhere")


def start_output(config: Config) -> Path:
    """``train.output_dir``, created (one error line when it cannot be), with ``train.threads`` applied."""
    out_dir = Path(config.train.output_dir)
    prepare_output_dir(out_dir)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    return out_dir


def train_lora(model: Any, config: Config, target_modules: str | list[str] | None = None) -> Any:
    """The PEFT model to train: LoRA seeded with ``train.seed``, checkpointing as ``train.gradient_checkpointing``
    says (auto: on CUDA); ``target_modules`` as :func:`llmforge.trainer.lora.add_lora` takes it."""
    from .lora import add_lora

    checkpointing = {"auto": torch.cuda.is_available(), "on": True, "off": False}[config.train.gradient_checkpointing]
    torch.manual_seed(config.train.seed)
    return add_lora(model, config.lora, gradient_checkpointing=checkpointing, target_modules=target_modules)


def maybe_patch_kernels(model: Any, config: Config, host_weights: bool = True, graphs: bool = False) -> str:
    """llmforge's fused kernels on CUDA unless ``train.kernels: false``; tolerated when not available. Returns
    what was done, for the run's summary. ``host_weights=False`` (vision-language models): the embeddings and
    lm_head stay on the device whatever ``train.offload_embeddings`` says (the caller notes it). ``graphs``: the
    caller keeps one batch shape, so ``train.cuda_graphs`` can apply (:func:`layer_graphs_of` finds them)."""
    use_graphs = config.train.cuda_graphs and graphs
    if config.train.cuda_graphs and not graphs:
        print("note: train.cuda_graphs is not applied here (only text SFT keeps one batch shape)", file=sys.stderr)
    if not (torch.cuda.is_available() and config.train.kernels):
        why = "no CUDA device" if config.train.kernels else "train.kernels is false"
        if config.train.offload_embeddings == "on" and host_weights:   # asked for by name: say why nothing moved
            print(f"note: train.offload_embeddings: on is not applied ({why}; it comes with the CUDA kernels)",
                  file=sys.stderr)
        if config.train.fp8:
            print(f"note: train.fp8 is not applied ({why}; it comes with the CUDA kernels)", file=sys.stderr)
        if use_graphs:
            print(f"note: train.cuda_graphs is not applied ({why}; it comes with the CUDA kernels)", file=sys.stderr)
        return f"off ({why})"
    if use_graphs and config.train.gradient_checkpointing == "off":
        print("note: train.cuda_graphs is not applied (it runs the checkpointed layers, and "
              "train.gradient_checkpointing is off)", file=sys.stderr)
        use_graphs = False
    try:
        from ..kernels.patch import patch_model
    except ImportError as exc:
        return f"off (cannot import them: {exc})"
    # host-resident lm_head: ~1 GiB of copies per call, too slow for generating (GRPO) unless asked for
    auto = None if config.train.method == "sft" else False
    offload = {"auto": auto, "on": True, "off": False}[config.train.offload_embeddings] if host_weights else False
    report = patch_model(model, offload_frozen_weights=offload, fp8_base=config.train.fp8,
                         cuda_graphs=bool(use_graphs))
    print(f"kernels: {report}", file=sys.stderr)
    return report.summary()


def layer_graphs_of(model: Any):
    """The :class:`~llmforge.kernels.layer_graphs.LayerGraphs` that ``patch_model`` gave ``model``, or None."""
    return next((m._llmforge_layer_graphs for m in model.modules() if hasattr(m, "_llmforge_layer_graphs")), None)


def train(config: Config, resume: bool = False) -> TrainResult:
    """Run LoRA/QLoRA SFT as ``config`` says; the adapter, tokenizer and chat template land in
    ``<train.output_dir>/adapter``. ``train.method: grpo`` runs :func:`llmforge.trainer.grpo.train_grpo`."""
    from .load import prefer_expandable_segments

    prefer_expandable_segments()   # before the model touches CUDA
    if config.train.method == "grpo":
        from .grpo import train_grpo

        return train_grpo(config, resume=resume)
    from .vision import image_parts, is_vision_model

    if config.model.path and is_vision_model(config.model.path):   # images through the model's processor
        from ..export.vision import processor_config
        from .vision import train_vision

        processor_config(Path(config.model.path))   # a folder without its processor: one line, before loading
        if not any((Path(config.model.path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise LlmforgeError(f"no tokenizer in {config.model.path} (tokenizer.json or tokenizer.model)",
                                hint="copy the model's tokenizer files into the folder")
        if config.train.offload_embeddings == "on":
            print("note: train.offload_embeddings: on is not applied to vision-language models", file=sys.stderr)

        return train_vision(config, resume=resume)
    from .data import load_examples
    from .encode import check_token_ids, encode_all, resolve_chat_template
    from .load import load_model
    from .sft import collate, pack, train_loop

    if not config.model.path:
        raise LlmforgeError("model.path is not set", hint="set it in the config or with --set model.path=DIR")
    if not config.data.path:
        raise LlmforgeError("data.path is not set", hint="set it in the config or with --set data.path=FILE")
    out_dir = start_output(config)
    started = time.perf_counter()
    print(f"[1/4] reading data {config.data.path}", file=sys.stderr)
    data_format, examples = load_examples(config.data.path, config.data.format)
    with_images = next((e.row for e in examples if image_parts(e.messages or [])), None)
    if with_images is not None:
        raise LlmforgeError(f"row {with_images} of {config.data.path} has an image, but {config.model.path} is not "
                            "a vision-language model",
                            hint="train a Gemma3ForConditionalGeneration base, or drop the images")
    print(f"[2/4] loading model {config.model.path}", file=sys.stderr)
    model, tokenizer = load_model(config.model.path, load_in_4bit=config.model.load_in_4bit,
                                  dtype=config.model.dtype, max_seq_length=config.model.max_seq_length)
    chat_template = resolve_chat_template(tokenizer, config.model.chat_template)
    rows, stats = encode_all(examples, tokenizer, chat_template, config.model.max_seq_length,
                             response_only=config.data.response_only, overlong=config.data.overlong)
    check_token_ids(((r.row, r.input_ids) for r in rows), model, tokenizer, config.model.path)
    if config.data.packing:
        rows = pack(rows, config.model.max_seq_length)
    model = train_lora(model, config)
    kernels = maybe_patch_kernels(model, config, graphs=True)
    graphs = layer_graphs_of(model)
    print(f"[3/4] training ({data_format} data, {stats.summary().removeprefix('data: ')})", file=sys.stderr)
    # CUDA graphs replay one shape: every batch padded to the longest a row can be
    collate_fn = functools.partial(collate, length=config.model.max_seq_length) if graphs is not None else collate
    loop = train_loop(model, rows, config.train, out_dir, tokenizer.pad_token_id, resume=resume,
                      collate_fn=collate_fn)
    if graphs is not None:
        print(graphs.stats(), file=sys.stderr)
    print(f"[4/4] saving the adapter to {out_dir / ADAPTER_DIR}", file=sys.stderr)
    adapter_dir = save_adapter(model, tokenizer, config, out_dir / ADAPTER_DIR)
    return TrainResult(adapter_dir=adapter_dir, output_dir=out_dir, base_model=Path(config.model.path),
                       steps=loop.steps, first_loss=loop.first_loss, last_loss=loop.last_loss, losses=loop.losses,
                       data_summary=stats.summary(), seconds=time.perf_counter() - started, tokens=loop.tokens,
                       resumed_from=loop.resumed_from, kernels=kernels)


def save_adapter(model: Any, tokenizer: Any, config: Config, target: Path) -> Path:
    """Adapter weights + tokenizer + chat template + the training config, written atomically."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if tokenizer.chat_template and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
        (tmp / "llmforge_train.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        adapter_config = tmp / "adapter_config.json"
        data = json.loads(adapter_config.read_text())
        data["base_model_name_or_path"] = str(Path(config.model.path).resolve())
        adapter_config.write_text(json.dumps(data, indent=2) + "\n")
    return target


def train_from_config(config: str | Path | Config, overrides: Iterable[str] = (), resume: bool = False) -> TrainResult:
    """``llmforge train CONFIG.yaml``: load and validate the config, then train."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    return train(config, resume=resume)


def example_config(overrides: Iterable[str] = ()) -> Config:
    """The bundled example's config; outputs go to ./out/demo unless overridden."""
    from .example import CONFIG_PATH

    defaults = [f"train.output_dir={Path('out/demo').resolve()}"]
    return load_config(CONFIG_PATH, [*defaults, *overrides])


def train_and_ship(config: str | Path | Config | None = None, overrides: Iterable[str] = (), quant: str | None = None,
                   demo_check: bool = False, host: str | None = None, type_overrides: TypeOverrides | None = None,
                   backend: str = "auto") -> ShipResult:
    """Train, then convert (layer-by-layer merge + quantization), write the Modelfile and push when Ollama is
    reachable. Without ``config`` the bundled example runs; ``demo_check`` then verifies the learned answers
    through llama.cpp. ``overrides`` are config settings (``key=value``); ``type_overrides`` (llama-quantize's
    per-tensor types, :func:`llmforge.quant.mixtures.type_overrides`) and ``backend`` (where K-types are
    packed) go to the conversion."""
    from ..pipeline import ship
    from ..quant.api import resolve_backend, resolve_ftype
    from ..quant.mixtures import BY_NAME, check_overrides

    backend = resolve_backend(backend)   # --device cuda without a GPU fails before training
    bundled = config is None
    if bundled:
        cfg = example_config(overrides)
    else:
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
    quant = quant or cfg.ship.quant
    if type_overrides is not None:      # refused before training, not after it
        check_overrides(type_overrides, BY_NAME[resolve_ftype(quant).name])
    if bundled and not cfg.model.path:
        from .example import build_base_model

        base = Path(cfg.train.output_dir) / "base"
        prepare_output_dir(base.parent)
        print(f"[example] building the tiny base model in {base}", file=sys.stderr)
        with atomic_dir(base) as tmp:
            build_base_model(tmp)
        cfg.model.path = str(base)
    ship_dir = Path(cfg.ship.output_dir or Path(cfg.train.output_dir) / "ship")
    name = cfg.ship.name or Path(cfg.train.output_dir).name
    print("== stage 1/3: train", file=sys.stderr)
    trained = train(cfg)
    print(f"== stage 2/3: convert ({quant}), Modelfile, push", file=sys.stderr)
    prepare_output_dir(ship_dir)
    report = ship(trained.adapter_dir, name=name, quant=quant, output_dir=ship_dir,
                  base=Path(cfg.model.path), host=host or cfg.ship.host, overrides=type_overrides, backend=backend)
    result = ShipResult(train=trained, quant=quant, ship=report)
    if demo_check:
        from .demo import check_gguf
        from .example import demo_pairs

        print("== stage 3/3: check the learned answers through llama.cpp", file=sys.stderr)
        pairs = demo_pairs() if bundled else []
        if not pairs:
            raise LlmforgeError("--demo-check needs the bundled example", hint="run train-and-ship without CONFIG")
        result.demo = check_gguf(report.gguf, report.modelfile, trained.adapter_dir, pairs)
        if not result.demo.passed(quant):
            for line in result.summary_lines():
                print(line, file=sys.stderr)
            raise LlmforgeError(f"demo check failed: {result.demo.correct}/{result.demo.total} learned answers "
                                f"through llama.cpp", hint="see the table above")
    return result
