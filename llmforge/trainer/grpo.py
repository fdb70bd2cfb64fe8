"""GRPO on the LoRA model: sample a group of completions per prompt, score them with the rewards, normalise the
rewards within each group into advantages, and step on the clipped policy-gradient loss (TRL's GRPOTrainer
semantics: ``loss_type`` dapo / grpo / bnpo / dr_grpo, ``scale_rewards``, ``num_iterations``, k3 KL to the base).

The reference policy for the KL term is the same model with its LoRA adapter disabled, so no second copy of the
weights exists. ``train.batch_size`` counts completions per micro-batch (a multiple of ``num_generations``), as
TRL's ``per_device_train_batch_size`` does.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LlmforgeError
from .config import Config, GrpoConfig, TrainConfig
from .grpo_data import Prompt, encode_prompts, load_prompts
from .grpo_logprobs import fused_head, token_logprobs, use_fused_logprobs
from .rewards import Reward, build_rewards, check_columns, score
from .sft import LOG_NAME, batches, save_checkpoint, start_run, write_log


# ------------------------------------------------------------------------------------------- the objective
def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """(r - mean of its group) / (std + 1e-4); std of the group, of the whole batch, or none (Dr. GRPO)."""
    grouped = rewards.view(-1, group)
    centred = rewards - grouped.mean(1).repeat_interleave(group)
    if scale == "none":
        return centred
    std = grouped.std(1).repeat_interleave(group) if scale == "group" else rewards.std().expand_as(rewards)
    return centred / (std + 1e-4)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, beta: float, eps_low: float, eps_high: float,
                   bias_correction: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL per token, the k3 KL estimate
    exp(ref - logp) - (ref - logp) - 1 (times the ratio with ``bias_correction``: DeepSeek-V3.2's unbiased
    reverse-KL gradient, TRL's default; it changes the gradient even where the ratio is 1), and which tokens
    the clip cut."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta != 0.0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if bias_correction:
            kl = kl * ratio
        loss = loss + beta * kl
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, kl, clipped


# loss_type -> how a micro-batch's masked token losses become its share of the step's loss:
# f(token losses, mask, max_completion_length, completion tokens in the whole step, micro-batches per step)
AGGREGATE = {
    "grpo": lambda loss, m, length, n, k: ((loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean() / k,
    "bnpo": lambda loss, m, length, n, k: (loss * m).sum() / m.sum().clamp(min=1) / k,
    "dr_grpo": lambda loss, m, length, n, k: (loss * m).sum() / (loss.size(0) * length) / k,
    "dapo": lambda loss, m, length, n, k: (loss * m).sum() / max(n, 1),
}


# ------------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    input_ids: torch.Tensor          # (B, P + T): left-padded prompts, then completions
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor    # (B, T) float: tokens up to and including the stop token
    rewards: torch.Tensor            # (B,) weighted sum over reward functions
    per_reward: torch.Tensor         # (B, F)
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def completion_length(self) -> int:
        return self.completion_mask.size(1)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence token and every end token of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if not ids:
        raise LlmforgeError("the tokenizer has no end-of-sequence token to stop completions at",
                            hint="set eos_token in the model's tokenizer_config.json")
    return sorted(ids)


def sample(model: Any, prompts: list[list[int]], grpo: GrpoConfig, pad_id: int, stops: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt row: (left-padded prompt ids, their mask, completion ids)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    settings = GenerationConfig(do_sample=True, temperature=grpo.temperature, top_p=grpo.top_p, top_k=grpo.top_k,
                                max_new_tokens=grpo.max_completion_length, eos_token_id=stops,
                                pad_token_id=pad_id, use_cache=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    finally:
        model.train(was_training)
    return ids, mask, out[:, width:]


def completion_mask_of(completions: torch.Tensor, stops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first stop token (everything when none); and which rows never stopped."""
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    stopped = is_stop.any(1)
    first = torch.where(stopped, is_stop.int().argmax(1), torch.full_like(stopped, completions.size(1), dtype=torch.long))
    positions = torch.arange(completions.size(1), device=completions.device).expand_as(completions)
    return (positions <= first.unsqueeze(1)).float(), ~stopped


def reward_kwargs(chunk: list[Prompt], group: int, texts: list[str], ids: list[list[int]]) -> dict[str, Any]:
    """TRL's reward-function arguments: prompts, completions, completion_ids and one list per dataset column."""
    rows = [p for p in chunk for _ in range(group)]
    completions = [t if not p.conversational else [{"role": "assistant", "content": t}] for p, t in zip(rows, texts)]
    names = dict.fromkeys(k for p in chunk for k in p.columns)
    kwargs: dict[str, Any] = {name: [p.columns.get(name) for p in rows] for name in names}
    kwargs.update(prompts=[p.original for p in rows], completions=completions, completion_ids=ids)
    return kwargs


def rollout(model: Any, tokenizer: Any, chunk: list[Prompt], grpo: GrpoConfig, rewards: list[Reward],
            stops: list[int]) -> Rollout:
    """Generate ``num_generations`` completions for each prompt of ``chunk`` and score them."""
    group = grpo.num_generations
    prompt_ids, prompt_mask, completions = sample(model, [p.ids for p in chunk for _ in range(group)], grpo,
                                                  tokenizer.pad_token_id, stops)
    completion_mask, truncated = completion_mask_of(completions, stops)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    lengths = completion_mask.sum(1).long().tolist()
    ids = [row[:n].tolist() for row, n in zip(completions, lengths)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    table = score(rewards, reward_kwargs(chunk, group, texts, ids), len(ids))
    per_reward = torch.tensor(table, dtype=torch.float32).T.reshape(len(ids), len(rewards))
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
    total = (per_reward * weights).nansum(1)
    if grpo.mask_truncated_completions:
        completion_mask = completion_mask * (~truncated).float().unsqueeze(1)
    return Rollout(torch.cat([prompt_ids, completions], 1), attention_mask, completion_mask, total, per_reward)


def prepare(model: Any, rollouts: list[Rollout], grpo: GrpoConfig, fused: bool = False) -> None:
    """Advantages over the step's groups; the sampling policy's and the base model's log-probs when needed
    (``fused``: through the fused log-prob kernel, see ``grpo_logprobs``)."""
    rewards = torch.cat([r.rewards for r in rollouts])
    advantages = group_advantages(rewards, grpo.num_generations, grpo.scale_rewards)
    device = rollouts[0].input_ids.device
    for r, adv in zip(rollouts, advantages.split([len(r.rewards) for r in rollouts])):
        r.advantages = adv.to(device)
        with torch.no_grad():
            if grpo.num_iterations > 1:
                r.old_logp = token_logprobs(model, r.input_ids, r.attention_mask, r.completion_length,
                                            grpo.temperature, fused)
            if grpo.beta != 0.0:
                with model.disable_adapter():
                    r.ref_logp = token_logprobs(model, r.input_ids, r.attention_mask, r.completion_length,
                                                grpo.temperature, fused)


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class GrpoLoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)   # mean reward of each optimizer step's completions
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def total_steps(n_prompts: int, config: TrainConfig, grpo: GrpoConfig) -> int:
    """Optimizer steps: ``max_steps``, else epochs over the prompts (each batch is used num_iterations times)."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(n_prompts / (config.batch_size // grpo.num_generations))
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum)) * grpo.num_iterations


def progress_line(step: int, total: int, entry: dict) -> str:
    parts = " ".join(f"{k} {v:.3f}" for k, v in entry["reward_by_function"].items()) if len(
        entry["reward_by_function"]) > 1 else ""
    kl = f" kl {entry['kl']:.4f}" if entry.get("kl") is not None else ""
    return (f"grpo {step}/{total} reward {entry['reward']:.4f} (std {entry['reward_std']:.3f}"
            f"{', ' + parts if parts else ''}) loss {entry['loss']:.4f}{kl} len {entry['completion_length']:.1f} "
            f"clip {entry['clip_ratio']:.3f} lr {entry['lr']:.2e}")


def grpo_loop(model: Any, tokenizer: Any, prompts: list[Prompt], rewards: list[Reward], config: TrainConfig,
              grpo: GrpoConfig, out_dir: Path, stops: list[int], resume: bool = False,
              fused_logprobs: bool | None = None) -> GrpoLoopResult:
    """Run GRPO; checkpoints (at multiples of num_iterations) and ``train_log.jsonl`` in ``out_dir``.
    ``fused_logprobs``: log-probs through the fused kernel; None: as :func:`use_fused_logprobs` decides."""
    device = next(model.parameters()).device
    fused = use_fused_logprobs(model, config.kernels) if fused_logprobs is None else fused_logprobs
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    steps = total_steps(len(prompts), config, grpo)
    optimizer, scheduler, start_step, log = start_run(model, config, steps, out_dir, resume)
    log_path = out_dir / LOG_NAME
    per_micro = config.batch_size // grpo.num_generations
    stream: Iterator[list[Prompt]] = batches(prompts, per_micro, config.seed)
    for _ in range(start_step // grpo.num_iterations * config.grad_accum):
        next(stream)
    params = [p for p in model.parameters() if p.requires_grad]
    result = GrpoLoopResult(steps=steps, resumed_from=start_step)
    started = time.perf_counter()
    model.train()
    rollouts: list[Rollout] = []
    for step in range(start_step + 1, steps + 1):
        if (step - 1) % grpo.num_iterations == 0:
            rollouts = [rollout(model, tokenizer, next(stream), grpo, rewards, stops) for _ in range(config.grad_accum)]
            prepare(model, rollouts, grpo, fused)
            result.tokens += sum(int(r.attention_mask.sum()) for r in rollouts)
        step_tokens = sum(int(r.completion_mask.sum()) for r in rollouts)
        loss_total, kl_sum, clipped = 0.0, 0.0, 0.0
        for r in rollouts:
            logp = token_logprobs(model, r.input_ids, r.attention_mask, r.completion_length, grpo.temperature,
                                  fused)
            old = r.old_logp if r.old_logp is not None else logp.detach()
            losses, kl, cut = per_token_loss(logp, old, r.ref_logp, r.advantages, grpo.beta, grpo.epsilon,
                                             grpo.epsilon_high if grpo.epsilon_high is not None else grpo.epsilon,
                                             grpo.use_bias_correction_kl)
            loss = AGGREGATE[grpo.loss_type](losses, r.completion_mask, grpo.max_completion_length, step_tokens,
                                             config.grad_accum)
            loss.backward()
            loss_total += loss.item()
            mask = r.completion_mask
            clipped += float((cut.float() * mask).sum())
            if kl is not None:
                kl_sum += float((kl.detach() * mask).sum())
        if not math.isfinite(loss_total):
            raise LlmforgeError(f"GRPO loss became {loss_total} at step {step}",
                                hint="lower train.lr, check the rewards, or use float32 (model.dtype)")
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        all_rewards = torch.cat([r.rewards for r in rollouts])
        per_reward = torch.cat([r.per_reward for r in rollouts]).nanmean(0).tolist()
        entry = {"step": step, "loss": loss_total, "reward": all_rewards.mean().item(),
                 "reward_std": all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
                 "reward_by_function": {rw.label: v for rw, v in zip(rewards, per_reward)},
                 "kl": kl_sum / max(step_tokens, 1) if grpo.beta != 0.0 else None,
                 "completion_length": sum(int(r.attention_mask[:, -r.completion_length:].sum()) for r in rollouts)
                 / len(all_rewards), "clip_ratio": clipped / max(step_tokens, 1),
                 "lr": lr}
        log.append(entry)
        result.losses.append(loss_total)
        result.rewards.append(entry["reward"])
        if step % max(config.logging_steps, 1) == 0 or step == steps:
            print(progress_line(step, steps, entry), file=sys.stderr, flush=True)
        if (config.save_steps > 0 and step % config.save_steps == 0 and step % grpo.num_iterations == 0
                and step < steps):
            write_log(log_path, log)
            save_checkpoint(out_dir, step, model, optimizer, scheduler, config.save_total_limit)
    write_log(log_path, log)
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------- entry point
def check_settings(config: Config) -> None:
    """Refuse GRPO settings that cannot work, before anything is loaded."""
    g, t = config.grpo, config.train
    rules = (
        (g.num_generations >= 2, f"grpo.num_generations must be at least 2, got {g.num_generations}",
         "advantages compare completions within a group; typical: 4-16"),
        (t.batch_size > 0 and t.batch_size % max(g.num_generations, 1) == 0,
         f"train.batch_size ({t.batch_size}) must be a multiple of grpo.num_generations ({g.num_generations})",
         "batch_size counts completions: prompts per micro-batch = batch_size / num_generations"),
        (g.max_completion_length > 0, f"grpo.max_completion_length must be positive, got {g.max_completion_length}",
         "e.g. 256"),
        (g.max_completion_length < config.model.max_seq_length,
         f"grpo.max_completion_length ({g.max_completion_length}) leaves no room for a prompt in "
         f"model.max_seq_length ({config.model.max_seq_length})", "raise model.max_seq_length or shorten completions"),
        (g.max_prompt_length > 0, f"grpo.max_prompt_length must be positive, got {g.max_prompt_length}", "e.g. 512"),
        (g.temperature > 0, f"grpo.temperature must be > 0, got {g.temperature}", "GRPO samples; e.g. 1.0"),
        (0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}", "1.0 turns it off"),
        (g.top_k >= 0, f"grpo.top_k must be >= 0, got {g.top_k}", "0 turns it off"),
        (g.beta >= 0, f"grpo.beta must be >= 0, got {g.beta}", "0 turns the KL term off; R1 used 0.001"),
        (0 < g.epsilon < 1, f"grpo.epsilon must be in (0, 1), got {g.epsilon}", "TRL's default is 0.2"),
        (g.epsilon_high is None or g.epsilon_high > 0, f"grpo.epsilon_high must be > 0, got {g.epsilon_high}",
         "DAPO uses 0.28"),
        (g.num_iterations >= 1, f"grpo.num_iterations must be at least 1, got {g.num_iterations}", "1 is on-policy"),
        (not config.data.packing, "data.packing does not apply to GRPO", "set data.packing: false"),
        (bool(config.model.path), "model.path is not set", "set it in the config or with --set model.path=DIR"),
        (bool(config.data.path), "data.path is not set", "set it in the config or with --set data.path=FILE"),
    )
    for ok, message, hint in rules:
        if not ok:
            raise LlmforgeError(message, hint=hint)


def train_grpo(config: Config, resume: bool = False) -> Any:
    """``train.method: grpo``: prompts -> model + LoRA -> GRPO loop -> the adapter in ``<output_dir>/adapter``,
    saved as SFT saves it. Returns a :class:`llmforge.trainer.run.TrainResult`."""
    from .encode import check_token_ids, resolve_chat_template
    from .load import load_model
    from .run import ADAPTER_DIR, TrainResult, maybe_patch_kernels, save_adapter, start_output, train_lora

    from .vision import is_vision_model

    check_settings(config)
    if is_vision_model(config.model.path):
        raise LlmforgeError(f"GRPO on vision-language models ({config.model.path}) is not supported yet",
                            hint="use train.method: sft for this model, or a text-only base for GRPO")
    grpo = config.grpo
    rewards = build_rewards(grpo)                     # unknown names / unimportable functions: before any loading
    out_dir = start_output(config)
    started = time.perf_counter()
    print(f"[1/4] reading prompts {config.data.path}", file=sys.stderr)
    prompts = load_prompts(config.data.path, config.data.format)
    check_columns(rewards, [p.columns for p in prompts], config.data.path)
    print(f"[2/4] loading model {config.model.path}", file=sys.stderr)
    model, tokenizer = load_model(config.model.path, load_in_4bit=config.model.load_in_4bit,
                                  dtype=config.model.dtype, max_seq_length=config.model.max_seq_length)
    chat_template = resolve_chat_template(tokenizer, config.model.chat_template)
    room = min(grpo.max_prompt_length, config.model.max_seq_length - grpo.max_completion_length)
    truncated = encode_prompts(prompts, tokenizer, chat_template, room)
    check_token_ids(((p.row, p.ids) for p in prompts), model, tokenizer, config.model.path)
    stops = stop_token_ids(model, tokenizer)
    model = train_lora(model, config)
    maybe_patch_kernels(model, config)
    fused = use_fused_logprobs(model, config.train.kernels)
    if torch.cuda.is_available() and config.train.kernels:
        print(f"log-probs: {'fused linear + log-softmax' if fused else 'full logits (' + fused_head(model)[1] + ')'}",
              file=sys.stderr)
    summary = (f"data: {len(prompts)} prompts, {sum(len(p.ids) for p in prompts)} prompt tokens"
               + (f", {truncated} truncated to {room}" if truncated else ""))
    print(f"[3/4] GRPO ({summary.removeprefix('data: ')}; {grpo.num_generations} completions each; rewards: "
          f"{', '.join(f'{r.label} x{r.weight:g}' for r in rewards)})", file=sys.stderr)
    loop = grpo_loop(model, tokenizer, prompts, rewards, config.train, grpo, out_dir, stops, resume=resume,
                     fused_logprobs=fused)
    print(f"[4/4] saving the adapter to {out_dir / ADAPTER_DIR}", file=sys.stderr)
    adapter_dir = save_adapter(model, tokenizer, config, out_dir / ADAPTER_DIR)
    losses = loop.losses or [float("nan")]
    return TrainResult(adapter_dir=adapter_dir, output_dir=out_dir, base_model=Path(config.model.path),
                       steps=loop.steps, first_loss=losses[0], last_loss=losses[-1], losses=loop.losses,
                       data_summary=summary, seconds=time.perf_counter() - started, tokens=loop.tokens,
                       resumed_from=loop.resumed_from, rewards=loop.rewards)
