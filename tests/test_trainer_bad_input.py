"""Bad input to `llmforge train`: one `error:` line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmforge.cli import main
from llmforge.trainer.config import load_config
from llmforge.trainer.data import normalise
from llmforge.trainer.encode import encode_all
from llmforge.trainer.example import build_base_model
from llmforge.trainer.load import load_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "model")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return exc.value.code, err


def write_config(tmp_path: Path, base: Path, data: Path, **sections) -> Path:
    config = {"model": {"path": str(base), "load_in_4bit": False, "max_seq_length": 64},
              "data": {"path": str(data)}, "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    path = tmp_path / "train.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_column(tmp_path: Path, base: Path, capsys) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    code, err = run_cli(["train", str(write_config(tmp_path, base, data))], capsys)
    assert_one_line_error(code, err, "row 2", "output")
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("part,kind", [({"type": "image_url", "image_url": {"url": "a.png"}}, "'image_url'"),
                                       ({"type": "video", "video": "a.mp4"}, "'video'"),
                                       ("just text", "None"), ({"type": "text"}, None),
                                       ({"type": "text", "text": 5}, None)],
                         ids=["openai image_url", "video", "not a dict", "text part without text", "text not a string"])
def test_content_parts_other_than_text_and_image(tmp_path: Path, base: Path, capsys, part, kind) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, part]},
                          {"role": "assistant", "content": "ok"}]}]
    code, err = run_cli(["train", str(write_config(tmp_path, base, jsonl(tmp_path / "d.jsonl", rows)))], capsys)
    assert_one_line_error(code, err, "row 2", f"a user message has a content part of type {kind}" if kind
                          else "a text part of a user message has no 'text' string")


def test_data_that_is_not_utf8_names_the_line(tmp_path: Path, base: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_bytes(good.encode() + b"\n" + good.replace("yo", "caf\u00e9").encode("latin-1") + b"\n")
    code, err = run_cli(["train", str(write_config(tmp_path, base, data))], capsys)
    assert_one_line_error(code, err, "d.jsonl line 2 is not UTF-8 text (byte 0xe9)", "re-save the file as UTF-8")


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    from llmforge.trainer.data import load_examples

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    for name, text in (("d.jsonl", json.dumps(row) + "\n"), ("d.json", json.dumps([row]))):
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        assert load_examples(str(tmp_path / name), "auto")[1][0].messages == row["messages"]


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path: Path, base: Path, capsys) -> None:
    import shutil

    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    path = write_config(tmp_path, base, data, model={"path": str(broken)})
    code, err = run_cli(["train", str(path)], capsys)
    assert_one_line_error(code, err, f"the weights in {broken} do not fit its config.json")


def test_empty_dataset(tmp_path: Path, base: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n")
    code, err = run_cli(["train", str(write_config(tmp_path, base, data))], capsys)
    assert_one_line_error(code, err, "empty")


def test_unknown_columns(tmp_path: Path, base: Path, capsys) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    code, err = run_cli(["train", str(write_config(tmp_path, base, data))], capsys)
    assert_one_line_error(code, err, "cannot tell the data format")


def test_row_the_template_rejects_is_reported(tmp_path: Path, base: Path, capsys) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "x"}]}]
    data = jsonl(tmp_path / "d.jsonl", rows)
    strict = "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}" \
             "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}" \
             "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    (tmp_path / "strict").mkdir()
    for f in base.iterdir():
        (tmp_path / "strict" / f.name).write_bytes(f.read_bytes())
    cfg_path = tmp_path / "strict" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = strict
    cfg_path.write_text(json.dumps(cfg))
    code, err = run_cli(["train", str(write_config(tmp_path, tmp_path / "strict", data))], capsys)
    assert_one_line_error(code, err, "row 2", "rejects", "alternate")


def test_overlong_sequences_truncated_or_dropped_with_a_count(base: Path, capsys) -> None:
    tokenizer = load_tokenizer(base)
    long = " ".join(["capital"] * 200)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "short"}]}]
    _, examples = normalise(rows)
    kept, stats = encode_all(examples, tokenizer, tokenizer.chat_template, 32, overlong="truncate")
    assert stats.truncated == 1 and len(kept) == 2 and max(len(e.input_ids) for e in kept) == 32
    assert "1 sequences longer than 32 tokens were truncated" in capsys.readouterr().err
    kept, stats = encode_all(examples, tokenizer, tokenizer.chat_template, 32, overlong="drop")
    assert stats.dropped == 1 and len(kept) == 1
    assert "were dropped" in capsys.readouterr().err


def test_truncation_that_leaves_no_reply_is_counted(base: Path, capsys) -> None:
    tokenizer = load_tokenizer(base)
    rows = [{"messages": [{"role": "user", "content": " ".join(["capital"] * 100)},
                          {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "short"}]}]
    _, examples = normalise(rows)
    kept, stats = encode_all(examples, tokenizer, tokenizer.chat_template, 16)
    assert stats.no_trainable == 1 and len(kept) == 1
    assert "no trainable tokens" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_nonroot(tmp_path: Path, base: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    path = write_config(tmp_path, base, data, train={"output_dir": str(locked / "out")})
    code, err = run_cli(["train", str(path)], capsys)
    assert_one_line_error(code, err, "output folder")


def test_output_folder_under_a_file(tmp_path: Path, base: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    path = write_config(tmp_path, base, data, train={"output_dir": str(blocker / "out")})
    code, err = run_cli(["train", str(path)], capsys)
    assert_one_line_error(code, err, "output folder")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("override,needles", [
    ("train.lrr=0.1", ("unknown config key", "train.lr", "(from --set)")),
    ("train.lr=fast", ("train.lr must be a number", "(from --set train.lr)")),
    ("train.max_steps=1.5", ("train.max_steps must be an integer", "(from --set train.max_steps)")),
    ("data.overlong=cut", ("must be one of truncate, drop", "(from --set data.overlong)")),
    ("train.offload_embeddings=maybe", ("must be one of auto, on, off", "(from --set train.offload_embeddings)")),
    ("nosection=1", ("section.key",)),
])
def test_config_mistakes(tmp_path: Path, base: Path, capsys, override: str, needles: tuple[str, ...]) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    code, err = run_cli(["train", str(write_config(tmp_path, base, data)), "--set", override], capsys)
    assert_one_line_error(code, err, *needles)
    assert "train.yaml" not in err   # the value came from --set, not from the file


def test_a_bad_value_in_the_file_names_the_file(tmp_path: Path, base: Path, capsys) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    path = write_config(tmp_path, base, data, train={"offload_embeddings": "maybe"})
    code, err = run_cli(["train", str(path), "--set", "train.lr=1e-4"], capsys)
    assert_one_line_error(code, err, "must be one of auto, on, off", f"(in {path})")


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    from llmforge.errors import LlmforgeError

    with pytest.raises(LlmforgeError, match="unknown config key 'lora.rank'.*known keys: r, alpha"):
        load_config(path)


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    from llmforge.errors import LlmforgeError

    with pytest.raises(LlmforgeError, match="is a folder"):
        load_config(tmp_path)


def test_config_file_encoding(tmp_path: Path) -> None:
    """Latin-1 bytes are one error naming the line; a UTF-8 byte-order mark is read past."""
    from llmforge.errors import LlmforgeError

    path = tmp_path / "c.yaml"
    path.write_bytes(b"lora:\n  r: 8\nship:\n  name: caf\xe9\n")
    with pytest.raises(LlmforgeError, match=r"c.yaml line 4 is not UTF-8 text \(byte 0xe9\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbflora:\n  r: 8\n")
    assert load_config(path).lora.r == 8


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: d.jsonl\nlora:\n  target_modules: [q_proj, v_proj]\n")
    config = load_config(path, ["train.lr=1e-4"])
    assert config.data.path == str(tmp_path / "d.jsonl")
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.train.lr == 1e-4


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the note is for runs without CUDA")
def test_offload_on_without_cuda_says_it_is_not_applied(tmp_path: Path, base: Path, capsys) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    config = write_config(tmp_path, base, jsonl(tmp_path / "d.jsonl", rows), train={"offload_embeddings": "on"})
    main(["train", str(config)])
    assert "note: train.offload_embeddings: on is not applied (no CUDA device" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path, base: Path, monkeypatch) -> None:
    import torch

    from llmforge.errors import LlmforgeError
    from llmforge.trainer import sft
    from llmforge.trainer.run import train

    real = sft.summed_loss

    def poisoned(model, batch):
        return real(model, batch) * torch.tensor(float("nan"))

    monkeypatch.setattr(sft, "summed_loss", poisoned)
    data = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}] * 4)
    config = load_config(write_config(tmp_path, base, data))
    with pytest.raises(LlmforgeError, match="training loss became nan at step 1"):
        train(config)
    assert not (tmp_path / "out" / "adapter").exists()


def model_with_unembedded_tokens(base: Path, target: Path) -> Path:
    """A copy of ``base`` whose tokenizer has 20 added tokens past the model's 512 embedding rows (not resized)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(base, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_tokens([f"<added{i}>" for i in range(20)])
    tokenizer.save_pretrained(target)
    assert len(tokenizer) > 512
    return target


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_a_token_the_model_has_no_embedding_for(tmp_path: Path, base: Path, capsys, method: str) -> None:
    """Without the check this is an IndexError traceback mid-step on the CPU (a device-side assert on a GPU)."""
    model = model_with_unembedded_tokens(base, tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "say <added19>"}, {"role": "assistant", "content": "ok"}]}]
    extra = {"train": {"method": "grpo", "batch_size": 2}, "grpo": {"num_generations": 2, "max_completion_length": 2,
                                                                         "rewards": [{"name": "exact_match"}]}} \
        if method == "grpo" else {}
    config = write_config(tmp_path, model, jsonl(tmp_path / "d.jsonl", rows), **extra)
    code, err = run_cli(["train", str(config)], capsys)
    assert_one_line_error(code, err, "row 2", "'<added19>'", "512 rows", "resize")
    assert not (tmp_path / "out" / "adapter").exists()
