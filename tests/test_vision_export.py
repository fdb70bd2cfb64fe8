"""Vision-language export (Gemma 3): ``llmforge convert VLM_DIR`` writes the text GGUF + the mmproj GGUF.

Oracles: llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist) on the same tiny model --
same tensor names, shapes, types and bytes, same ``clip.*`` keys; and llama.cpp's multimodal runtime (libmtmd)
running an image prompt, against transformers' Gemma3ForConditionalGeneration on the same image and tokens.

Tolerances (relative to the reference's largest magnitude): image embeddings and last-position logits
< 2e-3 for f32/f16 (ggml's CPU GELU goes through an f16 table, and llama.cpp's converter keeps the projector's
input projection in f16 for every output type), < 5e-2 for q8_0; greedy tokens identical for f32/f16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmforge.errors import LlmforgeError
from llmforge.export.convert import convert
from llmforge.export.vision import mmproj_path
from llmforge.trainer.vision_example import IMAGES_DIR, build_base_model
from cli_runner import run_cli
from test_export_anchor import extract_converter

QUESTION = "What colour is the square?"
# llama.cpp's converter recognises BPE pre-tokenizers by a hash of known vocabularies; the example's own small
# vocabulary uses GPT-2's pre-tokenizer, which is what it is told here
ANCHOR_RUNNER = """
import runpy, sys
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("tiny-gemma3-vlm") / "tiny-vlm")


@pytest.fixture(scope="module")
def exported(vlm_dir, tmp_path_factory):
    """quant -> (text GGUF, mmproj GGUF), converted once per quant."""
    out_dir, made = tmp_path_factory.mktemp("vlm-gguf"), {}

    def get(quant: str) -> tuple[Path, Path]:
        if quant not in made:
            text = out_dir / f"tiny-vlm-{quant}.gguf"
            convert(vlm_dir, text, quant)
            made[quant] = (text, mmproj_path(text))
        return made[quant]

    return get


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama.cpp")
    script = extract_converter(root)
    runner = root / "run_anchor.py"
    runner.write_text(ANCHOR_RUNNER)

    def run(model_dir: Path, out: Path, quant: str, mmproj: bool) -> Path:
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        args = [sys.executable, str(runner), str(script), str(model_dir), "--outtype", quant, "--outfile", str(out)]
        proc = subprocess.run(args + (["--mmproj"] if mmproj else []), env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out

    return run


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """({key: (type, value)}, {tensor: (shape, type, bytes)}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    kvs = {k: (f.types[0].name if f.types else None, f.contents()) for k, f in reader.fields.items()
           if not k.startswith("GGUF.")}
    tensors = {t.name: (t.shape.tolist(), t.tensor_type.name, t.data.tobytes()) for t in reader.tensors}
    return kvs, tensors


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_same_files_as_llama_cpp_converter(quant, vlm_dir, exported, anchor, tmp_path):
    text, proj = exported(quant)
    for ours, mmproj in ((proj, True), (text, False)):
        theirs = anchor(vlm_dir, tmp_path / f"anchor-{ours.name}", quant, mmproj)
        our_kvs, our_tensors = gguf_contents(ours)
        their_kvs, their_tensors = gguf_contents(theirs)
        assert sorted(our_tensors) == sorted(their_tensors)
        for name, (shape, qtype, data) in their_tensors.items():
            assert our_tensors[name][:2] == (shape, qtype), name
            assert our_tensors[name][2] == data, f"{name}: bytes differ"
        if mmproj:
            keys = [k for k in their_kvs if k.startswith("clip.") or k in (
                "general.architecture", "general.type", "general.file_type", "general.quantization_version")]
            assert {k: our_kvs.get(k) for k in keys} == {k: their_kvs[k] for k in keys}
            assert not {k for k in our_kvs if k.startswith("clip.")} - set(keys)
            assert our_kvs["clip.projector_type"][1] == "gemma3"
            assert our_kvs["clip.vision.projector.scale_factor"][1] == 2
        else:
            # the text model's architecture keys (llama.cpp also writes rope.freq_base_swa: 10000, its default)
            arch_keys = [k for k in their_kvs if k.startswith("gemma3.") and k != "gemma3.rope.freq_base_swa"]
            assert {k: our_kvs.get(k) for k in arch_keys} == {k: their_kvs[k] for k in arch_keys}


def hf_reference(vlm_dir: Path, image: Path, n: int):
    """transformers: (input ids, image features, last-position logits, n greedy ids) for one image question."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    from vision_mtmd import rgb_pixels

    model = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[rgb_pixels(image)], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits[0, -1]
        greedy = model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    return (inputs["input_ids"][0].tolist(), features.reshape(-1, features.shape[-1]).numpy(), logits.numpy(),
            greedy.tolist(), processor.tokenizer.convert_tokens_to_ids("<image_soft_token>"))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("quant,tol", [("f32", 2e-3), ("f16", 2e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_image_prompt_like_transformers(quant, tol, vlm_dir, exported):
    from llama_cpp import mtmd_cpp

    from vision_mtmd import generate, image_embeddings, rgb_pixels

    text, proj = exported(quant)
    image = IMAGES_DIR / "blue_1.png"
    ids, features, logits, greedy, image_token = hf_reference(vlm_dir, image, 8)
    embeddings = image_embeddings(text, proj, rgb_pixels(image))
    assert embeddings.shape == features.shape == (16, 64)
    assert rel(embeddings, features) < tol
    # Gemma 3's processor writes "\n\n<start_of_image>[image]<end_of_image>\n\n"; mtmd adds the two markers
    marker = mtmd_cpp.mtmd_default_marker().decode()
    prompt = f"<start_of_turn>user\n\n\n{marker}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    text_ids, last, new = generate(text, proj, prompt, [rgb_pixels(image)], 8)
    assert text_ids == [i for i in ids if i != image_token]   # same sequence around the 16 image positions
    assert rel(last, logits) < tol
    if quant != "q8_0":
        assert new == greedy


def test_cli_writes_text_and_projector(vlm_dir, tmp_path, capsys):
    out = tmp_path / "vlm.gguf"
    code, _, err = run_cli(["convert", str(vlm_dir), "-q", "q8_0", "-o", str(out)], capsys)
    assert code == 0, err
    assert out.is_file() and mmproj_path(out).is_file()
    assert "mmproj: wrote" in err + _


def test_a_failed_conversion_keeps_the_earlier_pair_whole(vlm_dir, tmp_path, capsys):
    """The text GGUF fails after the mmproj is written (here: an imatrix that is not one): the previous run's
    text GGUF and mmproj stay as they were, byte for byte, and nothing else is left in the folder."""
    out = tmp_path / "vlm.gguf"
    assert run_cli(["convert", str(vlm_dir), "-q", "q8_0", "-o", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "imatrix.dat").write_bytes(b"")
    code, _, err = run_cli(["convert", str(vlm_dir), "-q", "q4_k_m", "-o", str(out),
                            "--imatrix", str(tmp_path / "imatrix.dat")], capsys)
    assert code != 0 and err.startswith("error:") and err.strip().count("\n") == 0, err
    (tmp_path / "imatrix.dat").unlink()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_missing_processor_config_is_one_error_and_no_files(vlm_dir, tmp_path, capsys):
    broken = tmp_path / "no-processor"
    broken.mkdir()
    for f in vlm_dir.iterdir():
        if f.name != "processor_config.json":
            (broken / f.name).symlink_to(f)
    out = tmp_path / "out.gguf"
    with pytest.raises(LlmforgeError, match="processor_config.json"):
        convert(broken, out, "f16")
    code, _, err = run_cli(["convert", str(broken), "-o", str(out)], capsys)
    assert code != 0 and err.strip().count("\n") == 0 and "error:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-processor"]


def test_missing_tokenizer_names_the_model_folder_and_writes_nothing(vlm_dir, tmp_path, capsys):
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for f in vlm_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer.model"):
            (broken / f.name).symlink_to(f)
    out = tmp_path / "out.gguf"
    code, _, err = run_cli(["convert", str(broken), "-q", "q8_0", "-o", str(out)], capsys)
    assert code != 0 and err.strip().count("\n") == 0, err
    assert f"error: no tokenizer in {broken} " in err   # the user's folder, not the staged copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]


@pytest.mark.parametrize("layout", ["transformers5-save", "module-names"])
def test_checkpoint_layouts_give_the_same_tensors(layout, vlm_dir, exported, tmp_path):
    """transformers 5's save_pretrained writes ``vision_tower.*`` (no ``vision_model``; llama.cpp's converter
    cannot map it), state dicts use module names (``model.language_model.*``): same GGUF tensors as the published
    layout."""
    from safetensors.numpy import load_file, save_file

    renames = {"transformers5-save": (("vision_tower.vision_model.", "vision_tower."),),
               "module-names": (("vision_tower.vision_model.", "model.vision_tower."),
                                ("language_model.model.", "model.language_model."),
                                ("multi_modal_projector.", "model.multi_modal_projector."))}[layout]
    folder = tmp_path / "tiny-vlm"
    folder.mkdir()
    for f in vlm_dir.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).symlink_to(f)
    tensors = {}
    for name, value in load_file(str(vlm_dir / "model.safetensors")).items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"))
    ours = tmp_path / "layout.gguf"
    convert(folder, ours, "q8_0")
    for a, b in ((ours, exported("q8_0")[0]), (mmproj_path(ours), exported("q8_0")[1])):
        assert gguf_contents(a)[1] == gguf_contents(b)[1]
