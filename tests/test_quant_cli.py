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
