"""Template sources: model folder, PEFT adapter folder (its own template wins), GGUF; and the Jinja renderer
agrees with transformers' own apply_chat_template renderer (the oracle)."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from llmforge.templates.jinja_render import render_jinja
from llmforge.templates.source import load_template_source
from templates_support import JINJA_DIR, tokens_for
from tiny_models import TOKENIZERS


@pytest.fixture
def qwen_folder(tmp_path):
    folder = tmp_path / "qwen"
    shutil.copytree(TOKENIZERS / "qwen2", folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    (folder / "LICENSE").write_text("Apache License 2.0\n")
    return folder


def test_model_folder(qwen_folder):
    source = load_template_source(qwen_folder)
    config = json.loads((qwen_folder / "tokenizer_config.json").read_text())
    assert source.chat_template == config["chat_template"]
    eos = config["eos_token"]
    assert source.special_tokens["eos_token"] == (eos["content"] if isinstance(eos, dict) else eos)
    assert source.context_length == 32768
    assert source.license_text.startswith("Apache")


def test_adapter_folder_prefers_its_own_template(qwen_folder, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(qwen_folder)}))
    inherited = load_template_source(adapter)
    assert inherited.chat_template == load_template_source(qwen_folder).chat_template
    assert inherited.context_length == 32768
    (adapter / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert load_template_source(adapter).chat_template == "{{ messages[0].content }}"


def test_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "hi"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = load_template_source(path)
    assert source.chat_template.startswith("{{ bos_token }}")
    assert source.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert source.context_length == 4096 and source.eos_tokens == ["</s>"]


@pytest.mark.parametrize("name", ["qwen2.5-instruct-tools.jinja", "llama3.1-instruct-tools.jinja",
                                  "gemma3-it.jinja", "deepseek-r1.jinja", "mistral-v3-tekken-nemo-tools.jinja"])
def test_jinja_renderer_matches_transformers(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    from llmforge.templates.check import load_conversations

    template = (JINJA_DIR / name).read_text()
    tokens = tokens_for(name)
    for case in load_conversations():
        try:
            ours = render_jinja(template, case["messages"], tools=case.get("tools"), special_tokens=tokens)
        except Exception:
            with pytest.raises(Exception):
                render_jinja_template([case["messages"]], tools=case.get("tools"), chat_template=template,
                                      add_generation_prompt=True, **tokens)
            continue
        (theirs,), _ = render_jinja_template([case["messages"]], tools=case.get("tools"), chat_template=template,
                                             add_generation_prompt=True, **tokens)
        assert ours == theirs, (name, case["name"])
