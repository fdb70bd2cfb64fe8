"""Fused linear + log-softmax at the targets: ``log p(target) = log_softmax(scale * softcap(h @ W.T))[target]``
per row, chunked over rows with the cross-entropy kernel of ``cross_entropy.py`` (per-row loss = -log p), so
the (rows, vocabulary) logits never exist at once. ``scale`` is 1 / temperature, applied after the softcap as
``logits / temperature`` is. Each row's log-prob depends on its own hidden state only, so d log p_i / d h_i
is computed during the forward and backward just scales it by each row's incoming gradient.

A ``weight`` on another device than ``hidden`` (a frozen lm_head kept in host memory, ``host_weights.py``) is
streamed in vocabulary chunks instead (``cross_entropy.streamed_row_losses``: online softmax, W crosses once)."""

from __future__ import annotations

import torch

from llmforge.kernels._backend import compute_dtype
from llmforge.kernels.cross_entropy import CHUNK_BYTES, IGNORE_INDEX, _rows, default_chunk_vocab, streamed_row_losses


def _row_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                scale: float, chunk_rows: int, dtype: torch.dtype, want_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(-log p per row in float32, d(-log p_i)/d h_i per row in ``dtype`` or None), chunk by chunk."""
    w = weight.to(dtype)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_grad else None
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = start + chunk_rows
        logits = hidden[start:stop].to(dtype) @ w.t()
        losses[start:stop] = _rows(logits, targets[start:stop], softcap, IGNORE_INDEX, scale)
        if dh is not None:
            torch.mm(logits, w, out=dh[start:stop])  # logits now hold d loss / d logits
        del logits
    return losses, dh


def _losses(hidden, weight, targets, softcap, scale, chunk, dtype, want_grad, streamed):
    if streamed:   # chunk: vocabulary columns
        return streamed_row_losses(hidden, weight, targets, softcap, IGNORE_INDEX, chunk, dtype, scale, want_grad)
    return _row_losses(hidden, weight, targets, softcap, scale, chunk, dtype, want_grad)


class _LinearTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, scale, chunk, dtype, streamed):
        losses, dh = _losses(hidden, weight, targets, softcap, scale, chunk, dtype, True, streamed)
        ctx.save_for_backward(dh)
        ctx.hidden_dtype = hidden.dtype
        return -losses

    @staticmethod
    def backward(ctx, grad_logp):
        (dh,) = ctx.saved_tensors
        grad = -(dh.float() * grad_logp[:, None].float()) if ctx.needs_input_grad[0] else None
        return (grad.to(ctx.hidden_dtype) if grad is not None else None), None, None, None, None, None, None, None


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk's logits take ``CHUNK_BYTES`` in ``dtype``."""
    return max(1, CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))


def linear_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           softcap: float | None = None, scale: float = 1.0, chunk_rows: int | None = None,
                           streamed: bool | None = None, chunk_vocab: int | None = None) -> torch.Tensor:
    """log p(target) per row, float32, shaped like ``targets``; gradients reach ``hidden`` only.

    ``hidden``: (..., H), ``weight``: (V, H) frozen, ``targets``: (...) token ids in [0, V). ``streamed``: stream
    ``weight`` in vocabulary chunks of ``chunk_vocab`` columns (None: when it is not on ``hidden``'s device).
    """
    if weight.requires_grad:
        raise ValueError("linear_target_logprobs: the weight must be frozen (requires_grad=False)")
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    dtype = compute_dtype(hidden)
    if streamed is None:
        streamed = weight.device != hidden.device
    if streamed:
        chunk = int(chunk_vocab) if chunk_vocab is not None else default_chunk_vocab(hidden.shape[0], dtype)
    else:
        chunk = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(weight.shape[0], dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and hidden.requires_grad:
            logp = _LinearTargetLogprobs.apply(hidden, weight, targets, softcap, float(scale), chunk, dtype, streamed)
        else:  # no graph: skip the hidden-state gradients
            logp = -_losses(hidden, weight, targets, softcap, float(scale), chunk, dtype, False, streamed)[0]
    return logp.view(shape)


def linear_target_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                     softcap: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Unfused reference: full logits in float32, softcap, scale, log_softmax, gather."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return (logits * scale).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
