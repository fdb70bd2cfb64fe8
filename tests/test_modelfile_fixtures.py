"""Modelfiles generated for every fixture tokenizer: they parse back with Ollama's rules, their TEMPLATE renders
(through the Go renderer, Ollama's engine) exactly as the translated template, and the assistant turn the
server renders ends with a declared stop.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import TOKENIZERS  # noqa: E402

from llmforge.templates.go_render import ollama_request, render_go_batch  # noqa: E402
from llmforge.templates.modelfile import (NUM_CTX_CAP, escape_go_template, modelfile_for_source,  # noqa: E402
                                          parse_modelfile)

FIXTURES = sorted(p.name for p in TOKENIZERS.iterdir() if (p / "tokenizer_config.json").is_file())
HISTORY = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "The answer is 42."},
           {"role": "user", "content": "Thanks"}]
CONVERSATIONS = [HISTORY[:1], [{"role": "system", "content": 'Be "brief".'}, *HISTORY]]


def model_folder(tmp_path: Path, fixture: str, context: int) -> Path:
    folder = tmp_path / fixture
    shutil.copytree(TOKENIZERS / fixture, folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
    (folder / "LICENSE").write_text('Licensed "AS IS".\nNo warranty.\n')
    return folder


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_modelfile_parses_back_renders_the_same_and_stops(tmp_path, fixture):
    folder = model_folder(tmp_path, fixture, context=131072)
    mf = modelfile_for_source(folder, from_="./model.gguf")
    back = parse_modelfile(mf.text)

    assert back.from_ == "./model.gguf"
    assert back.template == escape_go_template(mf.template)
    assert back.system == mf.system and back.license == mf.license == 'Licensed "AS IS".\nNo warranty.\n'
    assert back.parameters == mf.parameters and back.parameters["num_ctx"] == NUM_CTX_CAP
    assert mf.stops and back.stops == mf.stops

    jobs = []
    for conversation in [*CONVERSATIONS, HISTORY]:
        request = ollama_request(conversation)
        jobs += [(mf.template, request), (back.template, request)]
    results = render_go_batch(jobs)
    for original, carried in zip(results[::2], results[1::2]):
        assert original.error is None and carried == original
    history_render = results[-1].output
    after = history_render.split("The answer is 42.", 1)[1]
    assert any(after.lstrip().startswith(stop) for stop in back.stops), (after[:60], back.stops)


def test_an_untranslatable_template_still_gives_a_modelfile_with_a_note(tmp_path):
    folder = model_folder(tmp_path, "qwen2", context=4096)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}"  # unclosed for: a syntax error
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    mf = modelfile_for_source(folder, from_="./m.gguf")
    assert mf.template is None and any("no TEMPLATE written" in note for note in mf.notes)
    back = parse_modelfile(mf.text)
    assert back.template is None and back.parameters["num_ctx"] == 4096 and "<|endoftext|>" in back.stops


def test_small_context_is_kept_and_cli_writes_the_file(tmp_path, capsys):
    from llmforge.cli import main

    folder = model_folder(tmp_path, "qwen2", context=2048)
    out = tmp_path / "Modelfile"
    main(["modelfile", str(folder), "--from", "./q.gguf", "--adapter", "lora.gguf", "--system", "Be kind.",
          "--param", "temperature=0.3", "--param", "stop=###", "-o", str(out)])
    mf = parse_modelfile(out.read_text())
    assert mf.from_ == "./q.gguf" and mf.adapter == "lora.gguf" and mf.system == "Be kind."
    assert mf.parameters["num_ctx"] == 2048 and mf.parameters["temperature"] == 0.3
    assert mf.stops[-1] == "###" and "<|im_end|>" in mf.stops
    main(["modelfile", str(folder)])
    assert parse_modelfile(capsys.readouterr().out).template == mf.template


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    from llmforge.cli import main

    import gguf
    import numpy as np

    folder = model_folder(tmp_path, "qwen2", context=2048)
    mmproj = tmp_path / "mmproj-model.gguf"   # a vision model's projector, not a model of its own
    writer = gguf.GGUFWriter(str(mmproj), "clip")
    writer.add_tensor("v.patch_embd.weight", np.ones((4, 16), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for argv, message in ((["modelfile", str(tmp_path / "missing")], "does not exist"),
                          (["modelfile", str(folder), "--param", "bogus=1"], "unknown Modelfile parameter 'bogus'"),
                          (["modelfile", str(mmproj)], "is a vision projector (mmproj), not a model")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code != 0 and err.startswith("error: ") and message in err and err.count("\n") == 1
