"""Streaming sources and the GGUF container: sharded == unsharded, header read-back, ``llmforge inspect``."""

from __future__ import annotations

import json

import pytest

from llmforge.cli import main
from llmforge.export.convert import convert_model
from llmforge.export.gguf_header import read_header
from llmforge.export.source import SafetensorsSource


def _data_section(path):
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(header.data_start)
        return header, f.read()


def test_sharded_converts_like_unsharded(tiny_model_dir, tmp_path):
    single = tiny_model_dir("mistral")
    sharded = tiny_model_dir("mistral", max_shard_size="40MB")
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) == 2 and not (sharded / "model.safetensors").exists()
    src = SafetensorsSource(sharded)
    assert sorted(src.names()) == sorted(SafetensorsSource(single).names())

    a, b = tmp_path / "single.gguf", tmp_path / "sharded.gguf"
    convert_model(single, a, "f32", name="tiny", progress=False)
    convert_model(sharded, b, "f32", name="tiny", progress=False)
    (ha, da), (hb, db) = _data_section(a), _data_section(b)
    for kv in (ha.kv, hb.kv):
        kv.pop("general.source.url")
    assert ha.kv == hb.kv
    assert ha.tensors == hb.tensors
    assert da == db


def test_gguf_reader_agrees_with_the_plan(tiny_model_dir, tmp_path):
    """gguf-py's own reader sees every tensor with the planned shape/type, and the declared metadata."""
    from gguf import GGMLQuantizationType, GGUFReader

    out = tmp_path / "m.gguf"
    report = convert_model(tiny_model_dir("mistral"), out, "q8_0", progress=False)
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == report.n_tensors
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    fields = reader.fields
    assert int(fields["general.file_type"].contents()) == 7          # MOSTLY_Q8_0
    assert int(fields["general.quantization_version"].contents()) == 2
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["llama.rope.dimension_count"].contents() == 64
    ours = read_header(out)
    assert [(t.name, t.shape, t.qtype) for t in ours.tensors] == \
        [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type)) for t in reader.tensors]


@pytest.fixture(scope="module")
def mistral_gguf(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "mistral-f16.gguf"
    convert_model(tiny_model_dir("mistral"), out, "f16", progress=False)
    return out


def test_inspect_text(mistral_gguf, capsys):
    main(["inspect", str(mistral_gguf)])
    out = capsys.readouterr().out
    assert "architecture:  llama" in out
    assert "file type:     F16" in out
    assert "tokenizer:     llama, 32000 tokens" in out
    assert "chat template: yes" in out


def test_inspect_json(mistral_gguf, capsys):
    from gguf import GGUFReader

    main(["inspect", "--json", str(mistral_gguf)])
    info = json.loads(capsys.readouterr().out)
    reader = GGUFReader(mistral_gguf)
    assert info["architecture"] == "llama"
    assert info["file_type"] == "F16"
    assert info["n_tensors"] == len(reader.tensors)
    assert info["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    hist = {}
    for t in reader.tensors:
        hist[t.tensor_type.name] = hist.get(t.tensor_type.name, 0) + 1
    assert info["tensor_types"] == hist
    assert info["tokenizer"]["n_tokens"] == 32000 and info["tokenizer"]["bos_id"] == 1
    assert info["chat_template"] is True and info["truncated"] is None


def test_inspect_flags_a_truncated_file(mistral_gguf, tmp_path, capsys):
    """The header of a cut-off copy still reads; inspect shows it and says which tensor is missing bytes."""
    from llmforge.export.gguf_header import read_header

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mistral_gguf.read_bytes()[:-4096])
    last = max(read_header(mistral_gguf).tensors, key=lambda t: t.offset).name
    for args in (["inspect", str(cut)], ["inspect", "--json", str(cut)]):
        with pytest.raises(SystemExit) as exc:   # the report, then one error line and a failing exit status
            main(args)
        assert exc.value.code != 0
        out, err = capsys.readouterr()
        assert err.startswith(f"error: {cut} is truncated: tensor {last} needs") and err.count("\n") == 1, err
        if "--json" in args:
            assert json.loads(out)["truncated"] == [last, mistral_gguf.stat().st_size]
        else:
            assert f"TRUNCATED:     tensor {last} needs {mistral_gguf.stat().st_size:,} bytes" in out


def test_inspect_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(bad)])
    assert exc.value.code != 0
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_convert_prints_path_and_summary(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    main(["convert", str(tiny_model_dir("mistral")), "--quant", "q8_0", "-o", str(out), "--name", "tiny-mistral"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "wrote" in captured.err and "read back" in captured.err
    assert read_header(out).kv["general.name"] == "tiny-mistral"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left beside it
