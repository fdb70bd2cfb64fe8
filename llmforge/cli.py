"""The ``llmforge`` command line: one click group, thin. Each command parses, calls the library, prints.

Library functions raise :class:`llmforge.errors.LlmforgeError` for user mistakes; ``main`` turns those into
one line on stderr and a non-zero exit. Diagnostics go to stderr so stdout stays clean for data.
"""

from __future__ import annotations

import functools
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import click

from . import __version__
from .errors import LlmforgeError


def echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmforge")
def cli() -> None:
    """Fine-tune a language model and ship it to a local runtime (GGUF + Ollama)."""


def type_override_options(command):
    """llama-quantize's per-tensor type options, shared by ``convert``, ``quantize``, ``ship`` and
    ``train-and-ship``; they reach the command as one ``overrides`` argument (a ``TypeOverrides``)."""
    options = [
        click.option("--pure", is_flag=True, help="No mixture: every quantizable tensor gets the quant's base type."),
        click.option("--leave-output-tensor", is_flag=True,
                     help="Keep output.weight in its source type (not quantized)."),
        click.option("--output-tensor-type", metavar="TYPE",
                     help="Type of output.weight (and of tied embeddings), e.g. q8_0 (see `llmforge quants`)."),
        click.option("--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight, e.g. q8_0."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Type of the tensors whose name matches REGEX, e.g. 'attn_v=q8_0'; repeatable, "
                          "the first match wins."),
        click.option("--tensor-type-file", type=click.Path(path_type=Path), metavar="FILE",
                     help="REGEX=TYPE rules separated by spaces or newlines, tried after the --tensor-type ones."),
    ]
    names = ("pure", "leave_output_tensor", "output_tensor_type", "token_embedding_type", "tensor_types",
             "tensor_type_file")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .quant.mixtures import type_overrides

        kwargs["overrides"] = type_overrides(**{n: kwargs.pop(n) for n in names})
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def device_option(command):
    """``--device auto|cpu|cuda``: where K-types are packed; reaches the command as ``backend``."""

    @functools.wraps(command)
    def wrapper(*args, device: str, **kwargs):
        from .quant.api import DEVICE_BACKENDS, resolve_backend

        # chosen (and --device cuda checked) before anything is read, trained or written
        return command(*args, backend=resolve_backend(DEVICE_BACKENDS[device]), **kwargs)

    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="Where K-quants are packed: cuda (the GPU kernels), cpu (numpy worker processes), "
                             "auto (cuda when an NVIDIA GPU, CUDA torch and Triton are there). Same bytes.")(wrapper)


# ---------------------------------------------------------------- export (HF / PEFT -> GGUF)

@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--quant", "-q", default="f16", show_default=True, help="Quant type or mixture (see `llmforge quants`).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output .gguf path (default: beside SOURCE).")
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder for an adapter SOURCE.")
@click.option("--lora-only", is_flag=True, help="Write a GGUF LoRA adapter instead of merging (adapter SOURCE).")
@click.option("--imatrix", type=click.Path(path_type=Path), help="llama.cpp importance-matrix file for K-quants.")
@click.option("--name", help="general.name written into the GGUF.")
@device_option
@type_override_options
def convert(source: Path, quant: str, output: Path | None, base: Path | None, lora_only: bool,
            imatrix: Path | None, name: str | None, overrides, backend: str) -> None:
    """Convert a Hugging Face model folder or a PEFT adapter folder to GGUF."""
    from .export.convert import convert as run_convert

    report = run_convert(source, output, quant, base=base, lora_only=lora_only, imatrix=imatrix, name=name,
                         overrides=overrides, backend=backend)
    for line in report.summary_lines():
        echo_err(line)
    click.echo(str(report.path))


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder for the merged model.")
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder (default: the adapter's base).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), help="Weight dtype (default: the base's 16-bit).")
def merge(adapter: Path, output: Path, base: Path | None, max_shard_size: str, dtype: str | None) -> None:
    """Merge a PEFT adapter into its base: sharded 16-bit safetensors + config + tokenizer."""
    from .export.merge import merge_to_hf

    report = merge_to_hf(adapter, output, base=base, max_shard_size=max_shard_size, dtype=dtype)
    echo_err(f"wrote {report['path']} ({len(report['shards'])} shards, {report['bytes'] / 2**20:.1f} MiB, "
             f"{report['dtype'].removeprefix('torch.')})")
    for note in report["notes"]:
        echo_err(f"checked: {note}")
    click.echo(str(report["path"]))


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Summarise a GGUF file: architecture, parameters, types, tokenizer, chat template."""
    import json

    from .export.inspect import format_inspection, inspect_gguf

    info = inspect_gguf(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))
    if info.get("truncated"):   # the report is shown; the exit status says the file is unusable
        name, needed = info["truncated"]
        raise LlmforgeError(f"{path} is truncated: tensor {name} needs {needed:,} bytes, the file has "
                            f"{info['file_size']:,}", hint="copy or download it again, or re-convert it")


# ---------------------------------------------------------------- quantization

@cli.command()
@click.argument("input_path", metavar="IN.gguf", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT.gguf", type=click.Path(path_type=Path))
@click.option("--quant", "-q", required=True, help="Target quant type or mixture (see `llmforge quants`).")
@click.option("--imatrix", type=click.Path(path_type=Path), help="llama.cpp importance-matrix file.")
@device_option
@type_override_options
def quantize(input_path: Path, output_path: Path, quant: str, imatrix: Path | None, overrides,
             backend: str) -> None:
    """Requantize an f32/f16/bf16 GGUF."""
    from .quant.requantize import quantize_gguf

    report = quantize_gguf(input_path, output_path, quant, imatrix=imatrix, overrides=overrides, backend=backend)
    for line in report.summary_lines():
        echo_err(line)
    click.echo(str(output_path))


@cli.command()
def quants() -> None:
    """List the quant types and mixtures with bits per weight."""
    from .quant.mixtures import describe_quants, override_type_names

    for name, bpw, text in describe_quants():
        click.echo(f"{name:<8} {bpw:>6.2f} bpw  {text}")
    echo_err(f"per-tensor types (--output-tensor-type, --token-embedding-type, --tensor-type REGEX=TYPE): "
             f"{', '.join(override_type_names())}")


# ---------------------------------------------------------------- templates and Modelfile

@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Render Jinja and Go on the conversation fixtures; print a table.")
@click.option("--chat-template", "named", help="Use one of llmforge's named templates instead.")
def template(source: Path, check: bool, named: str | None) -> None:
    """Translate SOURCE's chat template (model folder, adapter folder or GGUF) to an Ollama Go template."""
    from .templates.cli_support import run_template_command

    run_template_command(source, check=check, named=named)


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--from", "from_", help="FROM line (default: the GGUF path, or SOURCE when it is a GGUF).")
@click.option("--adapter", type=click.Path(path_type=Path), help="GGUF LoRA adapter for an ADAPTER line.")
@click.option("--system", help="Default SYSTEM prompt.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Extra PARAMETER lines.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write here instead of stdout.")
@click.option("--projector", type=click.Path(path_type=Path),
              help="Vision projector GGUF for a second FROM line (default: mmproj-<name>.gguf beside a GGUF).")
def modelfile(source: Path, from_: str | None, adapter: Path | None, system: str | None,
              params: tuple[str, ...], output: Path | None, projector: Path | None) -> None:
    """Generate an Ollama Modelfile (TEMPLATE, stops, num_ctx, SYSTEM, ADAPTER, projector, LICENSE) for SOURCE."""
    from .templates.modelfile import run_modelfile_command

    run_modelfile_command(source, from_=from_, adapter=adapter, system=system, params=params, output=output,
                          projector=projector)


# ---------------------------------------------------------------- Ollama

@cli.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Ollama model name, e.g. mymodel:latest.")
@click.option("--modelfile", "modelfile_path", type=click.Path(path_type=Path), help="Use this Modelfile.")
@click.option("--adapter", type=click.Path(path_type=Path), help="GGUF LoRA adapter to attach.")
@click.option("--host", help="Ollama host (default: $OLLAMA_HOST or 127.0.0.1:11434).")
def push(gguf: Path, name: str, modelfile_path: Path | None, adapter: Path | None, host: str | None) -> None:
    """Upload a GGUF to a local Ollama server and create NAME from it."""
    from .export.ollama import push_model

    report = push_model(gguf, name, modelfile=modelfile_path, adapter=adapter, host=host)
    for line in report.summary_lines():
        echo_err(line)


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Ollama model name.")
@click.option("--quant", "-q", default="q4_k_m", show_default=True)
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Folder for the GGUF and Modelfile.")
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder for an adapter SOURCE.")
@click.option("--host", help="Ollama host (default: $OLLAMA_HOST or 127.0.0.1:11434).")
@device_option
@type_override_options
def ship(source: Path, name: str, quant: str, output_dir: Path | None, base: Path | None, host: str | None,
         overrides, backend: str) -> None:
    """Convert + Modelfile + push in one command."""
    from .pipeline import ship as run_ship

    report = run_ship(source, name=name, quant=quant, output_dir=output_dir, base=base, host=host,
                      overrides=overrides, backend=backend)
    for line in report.summary_lines():
        echo_err(line)


@cli.command()
@click.argument("name")
@click.argument("prompt")
@click.option("--host", help="Ollama host (default: $OLLAMA_HOST or 127.0.0.1:11434).")
def run(name: str, prompt: str, host: str | None) -> None:
    """Smoke-chat with a model on the Ollama server (streamed)."""
    from .export.ollama import smoke_chat

    smoke_chat(name, prompt, host=host, out=sys.stdout)


# ---------------------------------------------------------------- training

@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--resume", is_flag=True, help="Resume from the newest checkpoint in the output folder.")
@click.option("--chat-template", "named", help="Train with one of llmforge's named chat templates.")
def train(config: Path, overrides: tuple[str, ...], resume: bool, named: str | None) -> None:
    """Fine-tune with LoRA/QLoRA SFT, or GRPO (train.method: grpo), from a YAML config."""
    from .trainer.run import train_from_config

    overrides = overrides + ((f"model.chat_template={named}",) if named else ())
    result = train_from_config(config, overrides=overrides, resume=resume)
    for line in result.summary_lines():
        echo_err(line)


@cli.command("train-and-ship")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--quant", "-q", default=None, help="Quant mixture for the export (default q4_k_m).")
@click.option("--demo-check", is_flag=True, help="After shipping, check the learned answers through llama.cpp.")
@device_option
@type_override_options
def train_and_ship(config: Path | None, settings: tuple[str, ...], quant: str | None, demo_check: bool,
                   overrides, backend: str) -> None:
    """Train -> merge -> quantize -> GGUF -> Modelfile -> push. Without CONFIG, runs the bundled example."""
    from .trainer.run import train_and_ship as run_train_and_ship

    result = run_train_and_ship(config, overrides=settings, quant=quant, demo_check=demo_check,
                                type_overrides=overrides, backend=backend)
    for line in result.summary_lines():
        echo_err(line)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="llmforge", standalone_mode=False)
    except LlmforgeError as exc:
        echo_err(f"error: {exc.one_line()}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        echo_err("aborted")
        sys.exit(130)
    except (BrokenProcessPool, MemoryError) as exc:   # a worker killed by the OOM killer, or this process
        what = "a worker process died" if isinstance(exc, BrokenProcessPool) else "out of memory"
        echo_err(f"error: {what} (killed for lack of memory?); nothing was written. "
                 "Free memory, or run on fewer cores (e.g. `taskset -c 0-3 llmforge ...`)")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
