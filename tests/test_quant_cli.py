"""``llmforge quants`` / ``llmforge quantize``: listing, a working requantization, and bad input (one line
``error: ...``, non-zero exit, no output file)."""

from __future__ import annotations

import numpy as np
import pytest

from llmforge.quant.imatrix import write_imatrix
from quant_oracle import nonfinite_gguf, synthetic_gguf
from cli_runner import run_cli as run


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture()
def f32_model(tmp_path):
    path = tmp_path / "model-f32.gguf"
    synthetic_gguf(path, 4, 8, 2, False, 256, 256)
    return path


def test_quants_lists_every_type_with_bits(capsys):
    code, out, _ = run(["quants"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names[:3] == ["q2_k", "q3_k_s", "q3_k_m"] and "q4_k_m" in names and "bf16" in names
    assert len(names) == 17 and all("bpw" in line for line in out.splitlines())


def test_quantize_writes_the_file(f32_model, tmp_path, capsys):
    out_path = tmp_path / "out.gguf"
    code, out, err = run(["quantize", str(f32_model), str(out_path), "--quant", "Q4_K_M"], capsys)
    assert code == 0, err
    assert out.strip() == str(out_path) and out_path.is_file() and "Q6_K" in err


def test_unknown_quant_lists_valid_names(f32_model, tmp_path, capsys):
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(f32_model), str(out_path), "-q", "q9_k"], capsys)
    assert_one_line_error(code, err, "q9_k", "q4_k_m", "bf16")
    assert not out_path.exists()


def test_already_quantized_input_is_refused(f32_model, tmp_path, capsys):
    q = tmp_path / "q.gguf"
    assert run(["quantize", str(f32_model), str(q), "-q", "q8_0"], capsys)[0] == 0
    code, _, err = run(["quantize", str(q), str(tmp_path / "again.gguf"), "-q", "q4_k_m"], capsys)
    assert_one_line_error(code, err, "already quantized")
    assert not (tmp_path / "again.gguf").exists()


def test_nan_tensor_is_refused_by_name(tmp_path, capsys):
    src = nonfinite_gguf(tmp_path / "nan.gguf", 4, {(1, 3): np.nan})
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(src), str(out_path), "-q", "q4_k_m"], capsys)
    assert_one_line_error(code, err, "blk.0.attn_k.weight", "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]   # no output, no temp file left


def test_imatrix_for_another_model_is_refused(f32_model, tmp_path, capsys):
    imatrix = write_imatrix(tmp_path / "other.gguf", {"blk.0.attn_q.weight": np.ones(4096, np.float32)})
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(f32_model), str(out_path), "-q", "q4_k_m", "--imatrix", str(imatrix)],
                       capsys)
    assert_one_line_error(code, err, "imatrix", "different model")
    assert not out_path.exists()


def test_dead_worker_is_one_line_and_no_output(f32_model, tmp_path, capsys, monkeypatch):
    """A pool helper killed mid-file (the OOM killer's usual victim) ends the command with one line and
    leaves no output (the writer's temporary file is removed); the next command forks a fresh pool."""
    import os
    import signal

    from llmforge.quant import file_tasks

    real = file_tasks.FilePacker.submit
    calls = []

    def killing(self, task):
        calls.append(task.name)
        if len(calls) == 3:
            for pid in list(self.pool._processes):
                os.kill(pid, signal.SIGKILL)
        return real(self, task)

    monkeypatch.setattr(file_tasks.FilePacker, "submit", killing)
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(f32_model), str(out_path), "-q", "q4_k_m"], capsys)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("writing "))  # progress lines
    assert_one_line_error(code, err, "worker process died", "nothing was written")
    assert len(calls) >= 3 and list(tmp_path.iterdir()) == [f32_model]
    monkeypatch.undo()
    assert run(["quantize", str(f32_model), str(out_path), "-q", "q4_k_m"], capsys)[0] == 0


def test_output_that_is_a_folder_is_refused_before_work(f32_model, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    code, _, err = run(["quantize", str(f32_model), str(folder), "-q", "q8_0"], capsys)
    assert_one_line_error(code, err, f"output {folder} is a folder")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model-f32.gguf", "out"]


@pytest.mark.parametrize("keep", [0, 10, 300, -1], ids=["empty", "magic only", "inside the header", "last byte"])
def test_truncated_input_is_one_line(f32_model, tmp_path, capsys, keep):
    data = f32_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    code, _, err = run(["quantize", str(cut), str(tmp_path / "out.gguf"), "-q", "q4_k_m"], capsys)
    fragment = "is truncated: tensor" if keep == -1 else "is not a readable GGUF file"
    assert_one_line_error(code, err, str(cut), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "model-f32.gguf"]


def test_inputs_of_the_wrong_kind_say_what_they_are(f32_model, tmp_path, capsys):
    """quantize of a folder, convert of a GGUF: one line that names the other command."""
    code, _, err = run(["quantize", str(tmp_path), str(tmp_path / "out.gguf"), "-q", "q8_0"], capsys)
    assert_one_line_error(code, err, f"input GGUF {tmp_path} is a folder", "llmforge convert")
    code, _, err = run(["convert", str(f32_model), "-q", "q8_0", "-o", str(tmp_path / "out.gguf")], capsys)
    assert_one_line_error(code, err, f"{f32_model} is a file, not a model folder", "llmforge quantize")
    assert list(tmp_path.iterdir()) == [f32_model]


def test_a_vision_projector_is_not_requantized(tmp_path, capsys):
    import gguf

    mmproj = tmp_path / "mmproj-model.gguf"
    w = gguf.GGUFWriter(mmproj, "clip")
    w.add_tensor("v.patch_embd.weight", np.ones((4, 256), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    code, _, err = run(["quantize", str(mmproj), str(tmp_path / "out.gguf"), "-q", "q8_0"], capsys)
    assert_one_line_error(code, err, "is a vision projector (mmproj)")
    assert list(tmp_path.iterdir()) == [mmproj]


def test_output_that_does_not_fit_is_one_line_and_no_temp_file(f32_model, tmp_path):
    """A real short write from the kernel (the file size limit stands in for a full disk: both end the
    tensor data's write() early), through the f16 path that writes the data through the writer itself."""
    import subprocess
    import sys

    out = tmp_path / "out.gguf"
    limit = f32_model.stat().st_size // 4
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from llmforge.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", script, "quantize", str(f32_model), str(out), "-q", "f16"],
                          capture_output=True, text=True, timeout=120)
    err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("writing "))
    assert_one_line_error(proc.returncode, err, f"file size limit reached while writing {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-f32.gguf"]
