"""Shared checks for the vision tests: merge -> convert equals adapter -> convert; ship to the fake Ollama server;
``--lora-only`` adapters of the text GGUF against the merge in llama.cpp."""

from __future__ import annotations

import io
import math
from pathlib import Path


def assert_ship_sends_the_projector(adapter_dir: Path, name: str, tmp_path: Path) -> None:
    """``ship`` of a VLM adapter: the text GGUF is the model layer, the mmproj goes as the projector (its digest),
    the Modelfile's second FROM names it, the push verifies the vision capability and the template's render."""
    from fake_ollama import FakeOllama
    from test_ollama_ship import FAST, go_renderer

    from llmforge.export.ollama import file_sha256
    from llmforge.export.vision import mmproj_path
    from llmforge.pipeline import ship
    from llmforge.templates.modelfile import parse_modelfile

    with FakeOllama(renderer=go_renderer) as server:
        report = ship(adapter_dir, name=name, quant="q8_0", output_dir=tmp_path / "ship", host=server.url,
                      timeouts=FAST, progress=io.StringIO())
        model = server.models[name]
        assert model["blob"].read_bytes() == report.gguf.read_bytes()   # the text model is the model layer
    projector = mmproj_path(report.gguf)
    mf = parse_modelfile(report.modelfile.read_text())
    assert (mf.from_, mf.projector) == (f"./{report.gguf.name}", f"./{projector.name}")
    assert report.push.projector_digest == file_sha256(projector)
    assert model["projectors"] == [report.push.projector_digest]
    assert "projector (vision capability)" in report.push.verified
    assert report.push.render_check == "server render equals the chat template"


def tensor_bytes(path: Path) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """{tensor: (shape, type, bytes)} of a GGUF file, from llmforge's header reader (``gguf.GGUFReader`` takes
    seconds per file decoding a 151,936-token vocabulary)."""
    from gguf.constants import GGML_QUANT_SIZES

    from llmforge.export.gguf_header import read_header

    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            block, type_size = GGML_QUANT_SIZES[t.qtype]
            f.seek(header.data_start + t.offset)
            out[t.name] = (t.shape, t.qtype, f.read(math.prod(t.shape) // block * type_size))
    return out


def assert_merge_converts_like_the_adapter(merged_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """The merged folder and the adapter convert (f32) to the same text GGUF and mmproj tensors."""
    from llmforge.export.convert import convert
    from llmforge.export.vision import mmproj_path

    from_merged, from_adapter = tmp_path / "m.gguf", tmp_path / "a.gguf"
    convert(merged_dir, from_merged, "f32")
    convert(adapter_dir, from_adapter, "f32")
    for a, b in ((from_merged, from_adapter), (mmproj_path(from_merged), mmproj_path(from_adapter))):
        ours = tensor_bytes(a)
        assert ours and ours == tensor_bytes(b)


LANGUAGE_MODEL_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def random_adapter(model_cls, model_dir: Path, out: Path, target_modules: str = LANGUAGE_MODEL_PROJECTIONS,
                   seed: int = 5) -> Path:
    """A PEFT LoRA adapter (r=4, alpha 8) with random factors on ``target_modules`` of the VLM in ``model_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_cls.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def assert_lora_only_runs_like_the_merge(adapter: Path, base_text_gguf: Path, arch: str, ids: list[int],
                                         tmp_path: Path) -> None:
    """``convert --lora-only`` writes a GGUF LoRA adapter of the text GGUF (architecture ``arch``, no mmproj);
    llama.cpp applying it to the base's text GGUF gives the merged text GGUF's logits (< 1e-4), which differ from
    the base's (the adapter matters)."""
    from adapter_helpers import llama_with_lora_logits
    from gguf import GGUFReader
    from oracles import llama_cpp_logits, rel_error

    from llmforge.export.convert import convert

    out = tmp_path / "lora-only"
    out.mkdir()
    lora, merged = out / "adapter.gguf", tmp_path / "merged.gguf"
    report = convert(adapter, lora, "f32", lora_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf"]   # no mmproj: the base's is unchanged
    assert any("its mmproj is unchanged" in c for c in report.checks), report.checks
    fields = GGUFReader(lora)
    assert fields.get_field("general.architecture").contents() == arch
    assert fields.get_field("general.type").contents() == "adapter"
    assert "blk.0.attn_q.weight.lora_a" in {t.name for t in fields.tensors}
    convert(adapter, merged, "f32")
    merged_logits = llama_cpp_logits(merged, ids)
    assert rel_error(llama_cpp_logits(base_text_gguf, ids), merged_logits) > 1e-2
    assert rel_error(llama_with_lora_logits(base_text_gguf, lora, ids), merged_logits) < 1e-4
