"""llama-quantize's per-tensor overrides (--pure, --leave-output-tensor, --output-tensor-type,
--token-embedding-type, --tensor-type REGEX=TYPE, --tensor-type-file) against llama.cpp itself.

Oracle: ``llama_model_quantize`` (llama-cpp-python 0.3.36) with the same ``pure``/``quantize_output_tensor``/
``output_tensor_type``/``token_embedding_type`` and its ``tt_overrides`` array (the C struct llama-quantize
fills from ``--tensor-type`` and ``--tensor-type-file``, lower-cased patterns and all). 1. Synthetic headers
(a few rows per tensor) exercise the rules cheaply through ``llmforge quantize``: first match wins, a match
leaves llama.cpp's attn_v/ffn counters alone, ragged rows take the fallback, a tied embedding follows
--output-tensor-type, --leave-output-tensor beats every other option for output.weight. 2. The tiny
mistral (untied) and qwen2 (tied) models go through ``convert`` with q4_k_m and q3_k_m. Types and bytes of
every tensor must equal llama.cpp's. 3. Bad input: one ``error:`` line, non-zero exit, no output file.
"""

from __future__ import annotations

import ctypes
import math
import struct
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from llmforge.errors import LlmforgeError
from llmforge.export.convert import convert
from llmforge.quant import mixtures
from llmforge.quant.api import resolve_ftype
from llmforge.quant.requantize import quantize_gguf
from quant_oracle import gguf_tensors, synthetic_gguf
from cli_runner import run_cli as run


def llama_quantize(src: Path, dst: Path, quant: str, ov: mixtures.TypeOverrides) -> None:
    """``llama_model_quantize`` with the overrides set the way llama-quantize sets them."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = int(resolve_ftype(quant).file_type)
    params.pure = ov.pure
    params.quantize_output_tensor = not ov.leave_output
    if ov.output_type is not None:
        params.output_tensor_type = int(ov.output_type)
    if ov.token_embd_type is not None:
        params.token_embedding_type = int(ov.token_embd_type)
    rules = (llama_cpp.llama_model_tensor_override * (len(ov.tensor_types) + 1))()
    for i, (regex, qtype) in enumerate(ov.tensor_types):
        rules[i].pattern = regex.pattern.encode()
        rules[i].type = int(qtype)
    rules[len(ov.tensor_types)].pattern = None
    if ov.tensor_types:
        params.tt_overrides = rules
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src}")


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_bytes(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (ggml type id, raw bytes), reading only what it needs: gguf's reader takes ~9 s on the
    152k-token vocabulary of a tiny qwen2 file."""
    from gguf.constants import GGML_QUANT_SIZES

    data = path.read_bytes()
    pos = 24
    _, _, n_tensors, n_kv = struct.unpack_from("<IIQQ", data, 0)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos].decode()

    def skip(vtype: int) -> int | None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[etype]
            else:
                for _ in range(count):
                    skip(etype)
        else:
            value = struct.unpack_from("<I", data, pos)[0] if vtype == 4 else None
            pos += _SCALAR_SIZES[vtype]
            return value
        return None

    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        value = skip(vtype)
        if key == "general.alignment":
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, size = GGML_QUANT_SIZES[T(qtype)]
        infos.append((name, qtype, offset, dims[0] // block * size * math.prod(dims[1:])))
    start = -(-pos // alignment) * alignment
    return {name: (qtype, data[start + off:start + off + n]) for name, qtype, off, n in infos}


def assert_same_as_llama_cpp(ours: Path, ref: Path) -> dict[str, str]:
    a, b = tensor_bytes(ref), tensor_bytes(ours)
    assert set(a) == set(b)
    wrong_type = {n: (T(a[n][0]).name, T(b[n][0]).name) for n in a if a[n][0] != b[n][0]}
    assert not wrong_type, f"types differ (llama.cpp, llmforge): {wrong_type}"
    assert [n for n in a if a[n][1] != b[n][1]] == [], "bytes differ"
    return {n: T(t).name for n, (t, _) in b.items()}


# ---------------------------------------------------------------- rules, on synthetic headers

# (label, n_layer, n_head, n_head_kv, tied, ne0 of ffn_down, ne0 of the embeddings)
SYNTHETIC = {
    "8L-untied": (8, 8, 2, False, 256, 256),
    "8L-tied-ragged": (8, 8, 8, True, 288, 288),
}

# (model, quant, options for type_overrides)
RULE_CASES = [
    ("8L-untied", "q4_k_m", dict(pure=True)),
    ("8L-tied-ragged", "q3_k_m", dict(pure=True)),
    ("8L-untied", "q4_k_m", dict(output_tensor_type="q8_0", token_embedding_type="q4_0")),
    ("8L-untied", "q2_k", dict(output_tensor_type="F16", token_embedding_type="bf16")),
    # tied: token_embd follows --output-tensor-type through the mixture rule, then the fallback (q4_K -> q5_0)
    ("8L-tied-ragged", "q4_k_m", dict(output_tensor_type="q4_K")),
    ("8L-tied-ragged", "q4_k_m", dict(output_tensor_type="q4_K", pure=True)),
    ("8L-tied-ragged", "q5_k_m", dict(token_embedding_type="q5_0")),
    # first match wins; blk.1's attn_v and ffn_down skip the counters, shifting the more-bits layers
    ("8L-untied", "q4_k_m", dict(tensor_types=[r"blk\.1\.attn_v=q8_0", r"blk\.1\.=q2_k", "FFN_DOWN=Q5_K"])),
    ("8L-untied", "q3_k_m", dict(tensor_types=[r"blk\.[01]\.attn_v=q3_k", "output=f32", "token_embd=q6_k"])),
    ("8L-tied-ragged", "q4_k_m", dict(tensor_types=["attn_v=q6_k", r"ffn_down\.weight$=q4_k", "^token=q5_1"])),
    ("8L-tied-ragged", "q5_0", dict(tensor_types=["attn_[qk]=q8_0"], output_tensor_type="q8_0", pure=True)),
    ("8L-untied", "q4_k_s", dict(tensor_types=["attn_v=q4_k"], output_tensor_type="q6_k",
                                 token_embedding_type="q5_K")),
    # float ftypes: llama.cpp still applies the output/embedding types
    ("8L-untied", "f16", dict(output_tensor_type="q8_0", token_embedding_type="q4_K")),
    # --leave-output-tensor: output.weight keeps f32, whatever the other options say about it
    ("8L-untied", "q4_k_m", dict(leave_output_tensor=True)),
    ("8L-untied", "q3_k_m", dict(leave_output_tensor=True, output_tensor_type="q8_0", tensor_types=["output=q4_0"],
                                 token_embedding_type="q5_0")),
    ("8L-untied", "f16", dict(leave_output_tensor=True, token_embedding_type="q8_0")),
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("overrides")
    models = {}
    for label, spec in SYNTHETIC.items():
        models[label] = root / f"{label}.gguf"
        synthetic_gguf(models[label], *spec)
    return models


@pytest.mark.parametrize("label,quant,options", RULE_CASES,
                         ids=[f"{m}-{q}-{'+'.join(o)}" for m, q, o in RULE_CASES])
def test_overrides_match_llama_cpp(synthetic, tmp_path, label, quant, options):
    ov = mixtures.type_overrides(**options)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(synthetic[label], ours, quant, overrides=ov, progress=False)
    llama_quantize(synthetic[label], ref, quant, ov)
    types = assert_same_as_llama_cpp(ours, ref)
    plain = {n: T(t).name for n, (t, _) in gguf_tensors(_plain(synthetic[label], quant, tmp_path)).items()}
    assert types != plain, "the overrides changed nothing: the case tests nothing"


def _plain(src: Path, quant: str, tmp: Path) -> Path:
    out = tmp / "plain.gguf"
    quantize_gguf(src, out, quant, progress=False)
    return out


def test_a_match_does_not_advance_the_counters():
    # q4_k_m, 8 layers: use_more_bits(i, 8) picks attn_v 0, 3, 6, 7 by the attn_v counter; with blk.0
    # overridden the counter restarts at blk.1, so blk.1, 4, 7 get Q6_K (and blk.8 would, if it existed)
    names = [f"blk.{i}.{t}.weight" for i in range(8) for t in ("attn_v", "ffn_down")]
    facts = mixtures.ModelFacts("llama", 8, 8, 2)
    shapes = {n: (4, 256) for n in names}
    plain = mixtures.plan_types(mixtures.BY_NAME["q4_k_m"], facts, shapes)
    ov = mixtures.type_overrides(tensor_types=[r"blk\.0\.attn_v=q8_0"])
    planned = mixtures.plan_types(mixtures.BY_NAME["q4_k_m"], facts, shapes, ov)
    def six(types):
        return [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K]
    assert six(plain) == [0, 3, 6, 7]
    assert six(planned) == [1, 4, 7] and planned["blk.0.attn_v.weight"] == T.Q8_0
    assert all(planned[f"blk.{i}.ffn_down.weight"] == plain[f"blk.{i}.ffn_down.weight"] for i in range(8))


def test_parsing_follows_llama_quantize():
    # the regex is lower-cased and ends at the first '=' (so "a=b=q4_k" names the type "b=q4_k")
    ov = mixtures.type_overrides(tensor_types=["ATTN_V=Q8_0", r"BLK\.1\.=q4_k"], output_tensor_type="Q6_k")
    assert [(r.pattern, t) for r, t in ov.tensor_types] == [("attn_v", T.Q8_0), (r"blk\.1\.", T.Q4_K)]
    with pytest.raises(LlmforgeError, match="unknown ggml type 'b=q4_k'"):
        mixtures.type_overrides(tensor_types=["a=b=q4_k"])
    assert ov.output_type == T.Q6_K and ov.token_embd_type is None and not ov.pure
    assert ov.manual_type("blk.3.attn_v.weight") == T.Q8_0 and ov.manual_type("blk.3.attn_q.weight") is None
    assert not mixtures.type_overrides().active and mixtures.type_overrides(pure=True).active


# ---------------------------------------------------------------- tiny models through convert

# qwen2's tied 152k x 256 embedding costs seconds in a K-type, so its cases give it a cheap type
# (the tied-embedding rules themselves run on the synthetic headers above)
MODEL_CASES = [
    ("mistral", "q4_k_m", dict(pure=True)),
    ("mistral", "q3_k_m", dict(output_tensor_type="q8_0", token_embedding_type="q5_k")),
    ("mistral", "q4_k_m", dict(tensor_types=[r"blk\.0\.attn_v=q8_0", "ffn_(up|gate)=q6_k"])),
    ("qwen2", "q3_k_m", dict(pure=True, token_embedding_type="f16")),
    ("qwen2", "q4_k_m", dict(output_tensor_type="q8_0")),
    ("qwen2", "q3_k_m", dict(tensor_types=[r"blk\.1\.attn_v=q4_0", "ffn_down=q8_0", "token_embd=q8_0"])),
    ("mistral", "q5_k_m", dict(leave_output_tensor=True, tensor_types=["attn_v=q8_0"])),
]


@pytest.fixture(scope="module")
def f32_models(tiny_model_dir, tmp_path_factory):
    cache: dict[str, tuple[Path, Path]] = {}

    def build(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            model = tiny_model_dir(arch)
            f32 = tmp_path_factory.mktemp(f"ov-{arch}") / "f32.gguf"
            convert(model, f32, "f32")
            cache[arch] = (model, f32)
        return cache[arch]

    return build


@pytest.mark.parametrize("arch,quant,options", MODEL_CASES,
                         ids=[f"{a}-{q}-{'+'.join(o)}" for a, q, o in MODEL_CASES])
def test_convert_with_overrides_matches_llama_cpp(f32_models, tmp_path, arch, quant, options):
    model, f32 = f32_models(arch)
    ov = mixtures.type_overrides(**options)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(model, ours, quant, overrides=ov)
    llama_quantize(f32, ref, quant, ov)
    assert_same_as_llama_cpp(ours, ref)


# ---------------------------------------------------------------- CLI


def test_cli_quantize_with_overrides(synthetic, tmp_path, capsys):
    out_path = tmp_path / "out.gguf"
    code, out, err = run(["quantize", str(synthetic["8L-untied"]), str(out_path), "-q", "q4_k_m", "--pure",
                          "--output-tensor-type", "q8_0", "--tensor-type", "attn_v=q6_k"], capsys)
    assert code == 0, err
    types = {n: T(t).name for n, (t, _) in gguf_tensors(out_path).items()}
    assert types["output.weight"] == "Q8_0" and types["blk.2.attn_v.weight"] == "Q6_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["token_embd.weight"] == "Q4_K"


BAD = [
    (["--output-tensor-type", "q9_k"], ["unknown ggml type", "q9_k", "q8_0"]),
    (["--token-embedding-type", "q4_k_m"], ["is a mixture", "q6_K"]),
    (["--output-tensor-type", "iq4_nl"], ["iq4_nl", "not supported"]),
    (["--tensor-type", "attn_v"], ["not REGEX=TYPE"]),
    (["--tensor-type", "attn_v="], ["not REGEX=TYPE"]),
    (["--tensor-type", "attn_(v=q8_0"], ["bad regular expression"]),
    (["--tensor-type", "attn_v=q8"], ["unknown ggml type", "'q8'"]),
]


@pytest.mark.parametrize("command", ["quantize", "convert"])
@pytest.mark.parametrize("extra,fragments", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_override_is_one_line(synthetic, tmp_path, capsys, command, extra, fragments):
    out_path = tmp_path / "out.gguf"
    if command == "quantize":
        argv = ["quantize", str(synthetic["8L-untied"]), str(out_path), "-q", "q4_k_m", *extra]
    else:
        argv = ["convert", str(tmp_path), "-o", str(out_path), "-q", "q4_k_m", *extra]
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not out_path.exists() and out == ""


@pytest.mark.parametrize("extra,fragments", [
    (["--output-tensor-type", "q4_k"], ["output.weight", "288", "256"]),      # llama.cpp aborts here
    (["--token-embedding-type", "q6_k"], ["token_embd.weight", "288"]),
])
def test_override_that_does_not_fit_the_rows_is_refused(synthetic, tmp_path, capsys, extra, fragments):
    src = tmp_path / "ragged-untied.gguf"
    synthetic_gguf(src, 2, 8, 2, False, 256, 288)
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(src), str(out_path), "-q", "q4_k_m", *extra], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and all(f in lines[0] for f in fragments), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ragged-untied.gguf"]


def test_tensor_type_file_matches_llama_cpp(synthetic, tmp_path, capsys):
    # rules split by spaces and newlines, tried after the --tensor-type rules (first match wins)
    rules = tmp_path / "rules.txt"
    rules.write_text("blk\\.[0-3]\\.ffn_down=q6_k  ATTN_V=Q8_0\n\n   attn_output=q4_0\t ffn_up=q5_1\nblk\\.1\\.=q2_K\n")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    code, _, err = run(["quantize", str(synthetic["8L-untied"]), str(ours), "-q", "q3_k_m",
                        "--tensor-type-file", str(rules), "--tensor-type", r"blk\.2\.=q8_0"], capsys)
    assert code == 0 and "warning" not in err, err
    ov = mixtures.type_overrides(tensor_types=[r"blk\.2\.=q8_0"], tensor_type_file=rules)
    assert [r.pattern for r, _ in ov.tensor_types] == [r"blk\.2\.", r"blk\.[0-3]\.ffn_down", "attn_v", "attn_output",
                                                        "ffn_up", r"blk\.1\."]
    llama_quantize(synthetic["8L-untied"], ref, "q3_k_m", ov)
    types = assert_same_as_llama_cpp(ours, ref)
    assert types["blk.2.ffn_down.weight"] == "Q8_0" and types["blk.3.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.attn_q.weight"] == "Q2_K" and types["blk.5.attn_v.weight"] == "Q8_0"


@pytest.mark.parametrize("text,fragments", [
    ("attn_v=q8_0\nffn_down=q6_k attn_q\n", ["rules.txt:2: 'attn_q' is not REGEX=TYPE"]),
    ("attn_v=q8_0\n\n=q4_k\n", ["rules.txt:3:", "not REGEX=TYPE"]),
    ("attn_v=q9_k\n", ["rules.txt:1:", "unknown ggml type 'q9_k'", "q8_0"]),
    ("attn_(v=q8_0\n", ["rules.txt:1:", "bad regular expression"]),
    (b"attn_v=q8_0 \xff\n", ["rules.txt is not UTF-8 text"]),
    (None, ["--tensor-type-file", "rules.txt: cannot read it"]),
])
def test_bad_tensor_type_file_is_one_line(synthetic, tmp_path, capsys, text, fragments):
    rules = tmp_path / "rules.txt"
    if isinstance(text, str):
        rules.write_text(text)
    elif text is not None:
        rules.write_bytes(text)
    out_path = tmp_path / "out.gguf"
    code, out, err = run(["quantize", str(synthetic["8L-untied"]), str(out_path), "-q", "q4_k_m",
                          "--tensor-type-file", str(rules)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not out_path.exists() and out == ""


def test_overrides_that_change_nothing_are_warned_about(synthetic, tmp_path, capsys):
    # llama-quantize ignores them silently; the bytes are the same, the user hears of the likely typo
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(synthetic["8L-tied-ragged"]), str(out_path), "-q", "q4_k_m",
                        "--tensor-type", "atn_v=q8_0", "--tensor-type", "attn_q=q8_0", "--leave-output-tensor"],
                       capsys)
    assert code == 0 and out_path.is_file(), err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: tensor type rule 'atn_v=q8_0' matches no quantizable tensor",
                        "warning: --leave-output-tensor: the model has no output.weight (tied embeddings)"], err


def test_ship_takes_the_overrides(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing listens: ship writes the files and warns
    out = tmp_path / "shipped"
    code, _, err = run(["ship", str(tiny_model_dir("mistral")), "--name", "tiny-ov", "-q", "q4_k_m", "-o", str(out),
                        "--leave-output-tensor", "--tensor-type", "ffn_=q8_0", "--device", "cpu"], capsys)
    assert code == 0, err
    types = {n: T(t).name for n, (t, _) in tensor_bytes(out / "tiny-ov-q4_k_m.gguf").items()}
    assert types["output.weight"] == "F32" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.1.attn_q.weight"] == "Q4_K"


def test_train_and_ship_refuses_bad_overrides_before_training(tmp_path, capsys):
    code, _, err = run(["train-and-ship", "--set", f"train.output_dir={tmp_path / 'run'}", "-q", "f16",
                        "--tensor-type", "attn_v=q8_0"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines == ["error: --tensor-type applies to quantized mixtures, not f16 (llama-quantize "
                                   "ignores it there; pick e.g. -q q8_0 with --tensor-type)"], err
    assert not (tmp_path / "run").exists()


def test_tensor_type_with_a_float_quant_is_refused(synthetic, tmp_path, capsys):
    out_path = tmp_path / "out.gguf"
    code, _, err = run(["quantize", str(synthetic["8L-untied"]), str(out_path), "-q", "f16",
                        "--tensor-type", "attn_v=q8_0"], capsys)
    assert code != 0 and err.startswith("error: --tensor-type applies to quantized mixtures"), err
    assert not out_path.exists()


def test_adapter_merge_takes_the_overrides(tiny_model_dir, tmp_path):
    from adapter_helpers import make_adapter

    base = tiny_model_dir("mistral")
    adapter, _ = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    ov = mixtures.type_overrides(output_tensor_type="q8_0", tensor_types=[r"blk\.0\.attn_v=q5_0"])
    merged, plain = tmp_path / "merged.gguf", tmp_path / "base.gguf"
    convert(adapter, merged, "q4_k_m", overrides=ov)
    convert(base, plain, "q4_k_m", overrides=ov)
    types = {n: T(t).name for n, (t, _) in tensor_bytes(merged).items()}
    assert types == {n: T(t).name for n, (t, _) in tensor_bytes(plain).items()}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_v.weight"] == "Q5_0"


def test_lora_only_refuses_overrides(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LlmforgeError, match="do not apply to --lora-only"):
        convert(tmp_path, tmp_path / "a.gguf", "f16", lora_only=True, overrides=mixtures.type_overrides(pure=True))
