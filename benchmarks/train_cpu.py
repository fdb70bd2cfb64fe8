"""Training speed and memory of the embedded example on this CPU: llmforge's loop vs plain transformers + peft.

Both stacks train the same tiny Llama (the bundled example: built from its config, same seed) on the same
encoded data (the same response-only labels), LoRA with the same r/alpha/targets, AdamW, lr schedule, batch
size and number of steps; each in its own process so peak RSS is its own. The anchor is transformers'
``Trainer`` over a PEFT model. Prints tokens/s, peak RSS and the ratios (llmforge / anchor).

    .venv/bin/python benchmarks/train_cpu.py [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(workdir: Path, threads: int, steps: int):
    import torch

    from llmforge.trainer.data import load_examples
    from llmforge.trainer.encode import encode_all, resolve_chat_template
    from llmforge.trainer.example import build_base_model
    from llmforge.trainer.load import load_model
    from llmforge.trainer.lora import add_lora
    from llmforge.trainer.run import example_config

    torch.set_num_threads(threads)
    config = example_config([f"train.output_dir={workdir / 'out'}", f"train.max_steps={steps}",
                             f"train.threads={threads}", "train.logging_steps=1000"])
    base = build_base_model(workdir / "base")
    model, tokenizer = load_model(base, load_in_4bit=False, dtype="float32")
    _, examples = load_examples(config.data.path)
    rows, _ = encode_all(examples, tokenizer, resolve_chat_template(tokenizer, None), config.model.max_seq_length)
    torch.manual_seed(config.train.seed)
    model = add_lora(model, config.lora)
    return config, model, tokenizer, rows


def run_llmforge(workdir: Path, threads: int, steps: int) -> dict:
    from llmforge.trainer.sft import train_loop

    config, model, tokenizer, rows = prepare(workdir, threads, steps)
    result = train_loop(model, rows, config.train, Path(config.train.output_dir), tokenizer.pad_token_id)
    return {"tokens": result.tokens, "seconds": result.seconds, "first_loss": result.first_loss,
            "last_loss": result.last_loss}


def run_anchor(workdir: Path, threads: int, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    config, model, tokenizer, rows = prepare(workdir, threads, steps)
    dataset = Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels,
                                  "attention_mask": [1] * len(r.input_ids)} for r in rows])
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t = config.train
    args = TrainingArguments(output_dir=str(workdir / "hf"), max_steps=steps, per_device_train_batch_size=t.batch_size,
                             learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
                             weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[Losses()])
    seen = {"tokens": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *rest, **kw):
        seen["tokens"] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *rest, **kw)

    trainer.training_step = counting_step
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": seen["tokens"], "seconds": seconds, "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan")}


def child(stack: str, threads: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_llmforge if stack == "llmforge" else run_anchor)(Path(tmp), threads, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["llmforge", "anchor"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.steps)
        return
    results = {}
    for stack in ("anchor", "llmforge"):
        proc = subprocess.run([sys.executable, __file__, "--child", stack, "--threads", str(args.threads),
                               "--steps", str(args.steps)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{stack} failed:\n{proc.stderr[-3000:]}")
        results[stack] = json.loads(line[7:])
    print(f"embedded example, {args.steps} steps, {args.threads} threads")
    print(f"{'stack':<26}{'tokens/s':>10}{'peak RSS MB':>13}{'loss first->last':>22}")
    for stack, name in (("anchor", "transformers+peft Trainer"), ("llmforge", "llmforge")):
        r = results[stack]
        print(f"{name:<26}{r['tokens'] / r['seconds']:>10,.0f}{r['peak_rss_mb']:>13,.0f}"
              f"{r['first_loss']:>12.4f} -> {r['last_loss']:.4f}")
    a, b = results["anchor"], results["llmforge"]
    print(f"ratio llmforge/anchor: tokens/s {(b['tokens'] / b['seconds']) / (a['tokens'] / a['seconds']):.2f}x, "
          f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
