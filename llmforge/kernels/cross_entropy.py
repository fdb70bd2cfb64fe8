"""Fused linear + cross-entropy: ``loss = CE(softcap(h @ W.T), labels)`` chunked over rows, so the
full-vocabulary logits never exist at once (and never in float32). The gradients for the hidden states
(and for W when it is trained) are computed during the forward, chunk by chunk, with the per-row softmax
gradient written in place into the chunk's logits."""

from __future__ import annotations

import torch

from llmforge.kernels._backend import compute_dtype, env_mib, next_power_of_2, triton_importable, use_triton

IGNORE_INDEX = -100
CHUNK_BYTES = 256 << 20  # logits of one chunk, in the compute dtype (~1000 rows at a 128K vocabulary)

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
        """(z, dz/dx) of fp32 logits x: z = softcap * tanh(x / softcap) (tanh through a sigmoid), or (x, 1)."""
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
            z = softcap * t
            slope = 1.0 - t * t
        else:
            z = x
            slope = 1.0
        return z, slope

    @triton.jit
    def _ce_rows(LOGITS, stride, LABELS, LOSS, n_vocab, softcap, scale, ignore_index,
                 HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
        """One row: loss = logsumexp(z) - z[label] with z = scale * softcap*tanh(x/softcap) (``scale``:
        1 / temperature, 1.0 for plain CE); then overwrite the row with d loss / d x (zero for ignored rows)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        run_max = tl.full([BLOCK], -float("inf"), tl.float32)
        run_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_vocab, BLOCK):
            idx = start + cols
            in_vocab = idx < n_vocab
            x, _ = _softcapped(tl.load(ptr + idx, mask=in_vocab, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            x = tl.where(in_vocab, x * scale, -float("inf"))
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_max = new_max
        m = tl.max(run_max, axis=0)
        lse = m + tl.log(tl.sum(run_sum * tl.exp(run_max - m), axis=0))
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0).to(tl.int64)
        z_label, _ = _softcapped(tl.load(ptr + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
        tl.store(LOSS + row, tl.where(valid, lse - z_label * scale, 0.0))
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_vocab, BLOCK):
            idx = start + cols
            mask = idx < n_vocab
            z, slope = _softcapped(tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            grad = (tl.exp(z * scale - lse) - tl.where(idx == label, 1.0, 0.0)) * (slope * scale)
            tl.store(ptr + idx, (grad * keep).to(LOGITS.dtype.element_ty), mask=mask)


def _softcapped_torch(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch twin of ``_softcapped`` on fp32 logits: (z, dz/dx), dz/dx None without a softcap."""
    x = logits.float()
    if not softcap:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, 1.0 - t * t


def _rows_torch(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, ignore_index: int,
                scale: float = 1.0):
    """Torch fallback of ``_ce_rows``: returns per-row losses and overwrites ``logits`` with the gradient."""
    z, dzdx = _softcapped_torch(logits, softcap)
    if scale != 1.0:
        z = z * scale
        dzdx = scale if dzdx is None else dzdx * scale
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    if dzdx is not None:
        grad *= dzdx
    grad *= valid[:, None]
    logits.copy_(grad)
    return loss


def _rows(logits, labels, softcap, ignore_index, scale: float = 1.0):
    """Per-row CE of ``scale * softcap(logits)``; ``logits`` is overwritten with d loss / d logits."""
    if use_triton(logits):
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        if logits.shape[0]:
            block = min(next_power_of_2(logits.shape[1]), 4096 if logits.is_cuda else 256)
            _ce_rows[(logits.shape[0],)](logits, logits.stride(0), labels, loss, logits.shape[1],
                                         float(softcap or 0.0), float(scale), ignore_index,
                                         HAS_SOFTCAP=bool(softcap), BLOCK=block, num_warps=8 if block >= 2048 else 4)
        return loss
    return _rows_torch(logits, labels, softcap, ignore_index, scale)


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


def _per_item(loss_sum: torch.Tensor, labels: torch.Tensor, ignore_index: int,
              num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """``loss_sum`` over ``num_items_in_batch``, or over the rows with a target (at least one)."""
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=loss_sum.device)
    return loss_sum / denominator


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
    return _per_item(loss_sum, labels, ignore_index, num_items_in_batch)


def linear_cross_entropy_reference(hidden, weight, labels, *, softcap=None, ignore_index=IGNORE_INDEX,
                                   num_items_in_batch=None):
    """Unfused reference: full logits in float32, then torch's cross_entropy."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


# ------------------------------------------------------------------------------ vocabulary streaming
# A frozen lm_head that stays in (pinned) host memory: W is streamed to the device in vocabulary chunks, once
# per step. One pass suffices: like flash attention's online softmax, each row keeps a running max m and sum of
# exp s, and d loss / d hidden = sum_v softmax_v * dz_v/dx_v * W_v - dz_y/dx_y * W_y is accumulated as
# acc = acc * exp(m_old - m_new) + P_chunk @ W_chunk with P = exp(z - m_new) * dz/dx, then divided by s at the
# end. The target term -dz_y/dx_y * W_y is written by the row that finds its label in the current chunk.
STREAM_LOGIT_BYTES = 64 << 20  # logits of one vocabulary chunk in the compute dtype (8192 columns at 4096 rows)

if triton_importable():
    @triton.jit
    def _stream_rows(LOGITS, stride, LABELS, RUN_MAX, RUN_SUM, TARGET, ALPHA, W, w_stride, DH, dh_stride,
                     v0, n_cols, n_hidden, softcap, scale, ignore_index,
                     HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        """One row of the vocabulary chunk [v0, v0 + n_cols) with z = scale * softcap(x): update the row's running
        max and sum of exp, keep the target logit (and write -dz/dx * W[label] into DH) when the label falls in
        the chunk, then overwrite the row with exp(z - new max) * dz/dx; ALPHA gets exp(old max - new max)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride
        cols = tl.arange(0, BLOCK)
        chunk_max = tl.full([BLOCK], -float("inf"), tl.float32)
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            x, _ = _softcapped(tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            chunk_max = tl.maximum(chunk_max, tl.where(mask, x * scale, -float("inf")))
        old_max = tl.load(RUN_MAX + row)
        new_max = tl.maximum(old_max, tl.max(chunk_max, axis=0))
        label = tl.load(LABELS + row).to(tl.int64)
        rel = label - v0
        if (label != ignore_index) & (rel >= 0) & (rel < n_cols):
            z, slope = _softcapped(tl.load(ptr + rel).to(tl.float32), softcap, HAS_SOFTCAP)
            z = z * scale
            slope = slope * scale
            tl.store(TARGET + row, z)
            hcols = tl.arange(0, BLOCK_H)
            for h0 in range(0, n_hidden, BLOCK_H):
                hidx = h0 + hcols
                hmask = hidx < n_hidden
                w = tl.load(W + rel * w_stride + hidx, mask=hmask, other=0.0).to(tl.float32)
                tl.store(DH + row * dh_stride + hidx, (-slope * w).to(DH.dtype.element_ty), mask=hmask)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            mask = idx < n_cols
            z, slope = _softcapped(tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            e = tl.where(mask, tl.exp(z * scale - new_max), 0.0)
            total += e
            tl.store(ptr + idx, (e * (slope * scale)).to(LOGITS.dtype.element_ty), mask=mask)
        alpha = tl.exp(old_max - new_max)  # 0 on the first chunk (old max -inf)
        tl.store(RUN_SUM + row, tl.load(RUN_SUM + row) * alpha + tl.sum(total, axis=0))
        tl.store(RUN_MAX + row, new_max)
        tl.store(ALPHA + row, alpha)


def _stream_rows_torch(logits, labels, v0, run_max, run_sum, target, w_chunk, dh, softcap, ignore_index, scale=1.0):
    """Torch fallback of ``_stream_rows`` (same in-place updates); returns ALPHA."""
    z, dzdx = _softcapped_torch(logits, softcap)
    if scale != 1.0:
        z = z * scale
        dzdx = (dzdx if dzdx is not None else torch.ones_like(z)) * scale
    new_max = torch.maximum(run_max, z.max(dim=1).values)
    alpha = torch.exp(run_max - new_max)
    e = torch.exp(z - new_max[:, None])
    run_sum.mul_(alpha).add_(e.sum(dim=1))
    run_max.copy_(new_max)
    rel = labels - v0
    hit = (labels != ignore_index) & (rel >= 0) & (rel < logits.shape[1])
    safe = torch.where(hit, rel, 0)
    z_target = z.gather(1, safe[:, None])[:, 0]
    target.copy_(torch.where(hit, z_target, target))
    # z = scale * softcap * t
    slope = (1.0 - (z_target / scale / softcap) ** 2 if softcap else torch.ones_like(z_target)) * scale
    term = -slope[:, None] * w_chunk.float()[safe]
    dh.copy_(torch.where(hit[:, None], term.to(dh.dtype), dh))
    if dzdx is not None:
        e *= dzdx
    logits.copy_(e)
    return alpha


def _stream_update(logits, labels, v0, run_max, run_sum, target, w_chunk, dh, softcap, ignore_index, scale=1.0):
    if use_triton(logits):
        alpha = torch.empty_like(run_max)
        if logits.shape[0]:
            block = min(next_power_of_2(logits.shape[1]), 4096 if logits.is_cuda else 256)
            block_h = min(next_power_of_2(w_chunk.shape[1]), 1024 if logits.is_cuda else 64)
            _stream_rows[(logits.shape[0],)](logits, logits.stride(0), labels, run_max, run_sum, target, alpha,
                                             w_chunk, w_chunk.stride(0), dh, dh.stride(0), v0, logits.shape[1],
                                             w_chunk.shape[1], float(softcap or 0.0), float(scale), ignore_index,
                                             HAS_SOFTCAP=bool(softcap), BLOCK=block, BLOCK_H=block_h,
                                             num_warps=8 if block >= 2048 else 4)
        return alpha
    return _stream_rows_torch(logits, labels, v0, run_max, run_sum, target, w_chunk, dh, softcap, ignore_index,
                              scale)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}
# Vocabulary chunks of a host lm_head copied to the device while the decoder's forward runs, ahead of the loss
# (LLMFORGE_LM_HEAD_PREFETCH_MIB; 0: off). They cross PCIe in the other direction from the offloaded layer inputs,
# and they live from the forward's start to the loss, when no layer's backward working set exists yet.
PREFETCH_BYTES = [env_mib("LLMFORGE_LM_HEAD_PREFETCH_MIB")]


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    copy = _COPY_STREAMS.get(device)
    if copy is None:
        copy = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return copy


class VocabPrefetch:
    """The first chunks of a host weight, copied on the side stream into buffers of their own (``start``), for
    ``vocab_chunks`` to use before it streams the rest."""

    def __init__(self, weight: torch.Tensor, chunk: int, device: torch.device, n_chunks: int):
        self.weight, self.chunk, self.device = weight, chunk, device
        self.chunks: list[tuple[torch.Tensor, object]] = []   # (buffer, event recorded after its copy)
        compute, copy = torch.cuda.current_stream(device), _copy_stream(device)
        copy.wait_stream(compute)   # the buffers' memory may have been in use by earlier compute-stream work
        for i in range(min(n_chunks, -(-weight.shape[0] // chunk))):
            rows = weight[i * chunk:(i + 1) * chunk]
            buffer = torch.empty(rows.shape, dtype=weight.dtype, device=device)
            with torch.cuda.stream(copy):
                buffer.copy_(rows, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy)
            self.chunks.append((buffer, done))

    @classmethod
    def start(cls, weight: torch.Tensor, chunk: int, device: torch.device) -> "VocabPrefetch | None":
        """Prefetch ``PREFETCH_BYTES`` of ``weight`` (host memory, headed for a CUDA ``device``), or None."""
        if PREFETCH_BYTES[0] <= 0 or device.type != "cuda" or weight.device == device:
            return None
        n_chunks = PREFETCH_BYTES[0] // (chunk * weight.shape[1] * weight.element_size())
        return cls(weight, chunk, device, n_chunks) if n_chunks > 0 else None

    def usable(self, weight: torch.Tensor, chunk: int, device: torch.device) -> bool:
        return self.weight is weight and self.chunk == chunk and self.device == device


def vocab_chunks(weight: torch.Tensor, chunk: int, device: torch.device, dtype: torch.dtype,
                 prefetch: VocabPrefetch | None = None):
    """Yield ``(start, weight[start:start + chunk])`` on ``device`` in ``dtype``. A host weight headed for a
    CUDA device is copied on a side stream into two alternating buffers, so chunk i + 1 is in flight while
    the caller computes with chunk i (a pinned ``weight`` makes the copies truly asynchronous); the chunks of a
    matching ``prefetch`` come first, from their own buffers."""
    vocab = weight.shape[0]
    if weight.device == device or device.type != "cuda":
        for start in range(0, vocab, chunk):
            yield start, weight[start:start + chunk].to(device=device, dtype=dtype)
        return
    compute = torch.cuda.current_stream(device)
    copy = _copy_stream(device)
    first = 0
    if prefetch is not None and prefetch.usable(weight, chunk, device):
        ahead, prefetch.chunks = prefetch.chunks, []
        while ahead:   # popped: each prefetched buffer is freed once the caller is done with it
            buffer, done = ahead.pop(0)
            compute.wait_event(done)
            yield first * chunk, (buffer if buffer.dtype == dtype else buffer.to(dtype))
            first += 1
            del buffer
    if first * chunk >= vocab:
        return
    buffers = [torch.empty((min(chunk, vocab), weight.shape[1]), dtype=weight.dtype, device=device)
               for _ in range(2)]
    ready: list = [None, None]
    free: list = [None, None]
    copy.wait_stream(compute)  # the buffers' memory may have been in use by earlier compute-stream work

    def issue(i: int) -> None:
        start, b = i * chunk, i % 2
        n = min(chunk, vocab - start)
        with torch.cuda.stream(copy):
            if free[b] is not None:
                copy.wait_event(free[b])  # the chunk that used this buffer two steps ago is done
            buffers[b][:n].copy_(weight[start:start + n], non_blocking=True)
            ready[b] = torch.cuda.Event()
            ready[b].record(copy)

    n_chunks = -(-vocab // chunk)
    issue(first)
    for i in range(first, n_chunks):
        if i + 1 < n_chunks:
            issue(i + 1)
        b, start = i % 2, i * chunk
        compute.wait_event(ready[b])
        w = buffers[b][:min(chunk, vocab - start)]
        yield start, (w if w.dtype == dtype else w.to(dtype))
        free[b] = torch.cuda.Event()
        free[b].record(compute)


def streamed_row_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                        ignore_index: int, chunk_vocab: int, dtype: torch.dtype, scale: float = 1.0,
                        want_grad: bool = True, prefetch: VocabPrefetch | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-row loss ``logsumexp(z) - z[label]`` in float32, 0 for ignored rows; d loss_i / d hidden_i per row
    in ``dtype``, or None) with z = scale * softcap(hidden @ W.T), ``weight`` streamed in vocabulary chunks."""
    h = hidden.to(dtype)
    n_rows, device = h.shape[0], h.device
    run_max = torch.full((n_rows,), -float("inf"), dtype=torch.float32, device=device)
    run_sum = torch.zeros(n_rows, dtype=torch.float32, device=device)
    target = torch.zeros(n_rows, dtype=torch.float32, device=device)
    acc = torch.zeros(h.shape, dtype=torch.float32, device=device) if want_grad else None
    dh = torch.zeros(h.shape, dtype=dtype, device=device)  # the target terms, then the gradient
    for start, w in vocab_chunks(weight, chunk_vocab, device, dtype, prefetch):
        logits = h @ w.t()
        alpha = _stream_update(logits, labels, start, run_max, run_sum, target, w, dh, softcap, ignore_index, scale)
        if acc is not None:
            acc.mul_(alpha[:, None]).add_(logits @ w)
        del logits, w
    valid = labels != ignore_index
    losses = torch.where(valid, run_max + torch.log(run_sum) - target, 0.0)
    if acc is None:
        return losses, None
    acc.div_(run_sum[:, None]).add_(dh).mul_(valid[:, None])
    dh.copy_(acc)
    return losses, dh


def default_chunk_vocab(n_rows: int, dtype: torch.dtype) -> int:
    """Vocabulary columns per streamed chunk: ``STREAM_LOGIT_BYTES`` of logits, 1024..32768, a multiple of 256."""
    row_bytes = max(1, n_rows) * (torch.finfo(dtype).bits // 8)
    return min(32768, max(1024, STREAM_LOGIT_BYTES // row_bytes // 256 * 256))


class _StreamedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, chunk_vocab, dtype, prefetch):
        losses, dh = streamed_row_losses(hidden, weight, labels, softcap, ignore_index, chunk_vocab, dtype,
                                         prefetch=prefetch)
        loss_sum = losses.sum()
        ctx.save_for_backward(dh)
        ctx.hidden_dtype = hidden.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        (dh,) = ctx.saved_tensors
        dh = (dh * grad_loss.to(dh.dtype)).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        return dh, None, None, None, None, None, None, None


def streamed_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                  softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                                  num_items_in_batch: torch.Tensor | int | None = None,
                                  chunk_vocab: int | None = None, prefetch: VocabPrefetch | None = None
                                  ) -> torch.Tensor:
    """``fused_linear_cross_entropy`` for a frozen ``weight`` that may stay in (pinned) host memory.

    ``weight`` (V, H) is streamed to ``hidden``'s device ``chunk_vocab`` rows at a time, once per call
    (double-buffered on a side stream on CUDA); only (N, chunk_vocab) logits exist at a time. Only the
    hidden states get a gradient: a ``weight`` that requires grad is refused. ``prefetch``: its first chunks,
    already on their way (``VocabPrefetch.start`` with the same ``chunk_vocab``).
    """
    if weight.requires_grad:
        raise ValueError("streamed_linear_cross_entropy: the weight must be frozen (requires_grad=False)")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    dtype = compute_dtype(hidden)
    if chunk_vocab is None:
        chunk_vocab = default_chunk_vocab(hidden.shape[0], dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum = _StreamedLinearCE.apply(hidden, weight, labels, softcap, ignore_index, int(chunk_vocab), dtype,
                                           prefetch)
    return _per_item(loss_sum, labels, ignore_index, num_items_in_batch)
