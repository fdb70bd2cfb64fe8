"""Frozen embeddings and lm_head in host memory (``llmforge/kernels/host_weights.py``) and the vocabulary-streaming
cross-entropy: the streamed loss and hidden gradient equal the fused CE and an fp32 torch reference (torch
fallback here, Triton's interpreter in a child process); a patched model with its weights on the host gives the
unpatched model's loss, LoRA gradients and logits, reports the same device and dtype, saves its adapter, and
``restore_frozen_weights`` puts everything back."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_models import batch, loss_and_grads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- streamed cross-entropy
def check_streamed_cross_entropy() -> None:
    """Streamed vs fused vs reference on ragged vocabularies (not multiples of the chunk), ignored rows, a
    row chunk without targets, softcap, num_items_in_batch; a batch without targets gives 0."""
    from llmforge.kernels.cross_entropy import (fused_linear_cross_entropy, linear_cross_entropy_reference,
                                                streamed_linear_cross_entropy)

    torch.manual_seed(0)
    rows, hidden = 13, 24
    for vocab in (37, 300):
        h, w = torch.randn(rows, hidden) * 2, torch.randn(vocab, hidden) * 0.5
        labels = torch.randint(0, vocab, (rows,))
        labels[[0, 5, 6]] = -100
        labels[-1] = vocab - 1  # the last column of the ragged last chunk
        for softcap in (None, 5.0):
            for n_items in (None, 7):
                for chunk in (7, 64, 4096):
                    runs = {
                        "streamed": lambda a: streamed_linear_cross_entropy(
                            a, w, labels, softcap=softcap, num_items_in_batch=n_items, chunk_vocab=chunk),
                        "fused": lambda a: fused_linear_cross_entropy(
                            a, w, labels, softcap=softcap, num_items_in_batch=n_items, chunk_rows=4),
                        "reference": lambda a: linear_cross_entropy_reference(
                            a, w, labels, softcap=softcap, num_items_in_batch=n_items),
                    }
                    out = {}
                    for name, fn in runs.items():
                        a = h.clone().requires_grad_(True)
                        loss = fn(a)
                        loss.backward()
                        out[name] = (loss.detach(), a.grad)
                    what = f"vocab {vocab} softcap {softcap} items {n_items} chunk {chunk}"
                    for other in ("fused", "reference"):
                        loss, grad = out[other]
                        assert abs(float(out["streamed"][0] - loss)) <= 1e-5 * max(1.0, abs(float(loss))), what
                        err = float((out["streamed"][1] - grad).abs().max())
                        assert err <= 1e-5 * max(1.0, float(grad.abs().max())), f"{what} vs {other}: {err}"
                    assert float(out["reference"][1][[0, 5, 6]].abs().max()) == 0.0
    a = torch.randn(rows, hidden, requires_grad=True)
    loss = streamed_linear_cross_entropy(a, torch.randn(37, hidden), torch.full((rows,), -100), chunk_vocab=8)
    loss.backward()
    assert float(loss) == 0.0 and float(a.grad.abs().max()) == 0.0
    # bf16 compute (autocast's dtype on the hidden states): within bf16 tolerance of the fp32 reference
    h, w = torch.randn(64, 32), torch.randn(500, 32) * 0.3
    labels = torch.randint(0, 500, (64,))
    a, b = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    loss = streamed_linear_cross_entropy(a.bfloat16(), w.bfloat16(), labels, chunk_vocab=96)
    loss.backward()
    ref = linear_cross_entropy_reference(b, w, labels)
    ref.backward()
    assert abs(float(loss) - float(ref)) < 2e-2 * float(ref)
    assert float((a.grad - b.grad).abs().max()) < 3e-2 * float(b.grad.abs().max())


def test_streamed_cross_entropy_torch_fallback(monkeypatch):
    monkeypatch.setenv("LLMFORGE_KERNELS", "torch")
    check_streamed_cross_entropy()


def test_streamed_cross_entropy_refuses_a_trained_weight():
    from llmforge.kernels.cross_entropy import streamed_linear_cross_entropy

    with pytest.raises(ValueError, match="frozen"):
        streamed_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3).long())


def run_interpreted_child(case: str) -> None:
    """This file's ``__main__`` ``case`` in a child process with Triton's interpreter (it reads the variable once)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    env.pop("LLMFORGE_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0 and '"ok"' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_streamed_cross_entropy_triton_interpreted():
    run_interpreted_child("streamed")


# ------------------------------------------------------------------------------ rows gathered by the GPU
def check_gather_rows() -> None:
    """``gather_rows`` (the embedding lookup of host-resident weights, read by a kernel) == ``table[ids]``: ragged
    columns (a second, partial block of 1024), repeated ids, any ids shape, no ids; ids out of range give zeros."""
    from llmforge.kernels.host_gather import gather_rows

    torch.manual_seed(0)
    for dtype, cols in ((torch.float32, 24), (torch.bfloat16, 1500)):
        table = torch.randn(37, cols).to(dtype)
        ids = torch.tensor([[0, 36, 5, 5], [-1, 37, 100, 2]])
        out = gather_rows(table, ids)
        valid = ((ids >= 0) & (ids < 37))[..., None]
        assert out is not None and out.shape == (2, 4, cols) and out.dtype == dtype
        assert torch.equal(out, torch.where(valid, table[ids.clamp(0, 36)], torch.zeros((), dtype=dtype)))
        assert torch.equal(gather_rows(table, ids[0]), table[ids[0]])
        assert gather_rows(table, torch.zeros(0, dtype=torch.long)).shape == (0, cols)


def check_host_weights_model_gathers_on_device() -> None:
    """Patched with its weights on the host and kernels interpreted, a tiny Gemma-2 (scaled embedding) looks its
    embeddings up through ``gather_rows`` at every forward and gives the unpatched loss and LoRA gradients."""
    from llmforge.kernels import host_weights
    from llmforge.kernels.patch import patch_model

    calls = []
    original = host_weights.gather_rows

    def counting(table, ids):
        out = original(table, ids)
        calls.append(out is not None)
        return out

    host_weights.gather_rows = counting
    ref = lora_model("gemma2")
    model = copy.deepcopy(ref)
    loss_ref, grads_ref = loss_and_grads(ref)
    assert patch_model(model, offload_frozen_weights=True).host_weights == ["model.embed_tokens", "lm_head"]
    loss, grads = loss_and_grads(model)
    assert calls and all(calls), calls
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref), (loss, loss_ref)
    for name, g in grads_ref.items():
        assert float((grads[name] - g).abs().max()) <= 1e-4 * float(g.abs().max()), name


def test_host_gather_rows_triton_interpreted():
    run_interpreted_child("gather")


def test_host_gather_rows_declines_without_a_kernel(monkeypatch):
    """Outside the interpreter, ids on the CPU (or ``LLMFORGE_KERNELS=torch``) leave the lookup to the host path."""
    from llmforge.kernels.host_gather import gather_rows

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gather_rows(torch.randn(5, 3), torch.tensor([1, 2])) is None
    monkeypatch.setenv("LLMFORGE_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gather_rows(torch.randn(5, 3), torch.tensor([1, 2])) is None


def test_a_refused_host_pointer_falls_back_to_the_host_gather_for_good(monkeypatch):
    """A launcher that cannot map the table (Triton's "Pointer argument cannot be accessed") leaves the lookup to the
    host path, and the kernel is not tried again."""
    pytest.importorskip("triton")
    from llmforge.kernels import host_gather

    tries = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tries.append(grid)
                raise ValueError("Pointer argument cannot be accessed from Triton (cpu tensor?)")
            return launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LLMFORGE_KERNELS", raising=False)
    monkeypatch.setattr(host_gather, "_gather_rows_kernel", Refusing())
    monkeypatch.setattr(host_gather, "_REFUSED", [False])
    table, ids = torch.randn(5, 3), torch.tensor([1, 2])
    assert host_gather.gather_rows(table, ids) is None and len(tries) == 1
    assert not host_gather.can_gather_on_device(table, ids)
    assert host_gather.gather_rows(table, ids) is None and len(tries) == 1   # not tried again


# ---------------------------------------------------------------------------------------- host weights
UNTIED = ("llama", "qwen2", "gemma2")  # gemma2: scaled embedding and final logit softcapping


def lora_model(arch: str, tied: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(0)
    config = tiny_config(arch, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, vocab_size=300,
                         head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("arch", UNTIED)
def test_host_weights_model_matches_and_restores(arch, monkeypatch, tmp_path):
    from llmforge.kernels.host_weights import is_host_weight, restore_frozen_weights
    from llmforge.kernels.patch import patch_model, unpatch_rope

    monkeypatch.setenv("LLMFORGE_KERNELS", "torch")
    ref = lora_model(arch)
    model = copy.deepcopy(ref)
    base = model.get_base_model()
    order = [n for n, _ in model.named_parameters()]
    device, dtype = base.device, base.dtype
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    loss_ref, grads_ref = loss_and_grads(ref)
    with torch.no_grad():
        logits_ref = ref(**batch()).logits
    report = patch_model(model, offload_frozen_weights=True)
    try:
        assert report.host_weights == ["model.embed_tokens", "lm_head"], report.summary()
        assert "host weights: model.embed_tokens, lm_head" in report.summary()
        assert is_host_weight(emb) and is_host_weight(head)
        assert emb.weight.is_pinned() == torch.cuda.is_available()
        assert base.device == device and base.dtype == dtype and model.device == device
        assert next(model.parameters()) is not emb.weight and next(model.parameters()).device == device
        assert sorted(n for n, _ in model.named_parameters()) == sorted(order)
        loss, grads = loss_and_grads(model)
        assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert float((grads[name] - g).abs().max()) <= 1e-4 * float(g.abs().max()), name
        with torch.no_grad():  # evaluation: the original forward, lm_head.forward on the host weight
            assert torch.allclose(model(**batch()).logits, logits_ref, atol=1e-5)
        model.save_pretrained(tmp_path / "adapter")  # PEFT's save: the adapter only
        saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert saved["r"] == 4
    finally:
        unpatch_rope(model)
    assert restore_frozen_weights(model) == ["model.embed_tokens", "lm_head"]
    assert [n for n, _ in model.named_parameters()] == order
    assert "forward" not in emb.__dict__ and "forward" not in head.__dict__
    assert not is_host_weight(emb) and emb.weight.device == device
    assert torch.equal(emb.weight, ref.get_base_model().get_input_embeddings().weight)
    merged = model.merge_and_unload()  # merging the adapter works after the restore
    assert merged.get_output_embeddings().weight.device == device


def test_tied_or_trained_weights_stay():
    from llmforge.kernels.host_weights import offload_frozen_weights
    from llmforge.kernels.patch import patch_model, unpatch_rope

    tied = lora_model("llama", tied=True)  # Llama-3.2-1B-style tied embeddings
    report = patch_model(tied, offload_frozen_weights=True)
    unpatch_rope(tied)
    assert report.host_weights == [] and "host weights: input embeddings tied to lm_head" in report.not_patched
    trained = lora_model("llama")
    trained.get_base_model().lm_head.weight.requires_grad_(True)
    assert offload_frozen_weights(trained) == ["model.embed_tokens"]
    default = lora_model("llama")
    report = patch_model(default)  # None: on CUDA only
    unpatch_rope(default)
    assert report.host_weights == ([] if not torch.cuda.is_available() else ["model.embed_tokens", "lm_head"])



@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_trainer_config_key(value):
    """``train.offload_embeddings``; on/off given unquoted (YAML 1.1 booleans) still read as on/off."""
    from llmforge.errors import LlmforgeError
    from llmforge.trainer.config import load_config

    assert load_config(None, [f"train.offload_embeddings={value}"]).train.offload_embeddings == value
    assert load_config({"train": {"offload_embeddings": value}}).train.offload_embeddings == value
    with pytest.raises(LlmforgeError, match="auto, on, off"):
        load_config(None, ["train.offload_embeddings=maybe"])

if __name__ == "__main__":
    if sys.argv[1:] == ["streamed"]:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, str(REPO))
        from llmforge.kernels.cross_entropy import _stream_rows

        assert type(_stream_rows).__name__ == "InterpretedFunction"

        check_streamed_cross_entropy()
        print(json.dumps({"streamed": "ok"}))
    elif sys.argv[1:] == ["gather"]:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, str(REPO))
        from llmforge.kernels import host_gather

        assert type(host_gather._gather_rows_kernel).__name__ == "InterpretedFunction"
        check_gather_rows()
        check_host_weights_model_gathers_on_device()
        print(json.dumps({"gather": "ok"}))
