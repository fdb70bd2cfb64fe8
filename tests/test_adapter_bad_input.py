"""Bad adapter input: one ``error:`` line, non-zero exit, no output file (through the CLI's ``main``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from adapter_helpers import load_f32, make_adapter
from safetensors.torch import load_file, save_file

from llmforge.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(tiny_model_dir("mistral"), out, r=2, lora_alpha=4,
                 target_modules=["q_proj", "gate_proj", "embed_tokens"])
    return out


@pytest.fixture(scope="module")
def other_base(tiny_model_dir) -> Path:
    """A mistral whose MLP and vocabulary differ from the adapter's base."""
    return tiny_model_dir("mistral", intermediate_size=768, vocab_size=32100)


def copy_adapter(src: Path, dst: Path, *, config: dict | None = None, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        data.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if drop:
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if drop not in k}, dst / "adapter_model.safetensors")
    return dst


def check_convert_fails(adapter: Path, tmp_path: Path, capsys, *needles: str, extra: list[str] = ()) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    for args in (["convert", str(adapter), "-q", "f16", "-o", str(out_dir / "m.gguf"), *extra],
                 ["convert", str(adapter), "--lora-only", "-o", str(out_dir / "a.gguf"), *extra],
                 ["merge", str(adapter), "-o", str(out_dir / "merged"), *extra]):
        code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, *needles)
        assert list(out_dir.iterdir()) == [], args   # no output, no temp leftovers


def test_shape_mismatch(good_adapter, other_base, tmp_path, capsys):
    adapter = copy_adapter(good_adapter, tmp_path / "a", drop="embed_tokens")
    check_convert_fails(adapter, tmp_path, capsys, "gate_proj", "--base", extra=["--base", str(other_base)])


def test_different_vocab_without_resize_info(good_adapter, other_base, tmp_path, capsys):
    adapter = copy_adapter(good_adapter, tmp_path / "a", drop="base_layer")
    data = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in data.items() if "embed" in k}, adapter / "adapter_model.safetensors")
    check_convert_fails(adapter, tmp_path, capsys, "different vocabulary", extra=["--base", str(other_base)])


def test_missing_modules(good_adapter, tiny_model_dir, tmp_path, capsys):
    check_convert_fails(good_adapter, tmp_path, capsys, "(and 3 more)", "does not have",
                        extra=["--base", str(tiny_model_dir("phi3"))])


def test_missing_base_says_what_to_pass(good_adapter, tmp_path, capsys):
    adapter = copy_adapter(good_adapter, tmp_path / "a", config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    check_convert_fails(adapter, tmp_path, capsys, "meta-llama/Llama-3.2-1B", "--base /path/to/Llama-3.2-1B")
    no_name = copy_adapter(good_adapter, tmp_path / "b", config={"base_model_name_or_path": None})
    check_convert_fails(no_name, tmp_path, capsys, "--base")


def test_base_option_not_a_model(good_adapter, tmp_path, capsys):
    check_convert_fails(good_adapter, tmp_path, capsys, "not a model folder", extra=["--base", str(tmp_path)])


def test_ia3_and_prompt_tuning_refused(tiny_model_dir, tmp_path, capsys):
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    base = tiny_model_dir("mistral")
    for name, cfg in (("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
                      ("pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))):
        get_peft_model(load_f32(base), cfg).save_pretrained(tmp_path / name)
    check_convert_fails(tmp_path / "ia3", tmp_path, capsys, "IA3")
    check_convert_fails(tmp_path / "pt", tmp_path, capsys, "PROMPT_TUNING")


def test_corrupt_weights(good_adapter, tmp_path, capsys):
    truncated = copy_adapter(good_adapter, tmp_path / "t")
    f = truncated / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    check_convert_fails(truncated, tmp_path, capsys, "truncated")

    garbage = copy_adapter(good_adapter, tmp_path / "g")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    check_convert_fails(garbage, tmp_path, capsys, "not a valid safetensors")

    nan = copy_adapter(good_adapter, tmp_path / "n")
    tensors = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, nan / "adapter_model.safetensors")
    check_convert_fails(nan, tmp_path, capsys, "NaN")

    wrong_rank = copy_adapter(good_adapter, tmp_path / "r", config={"r": 8})
    check_convert_fails(wrong_rank, tmp_path, capsys, "rank 8")


def test_pickle_and_missing_files(good_adapter, tmp_path, capsys):
    pickled = copy_adapter(good_adapter, tmp_path / "p")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    check_convert_fails(pickled, tmp_path, capsys, "adapter_model.bin", "safe_serialization")
    code, err = run_cli(["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, err, "does not exist")
    bad_json = copy_adapter(good_adapter, tmp_path / "j")
    (bad_json / "adapter_config.json").write_text("{not json")
    check_convert_fails(bad_json, tmp_path, capsys, "not valid JSON")


def test_other_quantized_bases_refused(good_adapter, tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "gptq-base"
    shutil.copytree(tiny_model_dir("mistral"), base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    check_convert_fails(good_adapter, tmp_path, capsys, "quantized (gptq)", extra=["--base", str(base)])


def test_outputs_of_the_wrong_kind_are_refused_and_left_alone(good_adapter, tmp_path, capsys):
    """merge -o onto an existing file, convert -o onto an existing folder: one line, the file or folder
    untouched (merge had replaced the file with the merged folder, leaving .NAME.old beside it)."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code, err = run_cli(["merge", str(good_adapter), "-o", str(existing)], capsys)
    assert_one_line_error(code, err, f"output {existing} is a file, not a folder")
    folder = tmp_path / "models"
    folder.mkdir()
    code, err = run_cli(["convert", str(good_adapter), "-q", "f16", "-o", str(folder)], capsys)
    assert_one_line_error(code, err, f"output {folder} is a folder")
    assert existing.read_text() == "keep me" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "notes.txt"]
