"""``--device auto|cpu|cuda`` on convert/quantize/ship/train-and-ship: where K-types are packed.

Without a GPU: ``--device cuda`` fails in one line before anything is written; ``cpu`` and ``auto`` write the
same bytes and never import torch; the torch backend (``backend="cpu"``: the CUDA path's routing, quantize_array
-> quantize_k_torch, with torch's CPU ops instead of the Triton kernels) writes the numpy path's bytes through
the converter, in-process and from the worker threads the GPU path uses. With an NVIDIA GPU:
``test_cuda_writes_the_cpu_bytes`` compares the files of --device cuda, cpu and auto and prints the times.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from adapter_helpers import copy_with_nan, make_adapter

from llmforge.errors import LlmforgeError
from llmforge.export import convert as convert_mod
from llmforge.export.convert import convert
from llmforge.export.parallel import ThreadWorkers
from llmforge.quant import api
from llmforge.quant.mixtures import type_overrides
from cli_runner import run_cli as run

ARCH = "mistral"  # the smallest vocabulary among the tiny models
NO_GPU = not os.path.exists("/dev/nvidiactl")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir(ARCH)
    folder, _ = make_adapter(base, tmp_path_factory.mktemp("device") / "adapter", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    return folder


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU")
@pytest.mark.parametrize("command", ["convert", "quantize", "ship", "train-and-ship"])
def test_device_cuda_without_a_gpu_is_one_line(tiny_model_dir, tmp_path, capsys, command):
    model = str(tiny_model_dir(ARCH))
    capsys.readouterr()   # the fixture's build output
    out = tmp_path / "out"
    argv = {"convert": ["convert", model, "-q", "q4_k_m", "-o", str(out)],
            "quantize": ["quantize", model, str(out), "-q", "q4_k_m"],
            "ship": ["ship", model, "--name", "x", "-o", str(out)],
            "train-and-ship": ["train-and-ship", "--set", f"train.output_dir={out}"]}[command]
    code, stdout, err = run([*argv, "--device", "cuda"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and stdout == "", err
    assert lines[0].startswith("error: --device cuda: no NVIDIA GPU found"), lines[0]
    assert "--device cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_refused():
    with pytest.raises(LlmforgeError, match="unknown K-quant backend 'tpu'"):
        api.resolve_backend("tpu")
    assert api.resolve_backend("numpy") == "numpy" and api.resolve_backend("CPU") == "cpu"


@pytest.mark.skipif(not NO_GPU, reason="auto picks the GPU here")
@pytest.mark.parametrize("source", ["model", "adapter"])
def test_cpu_and_auto_write_the_same_bytes_without_torch(tiny_model_dir, adapter, tmp_path, source):
    folder = tiny_model_dir(ARCH) if source == "model" else adapter
    script = textwrap.dedent("""
        import sys
        from llmforge.cli import main
        try:
            main(["convert", sys.argv[1], "-q", "q4_k_m", "-o", sys.argv[2], "--device", sys.argv[3]])
        except SystemExit as exc:
            assert not exc.code, exc.code
        print("torch" in sys.modules)
    """)
    written = {}
    for device in ("cpu", "auto"):
        out = tmp_path / f"{device}.gguf"
        proc = subprocess.run([sys.executable, "-c", script, str(folder), str(out), device],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == "False", f"--device {device} imported torch"
        assert "K-quants on" not in proc.stderr     # the numpy path
        written[device] = out.read_bytes()
    assert written["cpu"] == written["auto"]


# every K type on the layer tensors; the 32000-row embeddings in Q8_0 (the torch CPU path is slow there)
EVERY_K_TYPE = type_overrides(output_tensor_type="q8_0", token_embedding_type="q8_0",
                              tensor_types=["attn_q=q2_k", "attn_k=q3_k", "attn_v=q5_k", "ffn_down=q6_k"])


@pytest.fixture
def one_torch_thread():
    """The torch CPU path's many small ops: intra-op threads only contend on a shared 2-core machine (measured
    0.65 s with one thread, 12-21 s with two, for the same conversion)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _threads(monkeypatch) -> None:
    """The GPU path's pool (worker threads, in-place writes, primed jobs) around the torch CPU packing."""
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 1 << 14)    # several row blocks per large tensor
    monkeypatch.setattr(convert_mod, "_start_workers",
                        lambda jobs, total, threads, backend: ThreadWorkers(jobs.run_in_worker, 3))


@pytest.mark.parametrize("source", ["model", "adapter"])
@pytest.mark.parametrize("pool", ["inline", "threads"])
def test_torch_backend_writes_the_numpy_bytes(tiny_model_dir, adapter, tmp_path, monkeypatch, one_torch_thread,
                                              source, pool):
    folder = tiny_model_dir(ARCH) if source == "model" else adapter
    numpy_out, torch_out = tmp_path / "numpy.gguf", tmp_path / "torch.gguf"
    plain = convert(folder, numpy_out, "q4_k_m", overrides=EVERY_K_TYPE, backend="numpy")
    if pool == "threads":
        _threads(monkeypatch)
    report = convert(folder, torch_out, "q4_k_m", overrides=EVERY_K_TYPE, backend="cpu")
    assert report.backend == "cpu" and plain.backend == "numpy"
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"} <= set(report.type_counts), report.type_counts
    assert torch_out.read_bytes() == numpy_out.read_bytes()


def test_a_nan_in_a_worker_thread_fails_with_the_tensor_name(tiny_model_dir, tmp_path, monkeypatch):
    broken = copy_with_nan(tiny_model_dir(ARCH), tmp_path / "base", "model.layers.1.mlp.up_proj.weight", (5, 2))
    _threads(monkeypatch)
    out = tmp_path / "out.gguf"
    with pytest.raises(LlmforgeError, match=r"blk\.1\.ffn_up\.weight' holds 1 NaN"):
        convert(broken, out, "q8_0", backend="cpu")
    assert not out.exists()


# ---------------------------------------------------------------- on an NVIDIA GPU (skipped elsewhere)

# a ~0.4B Llama whose rows are all multiples of 256 (every 2-D weight takes the K-type path): hidden 1024,
# 24 layers, GQA 16/4, a 151936-token vocabulary (the bundled tokenizer, padded) tied to the output
HALF_B = dict(model_type="llama", vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=4096,
              rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=2, pad_token_id=0)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build_half_b(out):
    """The HALF_B model in bf16 safetensors with the bundled tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmforge.trainer.example import TOKENIZER_DIR

    values = dict(HALF_B)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _random_adapter(base, out, r: int = 16):
    """A PEFT-layout LoRA adapter (rank ``r`` on every linear module) with random factors, written directly."""
    import json

    import torch
    from safetensors.torch import save_file

    from llmforge.export.source import SafetensorsSource

    source = SafetensorsSource(base)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name in source.names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            rows, cols = source.shape(name)
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, cols, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * 0.02
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=r, lora_alpha=2 * r, target_modules=list(LORA_TARGETS),
        base_model_name_or_path=str(base))))
    return out


def _cli_convert(source, out, quant, device) -> tuple[float, str]:
    """``llmforge convert`` in its own process, as a user runs it: (wall seconds, its 'wrote' line)."""
    import time

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmforge.cli", "convert", str(source), "-q", quant, "-o", str(out),
                           "--device", device], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrote = next(line for line in proc.stderr.splitlines() if line.startswith("wrote "))
    return time.perf_counter() - started, wrote


@pytest.mark.skipif(api.auto_backend() != "cuda", reason="needs an NVIDIA GPU, CUDA torch and Triton")
def test_cuda_writes_the_cpu_bytes(tmp_path):
    """Every K type on the tiny example model in-process (one with importance weights), then the ~0.4B model
    and a rank-16 adapter on it through the CLI: --device cuda, cpu and auto must write the same file. Prints
    the times (the CLI runs find the Triton kernels compiled by the in-process runs, in Triton's cache)."""
    import time


    from llmforge.trainer.example import build_base_model

    lines = []
    tiny = build_base_model(tmp_path / "tiny")
    for quant in ("q2_k", "q3_k_m"):   # between them Q2_K, Q3_K, Q4_K, Q5_K and Q6_K
        files = {}
        for backend in ("numpy", "cuda"):
            files[backend] = tmp_path / f"tiny-{quant}-{backend}.gguf"
            report = convert(tiny, files[backend], quant, backend=backend)
        assert report.backend == "cuda"
        assert files["cuda"].read_bytes() == files["numpy"].read_bytes(), quant
    rng = np.random.default_rng(0)
    imatrix = {f"blk.{i}.{t}.weight": rng.gamma(2.0, 1.0, 512 if t == "ffn_down" else 256).astype(np.float32)
               for i in range(4) for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                           "ffn_down")}
    for backend in ("numpy", "cuda"):
        convert(tiny, tmp_path / f"tiny-imatrix-{backend}.gguf", "q3_k_m", imatrix=imatrix, backend=backend)
    assert (tmp_path / "tiny-imatrix-cuda.gguf").read_bytes() == (tmp_path / "tiny-imatrix-numpy.gguf").read_bytes()
    lines.append("tiny example: q2_k, q3_k_m, q3_k_m + imatrix: cuda == numpy bytes")

    started = time.perf_counter()
    model = _build_half_b(tmp_path / "half-b")
    adapter = _random_adapter(model, tmp_path / "adapter")
    lines.append(f"built the 0.4B model + adapter in {time.perf_counter() - started:.1f}s")
    for label, source in (("model", model), ("adapter", adapter)):
        outs = {}
        for device in ("cuda", "cpu", "auto"):
            out = tmp_path / f"{label}-{device}.gguf"
            seconds, wrote = _cli_convert(source, out, "q4_k_m", device)
            lines.append(f"{label:<7} q4_k_m --device {device:<4}: {seconds:6.1f}s wall | {wrote}")
            assert ("K-quants on cuda" in wrote) == (device != "cpu"), wrote
            outs[device] = out.read_bytes()
        for device in ("cuda", "auto"):
            if outs[device] != outs["cpu"]:
                lines.append(f"{label}: --device {device} differs from cpu in "
                             + _differing_tensors(tmp_path / f"{label}-{device}.gguf", tmp_path / f"{label}-cpu.gguf"))
                _report(lines)
        assert outs["cuda"] == outs["cpu"] == outs["auto"], f"{label}: --device cuda, cpu and auto differ: {lines[-1]}"
        lines.append(f"{label:<7} q4_k_m: cuda == cpu == auto bytes ({len(outs['cpu']) / 2**20:.1f} MiB)")
    _report(lines)


def _differing_tensors(a, b) -> str:
    """Which tensors of two GGUF files differ, and in how many rows (for the failure message)."""
    from gguf import GGUFReader

    theirs = {t.name: np.asarray(t.data) for t in GGUFReader(b).tensors}
    found = []
    for t in GGUFReader(a).tensors:
        mine, other = np.asarray(t.data), theirs.get(t.name)
        if other is None or mine.shape != other.shape:
            found.append(f"{t.name} (shape or presence)")
        elif not np.array_equal(mine, other):
            rows = np.count_nonzero((mine.reshape(mine.shape[0], -1) != other.reshape(other.shape[0], -1)).any(axis=1))
            found.append(f"{t.name} {t.tensor_type.name} ({rows} of {mine.shape[0]} rows)")
    return ", ".join(found) or "metadata only"


def _report(lines: list[str]) -> None:
    """Print the GPU run's report, and keep it in $OUT/convert_gpu.txt when the device tool runs the test."""
    report = "\n".join(lines)
    print("\n" + report)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "convert_gpu.txt"), "w") as f:
            f.write(report + "\n")
