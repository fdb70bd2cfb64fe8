"""Check a shipped GGUF the way Ollama would run it: Modelfile template (Go) -> llama.cpp greedy -> stops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlmforgeError


@dataclass
class DemoRow:
    prompt: str
    expected: str
    got: str
    template_matches: bool     # Go (Ollama) render == Jinja render

    @property
    def correct(self) -> bool:
        return self.got == self.expected


@dataclass
class DemoReport:
    gguf: Path
    rows: list[DemoRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.rows)

    @property
    def template_ok(self) -> int:
        return sum(r.template_matches for r in self.rows)

    def passed(self, quant: str) -> bool:
        """All answers for 16/32-bit and 8-bit exports; at least half for lower-bit quants (reported)."""
        need = self.total if quant.lower() in ("f32", "f16", "bf16", "q8_0") else (self.total + 1) // 2
        return self.correct >= need and self.template_ok == self.total

    def summary_lines(self) -> list[str]:
        lines = [f"template check: Ollama's Go render equals the Jinja render on {self.template_ok}/{self.total} "
                 "prompts"]
        lines += [f"  {'ok  ' if r.correct else 'MISS'} {r.prompt!r} -> {r.got!r}"
                  + ("" if r.correct else f" (expected {r.expected!r})") for r in self.rows]
        lines.append(f"learned answers through llama.cpp: {self.correct}/{self.total} "
                     f"({100 * self.correct / max(self.total, 1):.0f}%)")
        return lines


@contextlib.contextmanager
def without_extra_buffers() -> Iterator[None]:
    """Load llama.cpp models without the CPU "extra" buffer types (AMX / repacked weights).

    llama.cpp's AMX matmul crashes on some Sapphire Rapids machines for quantized weights and batched
    prompts (ggml-org/llama.cpp#20824); plain CPU buffers compute the same model. llama-cpp-python's
    ``Llama`` does not expose ``use_extra_bufts``, so the default-params factory is wrapped while loading.
    """
    import llama_cpp.llama_cpp as llama_cpp  # the module Llama() reads its defaults from

    original = llama_cpp.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = defaults
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = original


def check_gguf(gguf: Path, modelfile: Path, adapter_dir: Path, pairs: list[tuple[list[dict], str]],
               max_tokens: int = 32) -> DemoReport:
    """Greedy-decode each prompt of ``pairs`` with llama.cpp; the prompt is rendered by the Modelfile's Go
    template (Ollama's engine) and compared with the adapter's Jinja template; generation ends at the
    Modelfile's stops or the end-of-generation token."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LlmforgeError("the demo check needs llama-cpp-python", hint="pip install llama-cpp-python") from exc
    from ..templates.go_render import render_go
    from ..templates.jinja_render import render_jinja
    from ..templates.modelfile import parse_modelfile
    from .load import load_tokenizer
    from .masking import special_tokens_of

    mf = parse_modelfile(Path(modelfile).read_text(encoding="utf-8"))
    if not mf.template:
        raise LlmforgeError(f"{modelfile} has no TEMPLATE", hint="the chat template was not translated")
    tokenizer = load_tokenizer(adapter_dir)
    special = special_tokens_of(tokenizer)
    with without_extra_buffers():
        llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, n_batch=256, verbose=False, seed=0)
    report = DemoReport(gguf=Path(gguf))
    for messages, expected in pairs:
        prompt = render_go(mf.template, messages)
        jinja = render_jinja(tokenizer.chat_template, messages, special_tokens=special, add_generation_prompt=True)
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        out = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    repeat_penalty=1.0, stop=mf.stops or None)
        got = out["choices"][0]["text"].strip()
        report.rows.append(DemoRow(messages[-1]["content"], expected, got, prompt == jinja))
    return report
