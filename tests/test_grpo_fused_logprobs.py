"""GRPO's fused log-probs (``llmforge/trainer/grpo_logprobs.py`` + ``llmforge/kernels/logprobs.py``) against the
full-logits path: the same log-probs (fp32, temperature, left-padded prompts and padded completions, row counts
that are not a multiple of the chunk, Gemma-2/3 final logit softcap, adapter disabled), the same LoRA gradients
of a GRPO loss (with and without gradient checkpointing), the same GRPO run; no allocation with a vocabulary
dimension larger than one chunk of rows (the full path makes a (B, n + 1, V) one); the fallback rule. Torch
fallback kernels in this process, Triton's interpreter in a child process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_cases import report_cases, run_interpreted  # noqa: E402
from tiny_models import tiny_config  # noqa: E402

VOCAB, B, N, CHUNK = 300, 4, 7, 5     # B * N = 28 rows: five chunks of 5, then 3
PAD = 0
# arch -> config overrides (a small final softcap, so tanh is far from linear at these logits)
ARCHS = {"llama": {}, "gemma2": {"final_logit_softcapping": 2.0}, "qwen2": {},
         "gemma3": {"final_logit_softcapping": 3.0}, "phi3": {}}


def tiny_policy(arch: str, seed: int = 0, **peft_overrides):
    """fp32 tiny ``arch`` model (eager attention), LoRA r=4 on every projection with random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
                         head_dim=16, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **ARCHS[arch])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.get_output_embeddings().weight.mul_(4.0)   # wider logits: softcap and temperature matter
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **peft_overrides)
    model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def rollout_batch():
    """B rows of left-padded prompts (3..8 tokens) + N completion tokens, the stopped ones padded after the stop."""
    g = torch.Generator().manual_seed(1)
    prompt_lengths, completion_lengths = (8, 3, 5, 6), (7, 2, 5, 1)
    width = max(prompt_lengths)
    ids = torch.full((B, width + N), PAD)
    mask = torch.zeros((B, width + N), dtype=torch.long)
    completion_mask = torch.zeros((B, N))
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        ids[i, width - p:width] = torch.randint(3, VOCAB, (p,), generator=g)
        ids[i, width:width + c] = torch.randint(3, VOCAB, (c,), generator=g)
        if c < N:
            ids[i, width + c - 1] = 2          # the stop token, then padding
        mask[i, width - p:width + c] = 1
        completion_mask[i, :c] = 1
    return ids, mask, completion_mask


def both_paths(model, temperature: float, **kwargs):
    from llmforge.trainer.grpo_logprobs import full_logprobs, fused_logprobs

    ids, mask, _ = rollout_batch()
    return (full_logprobs(model, ids, mask, N, temperature),
            fused_logprobs(model, ids, mask, N, temperature, **kwargs))


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32, (got.shape, want.shape, got.dtype)
    err = float((got - want).abs().max())
    assert err <= tol, f"{what}: max |diff| {err:.3g}"


# ------------------------------------------------------------------------------------------- kernel level
def check_kernel() -> None:
    """linear_target_logprobs vs the fp32 reference: ragged vocabularies (one block, several), softcap, scale,
    rows not a multiple of the chunk; hidden gradients under random per-row incoming gradients."""
    from llmforge.kernels.logprobs import linear_target_logprobs, linear_target_logprobs_reference

    torch.manual_seed(0)
    rows, hidden = 13, 24
    for vocab in (37, 300):
        h, w = torch.randn(rows, hidden) * 2, torch.randn(vocab, hidden) * 0.5
        targets = torch.randint(0, vocab, (rows,))
        targets[-1] = vocab - 1
        upstream = torch.randn(rows)
        for softcap in (None, 2.0):
            for scale in (1.0, 1 / 0.7):
                # row chunks, then vocabulary-streamed (the host-weight path) with ragged vocabulary chunks
                for chunk, streamed in ((4, False), (13, False), (None, False), (16, True), (None, True)):
                    kw = dict(chunk_vocab=chunk, streamed=True) if streamed else dict(chunk_rows=chunk)
                    a, b = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
                    ours = linear_target_logprobs(a, w, targets, softcap=softcap, scale=scale, **kw)
                    ref = linear_target_logprobs_reference(b, w, targets, softcap=softcap, scale=scale)
                    what = f"vocab {vocab} softcap {softcap} scale {scale:.3f} chunk {chunk} streamed {streamed}"
                    assert_close(ours.detach(), ref.detach(), 2e-5, what)
                    (ours * upstream).sum().backward()
                    (ref * upstream).sum().backward()
                    assert_close(a.grad, b.grad, 2e-5 * max(1.0, float(b.grad.abs().max())), what + " dhidden")
                    with torch.no_grad():
                        assert_close(linear_target_logprobs(h, w, targets, softcap=softcap, scale=scale, **kw),
                                     ref.detach(), 2e-5, what + " no_grad")
    # (B, n, H) hidden states keep their (B, n) shape
    h3 = torch.randn(2, 3, hidden)
    t3 = torch.randint(0, 37, (2, 3))
    w = torch.randn(37, hidden)
    assert linear_target_logprobs(h3, w, t3, chunk_rows=4).shape == (2, 3)


def test_kernel_torch_fallback(monkeypatch) -> None:
    monkeypatch.setenv("LLMFORGE_KERNELS", "torch")
    check_kernel()


def test_kernel_refuses_a_trained_weight() -> None:
    from llmforge.kernels.logprobs import linear_target_logprobs

    with pytest.raises(ValueError, match="frozen"):
        linear_target_logprobs(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3).long())


# ------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_logprobs_equal_the_full_path(arch: str, temperature: float) -> None:
    model = tiny_policy(arch)
    full, fused = both_paths(model, temperature, chunk_rows=CHUNK)
    assert_close(fused.detach(), full.detach(), 2e-5, f"{arch} T={temperature}")
    assert float(full.detach().min()) < -3.0, "log-probs too flat for the comparison to mean anything"
    _, default_chunk = both_paths(model, temperature)             # one chunk holds every row
    assert_close(default_chunk.detach(), full.detach(), 2e-5, f"{arch} default chunk")
    with torch.no_grad(), model.disable_adapter():                # the reference policy of the KL term
        ref_full, ref_fused = both_paths(model, temperature, chunk_rows=CHUNK)
    assert_close(ref_fused, ref_full, 2e-5, f"{arch} adapter disabled")
    assert float((ref_full - full.detach()).abs().max()) > 1e-3, "the adapter should change the log-probs"


def test_softcap_and_temperature_are_applied() -> None:
    """Dropping the softcap or the temperature changes the log-probs well beyond the tolerance above."""
    from llmforge.kernels import logprobs
    from llmforge.trainer.grpo_logprobs import fused_head, fused_logprobs

    model = tiny_policy("gemma2")
    head, why = fused_head(model)
    assert head is not None and head.softcap == 2.0, why
    ids, mask, _ = rollout_batch()
    with torch.no_grad():
        full, _ = both_paths(model, 0.7, chunk_rows=CHUNK)
        hidden = head.decoder(input_ids=ids, attention_mask=mask, use_cache=False,
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[:, -N - 1:-1]
        no_cap = logprobs.linear_target_logprobs(hidden, head.weight, ids[:, -N:], scale=1 / 0.7)
        no_temperature = fused_logprobs(model, ids, mask, N, 1.0)
    assert float((no_cap - full).abs().max()) > 0.1
    assert float((no_temperature - full).abs().max()) > 0.1


def grpo_loss(model, fused: bool) -> torch.Tensor:
    """A GRPO micro-batch loss (clip active, k3 KL to the adapter-disabled model, grpo aggregation)."""
    from llmforge.trainer.grpo import AGGREGATE, per_token_loss
    from llmforge.trainer.grpo_logprobs import token_logprobs

    ids, mask, completion_mask = rollout_batch()
    with torch.no_grad(), model.disable_adapter():
        ref = token_logprobs(model, ids, mask, N, 0.8, fused)
    logp = token_logprobs(model, ids, mask, N, 0.8, fused)
    g = torch.Generator().manual_seed(2)
    old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g)
    advantages = torch.tensor([0.9, -1.2, 0.4, -0.1])
    losses, _, cut = per_token_loss(logp, old, ref, advantages, 0.1, 0.2, 0.28)
    assert bool(cut.any()) and not bool(cut.all())
    return AGGREGATE["grpo"](losses, completion_mask, N, int(completion_mask.sum()), 1)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_lora_gradients_of_a_grpo_loss_agree(arch: str, checkpointing: bool, monkeypatch) -> None:
    monkeypatch.setattr("llmforge.trainer.grpo_logprobs.fused_logprobs", _chunked_fused_logprobs())
    model = tiny_policy(arch)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    results = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = grpo_loss(model, fused)
        loss.backward()
        results[fused] = float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (loss_full, grads_full), (loss_fused, grads_fused) = results[False], results[True]
    assert abs(loss_fused - loss_full) <= 1e-5 * max(1.0, abs(loss_full))
    assert grads_full.keys() == grads_fused.keys() and len(grads_full) > 0
    for name, g in grads_full.items():
        assert float(g.abs().max()) > 0, f"{name}: zero reference gradient"
        err = float((grads_fused[name] - g).abs().max())
        assert err <= 1e-4 * float(g.abs().max()), f"{arch} {name}: {err:.3g}"


def _chunked_fused_logprobs():
    """fused_logprobs with CHUNK rows per chunk (token_logprobs calls it with the default chunk)."""
    from llmforge.trainer import grpo_logprobs

    original = grpo_logprobs.fused_logprobs
    return lambda *args, **kwargs: original(*args, **{"chunk_rows": CHUNK, **kwargs})


# ------------------------------------------------------------------------------------------- memory
class VocabAllocations(TorchDispatchMode):
    """Records the shape of every freshly allocated op output (views and in-place results excluded) that has a
    dimension of size ``vocab``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for value, ret in zip(flat, func._schema.returns):
            if isinstance(value, torch.Tensor) and ret.alias_info is None and self.vocab in value.shape:
                self.shapes.append((str(func), tuple(value.shape)))
        return out

    def largest(self) -> int:
        return max((torch.Size(s).numel() for _, s in self.shapes), default=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_path_never_allocates_full_vocabulary_logits(arch: str) -> None:
    """Forward and backward of the GRPO loss: the full path allocates (B, n + 1, V) logits (the control: the
    check sees them), the fused path nothing with a vocabulary dimension beyond one chunk of rows."""
    from llmforge.trainer.grpo_logprobs import full_logprobs, fused_logprobs

    model = tiny_policy(arch)
    model.train()
    ids, mask, _ = rollout_batch()
    for name, run in (("full", lambda: full_logprobs(model, ids, mask, N, 0.8)),
                      ("fused", lambda: fused_logprobs(model, ids, mask, N, 0.8, chunk_rows=CHUNK))):
        with VocabAllocations(VOCAB) as seen:
            logp = run()
            (logp * torch.linspace(-1, 1, N)).sum().backward()
        model.zero_grad(set_to_none=True)
        if name == "full":
            assert seen.largest() >= B * (N + 1) * VOCAB, seen.shapes
        else:
            assert seen.shapes, "the fused path computes logits chunk by chunk: some must be seen"
            assert seen.largest() <= CHUNK * VOCAB, [s for s in seen.shapes if torch.Size(s[1]).numel() > CHUNK * VOCAB]
    with torch.no_grad(), VocabAllocations(VOCAB) as seen:     # old / ref log-probs in prepare()
        fused_logprobs(model, ids, mask, N, 0.8, chunk_rows=CHUNK)
    assert 0 < seen.largest() <= CHUNK * VOCAB


# ------------------------------------------------------------------------------------------- the rule
def test_which_path_is_taken(monkeypatch) -> None:
    from llmforge.trainer.grpo_logprobs import full_logprobs, fused_head, token_logprobs, use_fused_logprobs

    model = tiny_policy("llama")
    assert fused_head(model)[0] is not None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_fused_logprobs(model, kernels=True)          # CPU: the full path, as the SFT kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_fused_logprobs(model, kernels=True)
    assert not use_fused_logprobs(model, kernels=False)         # train.kernels: false

    head = model.get_base_model().lm_head
    head.weight.requires_grad_(True)
    assert fused_head(model) == (None, "lm_head is trained") and not use_fused_logprobs(model, kernels=True)
    head.weight.requires_grad_(False)
    head._llmforge_host_weight = True                           # host_weights.offload_frozen_weights' flag
    assert fused_head(model)[0].streamed and "streamed from host memory" in fused_head(model)[1]
    del head._llmforge_host_weight

    wrapped = tiny_policy("llama", modules_to_save=["lm_head"])  # PEFT wraps lm_head: not a plain Linear
    assert "not a bias-free nn.Linear" in fused_head(wrapped)[1]
    ids, mask, _ = rollout_batch()
    with torch.no_grad():                                       # fused=True falls back instead of failing
        assert torch.equal(token_logprobs(wrapped, ids, mask, N, 0.8, fused=True),
                           full_logprobs(wrapped, ids, mask, N, 0.8))

    from transformers import LlamaForCausalLM

    class CustomLM(LlamaForCausalLM):   # unknown class: its forward may do more than lm_head(hidden)
        pass

    custom = CustomLM(model.get_base_model().config)
    assert "not one of the known causal LMs" in fused_head(custom)[1]


def test_host_resident_lm_head_streams_and_matches_the_full_path() -> None:
    """With lm_head (and the embeddings) in host memory, the fused log-probs stream W in vocabulary chunks: same
    values and LoRA gradients as the full logits, and no (rows, vocabulary) block beyond one chunk."""
    from llmforge.kernels.host_weights import offload_frozen_weights
    from llmforge.trainer.grpo_logprobs import full_logprobs, fused_head, fused_logprobs

    model = tiny_policy("llama")
    reference = tiny_policy("llama")
    assert "lm_head" in offload_frozen_weights(model)
    head, why = fused_head(model)
    assert head is not None and head.streamed, why
    ids, mask, _ = rollout_batch()
    upstream = torch.randn(B, N, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, m, fn in (("full", reference, full_logprobs),
                        ("streamed", model, lambda *a: fused_logprobs(*a, chunk_vocab=128))):
        logp = fn(m, ids, mask, N, 0.8)
        (logp * upstream).sum().backward()
        results[name] = (logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert_close(results["streamed"][0], results["full"][0], 2e-5, "streamed log-probs")
    for n, g in results["full"][1].items():
        err = float((results["streamed"][1][n] - g).abs().max())
        assert err <= 2e-5 * max(1.0, float(g.abs().max())), f"{n}: {err:.3g}"
    with VocabAllocations(VOCAB) as seen:      # 128 + 128 + 44 columns at a time: nothing vocabulary-wide
        (fused_logprobs(model, ids, mask, N, 0.8, chunk_vocab=128) * upstream).sum().backward()
    assert seen.largest() == 0, seen.shapes


def test_a_grpo_run_through_the_fused_path_matches_the_full_one(tmp_path: Path, monkeypatch) -> None:
    """Three GRPO steps on the bundled example (KL term, two iterations per batch: old, ref and policy
    log-probs all fused) give the full path's losses and rewards."""
    from test_grpo import LOW_IDS, grpo_config

    from llmforge.trainer import grpo
    from llmforge.trainer.example import build_base_model
    from llmforge.trainer.run import train

    base = build_base_model(tmp_path / "base")
    reward_file = tmp_path / "toy_rewards.py"
    reward_file.write_text(LOW_IDS)
    settings = dict(train={"max_steps": 3, "batch_size": 8}, beta=0.1, num_iterations=2)
    runs, calls = {}, []
    for fused in (False, True):
        monkeypatch.setattr(grpo, "use_fused_logprobs", lambda model, kernels, fused=fused: fused)
        original = grpo.token_logprobs
        monkeypatch.setattr(grpo, "token_logprobs",
                            lambda *a, **k: calls.append(a[5] if len(a) > 5 else k.get("fused")) or original(*a, **k))
        runs[fused] = train(grpo_config(base, tmp_path / f"out-{fused}", reward_file, **settings))
        monkeypatch.setattr(grpo, "token_logprobs", original)
    assert set(calls) == {False, True} and calls.count(True) == calls.count(False) > 0
    assert runs[True].rewards == pytest.approx(runs[False].rewards, abs=1e-6)
    # the third loss follows two AdamW updates, which scale the paths' float32 rounding differences in small
    # gradients up towards the learning rate (1.04e-4 apart with the packages of 2026-12-08)
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=3e-4, abs=1e-6)


# ------------------------------------------------------------------------------------------- interpreted
def check_models_interpreted() -> None:
    """The Triton kernel (interpreted) inside the model-level comparison, Gemma-2's softcap and a temperature."""
    for arch in ("llama", "gemma2"):
        model = tiny_policy(arch)
        full, fused = both_paths(model, 0.7, chunk_rows=CHUNK)
        assert_close(fused.detach(), full.detach(), 2e-5, f"{arch} interpreted")


def test_triton_interpreted() -> None:
    pytest.importorskip("triton")
    results = run_interpreted(__file__, ["kernel", "models"], path=(Path(__file__).resolve().parents[1],
                                                                      Path(__file__).resolve().parent))
    assert results == {"kernel": "ok", "models": "ok"}, results


if __name__ == "__main__":   # the interpreted child: TRITON_INTERPRET=1 was set before triton was imported
    from llmforge.kernels._backend import interpreting, use_triton

    def run(name: str) -> None:
        assert interpreting() and use_triton(torch.zeros(1)), "not running under Triton's interpreter"
        {"kernel": check_kernel, "models": check_models_interpreted}[name]()

    report_cases(sys.argv[1:], run)
