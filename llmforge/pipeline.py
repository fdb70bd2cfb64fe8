"""``ship``: convert a model or adapter folder to GGUF, write its Modelfile beside it, push both to Ollama.

Without a reachable server the GGUF and Modelfile are still written and the exact ``ollama create`` command is
printed: shipping then succeeds with a warning.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .atomic import atomic_path
from .errors import LlmforgeError
from .export.ollama import OllamaUnreachable, PushReport, Timeouts, push_model, resolve_host, validate_model_name

if TYPE_CHECKING:
    from .quant.mixtures import TypeOverrides


@dataclass
class ShipReport:
    name: str
    gguf: Path
    modelfile: Path
    create_command: str
    convert_lines: list[str] = field(default_factory=list)
    push: PushReport | None = None
    notes: list[str] = field(default_factory=list)  # from the Modelfile (template fallbacks and the like)
    warnings: list[str] = field(default_factory=list)

    @property
    def pushed(self) -> bool:
        return self.push is not None

    def summary_lines(self) -> list[str]:
        lines = list(self.convert_lines)
        lines += [f"GGUF: {self.gguf}", f"Modelfile: {self.modelfile}"]
        lines += self.push.summary_lines() if self.push else [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        if not self.push:
            lines.append(f"to create it by hand: {self.create_command}")
        return lines


def _file_stem(name: str) -> str:
    model_and_tag = name.rsplit("/", 1)[-1]
    return model_and_tag.replace(":", "-")


def _has_chat_template(path: Path) -> bool:
    from .templates import load_template_source

    try:
        return bool(load_template_source(path).chat_template)
    except LlmforgeError:
        return False


def ship(source: Path, *, name: str, quant: str = "q4_k_m", output_dir: Path | None = None,
         base: Path | None = None, host: str | None = None, timeouts: Timeouts = Timeouts(),
         progress: TextIO = sys.stderr, overrides: TypeOverrides | None = None,
         backend: str = "auto") -> ShipReport:
    """Convert ``source`` (model folder or PEFT adapter folder, with ``base``) and create ``name`` on Ollama.

    ``overrides`` (llama-quantize's per-tensor types) and ``backend`` (where K-types are packed) go to
    :func:`llmforge.export.convert.convert`."""
    from .export.convert import convert
    from .quant.api import resolve_backend
    from .templates.modelfile import modelfile_for_source

    validate_model_name(name)
    backend = resolve_backend(backend)
    resolve_host(host)  # a bad or non-loopback host fails now, not after a long conversion
    source = Path(source).resolve()
    if not source.exists():
        raise LlmforgeError(f"{source} does not exist", hint="pass a model folder or an adapter folder")
    out_dir = Path(output_dir) if output_dir else source.parent / f"{source.name}-ollama"
    if not out_dir.parent.is_dir():
        raise LlmforgeError(f"the folder {out_dir.parent} does not exist", hint="create it or pass another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmforgeError(f"output {out_dir} is a file, not a folder", hint="pass a folder path with -o")
    created_dir = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    try:
        converted = convert(source, out_dir / f"{_file_stem(name)}-{quant}.gguf", quant, base=base,
                            overrides=overrides, backend=backend)
    except BaseException:
        if created_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave nothing behind for a failed conversion
        raise
    gguf = Path(converted.path)
    template_source = None
    if base is not None and not _has_chat_template(source):
        template_source = Path(base)  # an adapter folder without its own tokenizer files
    from .templates import load_template_source

    loaded = load_template_source(template_source or source)
    mf = modelfile_for_source(source, from_=f"./{gguf.name}", template_source=template_source,
                              loaded=lambda: loaded)
    projector = getattr(converted, "mmproj", None)   # a vision model: FROM text.gguf + FROM mmproj
    mf.projector = f"./{projector.name}" if projector is not None else None
    modelfile_path = out_dir / "Modelfile"
    with atomic_path(modelfile_path) as tmp:
        tmp.write_text(mf.text, encoding="utf-8")
    command = f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile_path))}"
    report = ShipReport(name=name, gguf=gguf, modelfile=modelfile_path, create_command=command,
                        convert_lines=list(converted.summary_lines()), notes=list(mf.notes))
    try:
        report.push = push_model(gguf, name, modelfile=mf, host=host, template_source=loaded, timeouts=timeouts,
                                 progress=progress, projector=projector)
    except OllamaUnreachable as exc:
        report.warnings.append(f"not pushed: {exc.message}")
    except LlmforgeError as exc:
        raise LlmforgeError(f"wrote {gguf} and {modelfile_path}, but the push failed: {exc.message}",
                            hint=f"{exc.hint}; or create it by hand: {command}" if exc.hint else command) from None
    return report
