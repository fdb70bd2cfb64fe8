"""Bad input: one clear line on stderr, non-zero exit, never a traceback; sandbox limits hold."""

from __future__ import annotations

import json
import shutil

import pytest

from llmforge.cli import main
from llmforge.errors import LlmforgeError
from llmforge.templates.jinja_render import render_jinja
from tiny_models import TOKENIZERS


def model_with_template(tmp_path, template: str | None):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_syntax_error_reports_line_and_column(tmp_path, capsys):
    folder = model_with_template(tmp_path, "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    code, out, err = run_cli(["template", str(folder)], capsys)
    assert code != 0 and out == ""
    assert err.startswith("error: chat template syntax error at line 2, column ") and err.count("\n") == 1


def test_undefined_function_is_named(tmp_path, capsys):
    folder = model_with_template(tmp_path, "{% for m in messages %}{{ shout(m.content) }}{% endfor %}")
    code, out, err = run_cli(["template", str(folder)], capsys)
    assert code != 0 and "undefined function `shout` at line 1" in err and err.count("\n") == 1


def test_missing_chat_template_suggests_a_named_one(tmp_path, capsys):
    folder = model_with_template(tmp_path, None)
    code, out, err = run_cli(["template", str(folder)], capsys)
    assert code != 0 and "no chat template" in err and "--chat-template NAME" in err and "chatml" in err


def test_named_template_replaces_a_missing_one(tmp_path, capsys):
    folder = model_with_template(tmp_path, None)
    from click.testing import CliRunner

    from llmforge.cli import cli

    result = CliRunner().invoke(cli, ["template", str(folder), "--chat-template", "chatml"])
    assert result.exit_code == 0 and result.stdout.startswith("{{") and "<|im_start|>" in result.stdout


def test_check_prints_a_table_and_passes(tmp_path):
    from click.testing import CliRunner

    from llmforge.cli import cli

    folder = tmp_path / "qwen2"
    shutil.copytree(TOKENIZERS / "qwen2", folder)
    result = CliRunner().invoke(cli, ["template", str(folder), "--check"])
    assert result.exit_code == 0, result.output
    assert "single_user" in result.stdout and "different 0" in result.stdout


def test_endless_loop_is_stopped_by_the_sandbox():
    template = "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}"
    with pytest.raises(LlmforgeError, match="exceeds|exceeded"):
        render_jinja(template, [{"role": "user", "content": "hi"}])


def test_huge_range_is_refused():
    with pytest.raises(LlmforgeError):
        render_jinja("{% for a in range(10**12) %}x{% endfor %}", [{"role": "user", "content": "hi"}])


def test_template_that_raises_is_reported_as_rejecting_the_input():
    from llmforge.templates.jinja_render import TemplateRaised

    with pytest.raises(TemplateRaised, match="no system"):
        render_jinja("{{ raise_exception('no system') }}", [{"role": "system", "content": "x"}])


def test_not_a_gguf_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"nope")
    code, out, err = run_cli(["template", str(bogus)], capsys)
    assert code != 0 and "not a GGUF" in err


def test_a_projector_or_a_truncated_gguf_is_one_line(tmp_path, capsys):
    """An mmproj has no chat template because it is not a model (not: pass --chat-template); a cut-off GGUF
    names the tensor that runs past its end (not gguf-py's numpy reshape message)."""
    import gguf
    import numpy as np

    for arch, name in (("clip", "mmproj-model.gguf"), ("llama", "model.gguf")):
        writer = gguf.GGUFWriter(str(tmp_path / name), arch)
        writer.add_chat_template("{{ messages[0].content }}")
        writer.add_tensor("v.patch_embd.weight", np.ones((4, 16), dtype=np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "model.gguf").read_bytes()[:-64])
    for path, message in ((tmp_path / "mmproj-model.gguf", "is a vision projector (mmproj), not a model"),
                          (cut, "cut.gguf is truncated: tensor v.patch_embd.weight needs")):
        for command in ("template", "modelfile"):
            code, _, err = run_cli([command, str(path)], capsys)
            assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("template, construct", [
    ("{% for m in messages %}{{ m.content | frobnicate }}{% endfor %}", "No filter named 'frobnicate'"),
    # jinja2 defers unknown names inside conditional blocks to render time; the translator names them too
    ("{% for m in messages %}{% if m.role is weird %}x{% endif %}{% endfor %}", "No test named 'weird'"),
    ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content | shout }}{% endif %}{% endfor %}",
     "No filter named 'shout'"),
])
def test_unknown_filter_or_test_is_one_line(tmp_path, capsys, template, construct):
    column = template.index(construct.split("'")[1]) + 1
    folder = model_with_template(tmp_path, template)
    code, out, err = run_cli(["template", str(folder)], capsys)
    assert code != 0 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: chat template error at line 1, column {column}: {construct}")
