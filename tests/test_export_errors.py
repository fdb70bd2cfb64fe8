"""Bad input to ``llmforge convert``: one ``error:`` line, a non-zero exit, and no output file left behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from llmforge.cli import main


@pytest.fixture(scope="module")
def good_model(tiny_model_dir) -> Path:
    return tiny_model_dir("mistral")  # the smallest vocabulary (32k, SentencePiece)


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy whose weights are symlinks (cheap), minus ``skip``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def run_convert(capsys, model: Path, out: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(model), "--quant", "f16", "-o", str(out), *extra])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp file left behind"
    return errors[0]


def test_missing_config(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m", skip=("config.json",))
    assert "no config.json" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_malformed_config(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m")
    (model / "config.json").write_text('{"architectures": ["MistralForCausalLM"], ')
    assert "not valid JSON" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_config_missing_a_required_key(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    assert "hidden_size" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_unsupported_architecture_lists_supported(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FalconForCausalLM"], "falcon"
    (model / "config.json").write_text(json.dumps(config))
    line = run_convert(capsys, model, tmp_path / "out.gguf")
    assert "unsupported architecture FalconForCausalLM" in line
    for arch in ("LlamaForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in line


def test_missing_tokenizer(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m", skip=("tokenizer.json", "tokenizer.model"))
    assert "no tokenizer" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_truncated_safetensors(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m", skip=("model.safetensors",))
    data = (good_model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_corrupt_safetensors_header(good_model, tmp_path, capsys):
    model = copy_model(good_model, tmp_path / "m", skip=("model.safetensors",))
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    assert "not a valid safetensors file" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_missing_shard(tiny_model_dir, tmp_path, capsys):
    sharded = tiny_model_dir("mistral", max_shard_size="40MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    model = copy_model(sharded, tmp_path / "m", skip=(shards[-1],))
    assert f"shard {shards[-1]}" in run_convert(capsys, model, tmp_path / "out.gguf")


def test_output_in_missing_directory(good_model, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "out.gguf"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(good_model), "-o", str(out)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: output folder") and err.count("\n") == 1
    assert not out.parent.exists()


def test_no_disk_space_up_front(good_model, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    assert "not enough disk space" in run_convert(capsys, good_model, tmp_path / "out.gguf")


def test_disk_full_while_writing(good_model, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the tensor data: the half-written temp file is removed."""
    from llmforge.export import writer

    calls = {"n": 0}
    original = writer.StreamingGGUFWriter._write_chunk

    def failing(fout, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fout, chunk)

    monkeypatch.setattr(writer.StreamingGGUFWriter, "_write_chunk", staticmethod(failing))
    assert "no space left" in run_convert(capsys, good_model, tmp_path / "out.gguf")
    assert calls["n"] == 3


def test_config_from_another_model_is_refused(good_model, tmp_path, capsys):
    """intermediate_size that the weights do not have: the GGUF would convert but never load in llama.cpp."""
    import json

    model = copy_model(good_model, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 32
    (model / "config.json").write_text(json.dumps(config))
    line = run_convert(capsys, model, tmp_path / "out.gguf")
    assert f"intermediate_size = {config['intermediate_size']}, but blk.0.ffn_down.weight has rows of" in line


def test_unknown_quant(good_model, tmp_path, capsys):
    line = run_convert(capsys, good_model, tmp_path / "out.gguf", "--quant", "q9_9")
    assert "unknown quant type" in line


@pytest.mark.parametrize("quant", ["f16", "f32"])
def test_nan_weights_are_refused_with_the_tensor_name(good_model, tmp_path, capsys, quant):
    from safetensors.torch import load_file, save_file

    model = copy_model(good_model, tmp_path / "m", skip=("model.safetensors",))
    tensors = load_file(str(good_model / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit):
        main(["convert", str(model), "--quant", quant, "-o", str(tmp_path / "out.gguf")])
    err = capsys.readouterr().err
    assert "error: tensor 'blk.1.ffn_down.weight' holds 1 NaN/Inf value(s)" in err, err
    assert not (tmp_path / "out.gguf").exists()
