"""Fused linear + cross-entropy: ``loss = CE(softcap(h @ W.T), labels)`` chunked over rows, so the
full-vocabulary logits never exist at once (and never in float32). The gradients for the hidden states
(and for W when it is trained) are computed during the forward, chunk by chunk, with the per-row softmax
gradient written in place into the chunk's logits."""

from __future__ import annotations

import torch

from llmforge.kernels._backend import compute_dtype, next_power_of_2, triton_importable, use_triton

IGNORE_INDEX = -100
CHUNK_BYTES = 256 << 20  # logits of one chunk, in the compute dtype (~1000 rows at a 128K vocabulary)

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows(LOGITS, stride, LABELS, LOSS, n_vocab, softcap, ignore_index,
                 HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
        """One row: loss = logsumexp(z) - z[label] with z = softcap*tanh(x/softcap); then overwrite the
        row with d loss / d x (zero for ignored rows)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        run_max = tl.full([BLOCK], -float("inf"), tl.float32)
        run_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_vocab, BLOCK):
            idx = start + cols
            in_vocab = idx < n_vocab
            x = tl.load(ptr + idx, mask=in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
            x = tl.where(in_vocab, x, -float("inf"))
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_max = new_max
        m = tl.max(run_max, axis=0)
        lse = m + tl.log(tl.sum(run_sum * tl.exp(run_max - m), axis=0))
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0).to(tl.int64)
        z_label = tl.load(ptr + safe_label).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * (2.0 * tl.sigmoid(2.0 * z_label / softcap) - 1.0)
        tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))
        scale = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_vocab, BLOCK):
            idx = start + cols
            mask = idx < n_vocab
            x = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
                z = softcap * t
            else:
                z = x
            grad = tl.exp(z - lse) - tl.where(idx == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(ptr + idx, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _rows_torch(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, ignore_index: int):
    """Torch fallback of ``_ce_rows``: returns per-row losses and overwrites ``logits`` with the gradient."""
    x = logits.float()
    if softcap:
        t = torch.tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    if softcap:
        grad *= 1.0 - t * t
    grad *= valid[:, None]
    logits.copy_(grad)
    return loss


def _rows(logits, labels, softcap, ignore_index):
    if use_triton(logits):
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        if logits.shape[0]:
            block = min(next_power_of_2(logits.shape[1]), 4096 if logits.is_cuda else 256)
            _ce_rows[(logits.shape[0],)](logits, logits.stride(0), labels, loss, logits.shape[1],
                                         float(softcap or 0.0), ignore_index, HAS_SOFTCAP=bool(softcap),
                                         BLOCK=block, num_warps=8 if block >= 2048 else 4)
        return loss
    return _rows_torch(logits, labels, softcap, ignore_index)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, chunk_rows, dtype):
        n_rows = hidden.shape[0]
        w = weight.to(dtype)
        want_dw = ctx.needs_input_grad[1]
        dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)
            logits = h @ w.t()
            loss_sum += _rows(logits, labels[start:start + chunk_rows], softcap, ignore_index).sum()
            torch.mm(logits, w, out=dh[start:start + chunk_rows])
            if want_dw:
                dw += (logits.t() @ h).float()
            del logits
        ctx.save_for_backward(dh, dw if want_dw else None)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (dh * grad_loss.to(dh.dtype)).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (dw * grad_loss).to(weight_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                               num_items_in_batch: torch.Tensor | int | None = None,
                               chunk_rows: int | None = None) -> torch.Tensor:
    """Mean (or sum / ``num_items_in_batch``) cross-entropy of ``hidden @ weight.T`` against ``labels``.

    ``hidden``: (N, H), ``weight``: (V, H), ``labels``: (N,) with ``ignore_index`` for rows without a
    target. Matches Hugging Face's ``ForCausalLMLoss`` on already shifted labels, except that a batch with
    no target at all gives 0 instead of NaN.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    dtype = compute_dtype(hidden)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (weight.shape[0] * torch.finfo(dtype).bits // 8))
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum = _FusedLinearCE.apply(hidden, weight, labels, softcap, ignore_index, int(chunk_rows), dtype)
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=loss_sum.device)
    return loss_sum / denominator


def linear_cross_entropy_reference(hidden, weight, labels, *, softcap=None, ignore_index=IGNORE_INDEX,
                                   num_items_in_batch=None):
    """Unfused reference: full logits in float32, then torch's cross_entropy."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch
