"""A compact supervised fine-tuning loop: batching, AdamW, schedule, logging, checkpoints, exact resume.

Kept separate from model loading and data so other objectives (GRPO, vision) can reuse the pieces.
The data order is a pure function of (seed, epoch), so a resumed run replays the same batches and, with the
optimizer, scheduler and RNG states restored, continues the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir, atomic_path
from ..errors import LlmforgeError
from .config import TrainConfig
from .encode import Encoded
from .masking import IGNORE_INDEX

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOG_NAME = "train_log.jsonl"


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)     # one per optimizer step of this run
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def pack(encoded: list[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate examples into rows of at most ``max_length`` tokens (first fit, in order)."""
    rows: list[Encoded] = []
    for e in encoded:
        if rows and len(rows[-1].input_ids) + len(e.input_ids) <= max_length:
            rows[-1] = Encoded(rows[-1].input_ids + e.input_ids, rows[-1].labels + e.labels, rows[-1].row)
        else:
            rows.append(Encoded(list(e.input_ids), list(e.labels), e.row))
    return rows


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def collate(rows: list[Encoded], pad_id: int, device: torch.device, length: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of ``rows`` padded to the longest of them, or to ``length`` (a fixed shape, for CUDA graphs)."""
    longest = max(len(r.input_ids) for r in rows)
    if length is not None and longest > length:
        raise ValueError(f"a row of {longest} tokens does not fit the fixed batch length {length}")
    length = longest if length is None else length
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batches(rows: list[Encoded], batch_size: int, seed: int, start_epoch: int = 0) -> Iterator[list[Encoded]]:
    """Endless stream of batches, reshuffled each epoch with a seed-derived order."""
    epoch = start_epoch
    while True:
        order = epoch_order(len(rows), seed, epoch)
        for i in range(0, len(order), batch_size):
            yield [rows[j] for j in order[i: i + batch_size]]
        epoch += 1


def trainable_count(batch: dict[str, torch.Tensor]) -> int:
    """How many positions of ``batch`` have a next-token target (read on the host: give it host tensors)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over trainable positions (a device scalar; nothing is read back).

    The loss comes from the model itself (``labels=`` with ``num_items_in_batch=1``, i.e. a plain sum), so a
    model patched by ``llmforge.kernels`` uses its fused linear + cross-entropy and full-vocabulary float32
    logits never exist; unpatched models compute the same summed loss from their logits.
    """
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}  # e.g. pixels
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                num_items_in_batch=1, **extra)
    return out.loss


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over trainable positions, and their count."""
    return summed_loss(model, batch), trainable_count(batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on ``device``. On CUDA the copies start from pinned memory without waiting for the GPU, so
    the host can queue the next step while the previous one still runs."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def total_steps(n_rows: int, config: TrainConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(n_rows / config.batch_size)
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, limit: int) -> None:
    """checkpoint-<step>/ with trainable weights, optimizer, scheduler and RNG states (written atomically)."""
    with atomic_dir(out_dir / f"checkpoint-{step}") as tmp:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   tmp / "state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
    checkpoints = sorted(list_checkpoints(out_dir))
    for old_step, path in checkpoints[: max(0, len(checkpoints) - max(limit, 1))]:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [(s, p) for s, p in found if (p / "step.json").is_file()]


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    weights = torch.load(path / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise LlmforgeError(f"checkpoint {path} does not match this model (no {name})",
                                    hint="resume with the same config, or start without --resume")
            params[name].copy_(value)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return json.loads((path / "step.json").read_text())["step"]


def make_optimizer(model: Any, config: TrainConfig, steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # on CUDA torch's fused AdamW: one kernel for all the LoRA tensors instead of a foreach launch per op and chunk
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=steps)
    return optimizer, scheduler


def start_run(model: Any, config: TrainConfig, steps: int, out_dir: Path,
              resume: bool) -> tuple[torch.optim.Optimizer, Any, int, list[dict]]:
    """AdamW and its schedule over ``steps``, seeded RNGs and, with ``resume``, the latest checkpoint of
    ``out_dir`` loaded: (optimizer, scheduler, the step run so far, the log entries up to it)."""
    optimizer, scheduler = make_optimizer(model, config, steps)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    start_step = 0
    if resume:
        checkpoints = list_checkpoints(out_dir)
        if not checkpoints:
            raise LlmforgeError(f"--resume: no checkpoint in {out_dir}",
                                hint="set train.save_steps to write checkpoints, or start without --resume")
        _, path = max(checkpoints)
        start_step = load_checkpoint(path, model, optimizer, scheduler)
        print(f"resuming from {path.name}", file=sys.stderr)
    log_path = out_dir / LOG_NAME
    previous = [json.loads(l) for l in log_path.read_text().splitlines()] if resume and log_path.exists() else []
    return optimizer, scheduler, start_step, [entry for entry in previous if entry["step"] <= start_step]


class Progress:
    """One self-overwriting line on stderr (a plain line per log step when stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        elapsed = time.perf_counter() - self.start
        width = 24
        filled = int(width * step / self.total)
        line = (f"train [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
                f"lr {lr:.2e} {tokens / max(elapsed, 1e-9):,.0f} tok/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def train_loop(model: Any, rows: list[Encoded], config: TrainConfig, out_dir: Path, pad_id: int,
               resume: bool = False, collate_fn: Callable[..., dict[str, torch.Tensor]] = collate) -> LoopResult:
    """Run SFT on ``rows``; checkpoints in ``out_dir``; returns the losses of the optimizer steps run.
    ``collate_fn(rows, pad_id, device)`` makes a batch (every key besides input_ids, attention_mask and labels
    goes to the model as is, e.g. a vision model's pixel_values)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny late-training gradients are otherwise 10-100x slower on x86
    steps = total_steps(len(rows), config)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer, scheduler, start_step, log = start_run(model, config, steps, out_dir, resume)
    log_path = out_dir / LOG_NAME
    per_epoch = math.ceil(len(rows) / config.batch_size)
    consumed = start_step * config.grad_accum
    stream = batches(rows, config.batch_size, config.seed, start_epoch=consumed // per_epoch)
    for _ in range(consumed % per_epoch):
        next(stream)
    model.train()
    result = LoopResult(steps=steps, resumed_from=start_step)
    progress = Progress(steps)
    started = time.perf_counter()
    empty_warned = False
    pending: _Done | None = None
    for step in range(start_step + 1, steps + 1):
        # batches are built and counted on the host, then copied: no read-back from the GPU before the step
        host = [collate_fn(next(stream), pad_id, torch.device("cpu")) for _ in range(config.grad_accum)]
        count = sum(trainable_count(b) for b in host)
        if count == 0:
            if not empty_warned:
                print(f"warning: step {step} has no trainable tokens; skipped", file=sys.stderr)
                empty_warned = True
            scheduler.step()
            continue
        total = None
        for batch in host:
            loss_sum = summed_loss(model, to_device(batch, device))
            (loss_sum / count).backward()
            total = loss_sum.detach().double() if total is None else total + loss_sum.detach().double()
            result.tokens += int(batch["attention_mask"].sum())
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # the previous step's loss is read only now, with this step queued behind it (reading this one would
        # make the host wait for the GPU at every step)
        if pending is not None:
            _record(pending, result, log, progress, config.logging_steps, steps)
        pending = _Done(step, total, count, lr, result.tokens)
        if config.save_steps > 0 and step % config.save_steps == 0 and step < steps:
            _record(pending, result, log, progress, config.logging_steps, steps)
            pending = None
            write_log(log_path, log)
            save_checkpoint(out_dir, step, model, optimizer, scheduler, config.save_total_limit)
    if pending is not None:
        _record(pending, result, log, progress, config.logging_steps, steps)
    progress.close()
    write_log(log_path, log)
    result.seconds = time.perf_counter() - started
    if result.losses:
        result.first_loss, result.last_loss = result.losses[0], result.losses[-1]
    return result


@dataclass
class _Done:
    """An optimizer step whose summed loss (a device scalar) has not been read yet."""
    step: int
    total: torch.Tensor
    count: int
    lr: float
    tokens: int


def _record(done: _Done, result: LoopResult, log: list[dict], progress: Progress, logging_steps: int,
            steps: int) -> None:
    """Read a finished step's loss (waits for that step on the GPU), stop on a non-finite one, log it."""
    loss = float(done.total) / done.count
    if not math.isfinite(loss):
        progress.close()
        raise LlmforgeError(f"training loss became {loss} at step {done.step}",
                            hint="lower train.lr, check the data, or use float32 (model.dtype)")
    result.losses.append(loss)
    log.append({"step": done.step, "loss": loss, "lr": done.lr})
    if done.step % max(logging_steps, 1) == 0 or done.step == steps:
        progress.update(done.step, loss, done.lr, done.tokens)


def write_log(path: Path, log: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in log))
