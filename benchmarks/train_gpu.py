#!/usr/bin/env python3
"""QLoRA SFT on a GPU: llmforge's kernels against transformers + PEFT + bitsandbytes and against Unsloth.

Random Llama-3.2-1B / Llama-3.1-8B shaped models, NF4 double quant, bf16 compute, LoRA r=16 on all 7
projections, seq 2048, gradient checkpointing, torch AdamW. The reference configurations are the team's
anchor kit (``.anchors/gpu-train/train_anchor.py``, a copy of ``../shared/anchors/gpu-train``); the llmforge
configurations run the *same* ``train_anchor.py`` loop (same model files, data, step, timers, memory
counters) with one difference: after the HF + PEFT setup, ``llmforge.kernels.patch.patch_model`` swaps in
the fused kernels and offloaded checkpointing. Each configuration runs in its own process
(``benchmarks/gpu_run.sh`` drives them).

  python benchmarks/train_gpu.py run --config llmforge-1b --models /tmp/models --result r.json
  python benchmarks/train_gpu.py table --results DIR           # table + ratios llmforge / anchors
  python benchmarks/train_gpu.py maxseq --stack llmforge --size 8b --models /tmp/models --budget-s 200
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR_CANDIDATES = [os.environ.get("LLMFORGE_ANCHOR", ""), str(REPO / ".anchors" / "gpu-train"),
                     str(REPO.parent / "shared" / "anchors" / "gpu-train")]
ANCHOR = next((p for p in ANCHOR_CANDIDATES if p and (Path(p) / "train_anchor.py").exists()), None)
if ANCHOR is None:
    sys.exit("train_gpu: anchor kit not found (copy ../shared/anchors/gpu-train to .anchors/gpu-train)")
sys.path.insert(0, ANCHOR)
sys.path.insert(0, str(REPO))
import train_anchor as A  # noqa: E402

from llmforge.trainer.load import EXPANDABLE_SEGMENTS  # noqa: E402  (what `llmforge train` sets itself)

SIZES = ("1b", "8b", "tiny")
BATCH = {"1b": 4, "8b": 2, "tiny": 2}
# The llmforge configurations are ``llmforge-SIZE`` followed by any of these flags, in this order (each read from
# the name; e.g. ``llmforge-8b-hostw-fp8-graphs-expseg-trim-chunk``):
FLAGS = {
    "-hostw": "frozen untied embeddings and lm_head in pinned host memory, the loss streaming lm_head (tied 1B: no-op)",
    "-fp8": "the frozen base matmuls on e4m3 operands (train.fp8; changes the numbers)",
    "-graphs": "each layer's forward and backward replayed as CUDA graphs (patch_model(cuda_graphs=True))",
    "-expseg": "the allocator's expandable segments (reserved memory close to allocated: less fragmentation)",
    "-trim": "the allocator's free cache handed back once after the graphs are captured (LLMFORGE_GRAPH_TRIM=1)",
    "-lightwarm": "the capture stream warmed by two tiny matmuls, not a run of the layer (LLMFORGE_GRAPH_WARMUP=light)",
    "-chunk": "the MLP's backward in row chunks of 32 MiB per (rows, ffn) tensor (LLMFORGE_MLP_CHUNK_MIB=32)",
    "-prefetch": "the first 512 MiB of a host lm_head copied during the forward (LLMFORGE_LM_HEAD_PREFETCH_MIB=512)",
    "-nooffload": "plain non-reentrant checkpointing instead of the offloaded one, to price the offload",
}
# the variants the table lists first (any other flag combination found among the results follows)
VARIANTS = ("", "-hostw", "-fp8", "-hostw-fp8", "-graphs", "-fp8-graphs", "-hostw-fp8-graphs",
            "-hostw-fp8-expseg", "-fp8-graphs-expseg", "-hostw-fp8-graphs-expseg")


def variant_of(config: str) -> str | None:
    """The flags of an llmforge configuration name (``-hostw-fp8``; "" for the plain one), or None when the name
    is not ``llmforge-SIZE`` followed by flags of ``FLAGS`` in their order."""
    for size in SIZES:
        prefix = f"llmforge-{size}"
        if config == prefix or config.startswith(prefix + "-"):
            rest, order = config[len(prefix):], list(FLAGS)
            flags = ["-" + part for part in rest.split("-")[1:]]
            known = all(f in FLAGS for f in flags) and [order.index(f) for f in flags] == sorted(
                order.index(f) for f in set(flags)) and len(set(flags)) == len(flags)
            return rest if known else None
    return None


def register(config: str) -> None:
    """Make an llmforge configuration name known to the anchor's loop (``SystemExit`` for unknown flags)."""
    if variant_of(config) is None:
        sys.exit(f"train_gpu: unknown configuration {config!r}: llmforge-SIZE ({', '.join(SIZES)}) followed by "
                 f"flags from {' '.join(FLAGS)} in that order")
    size = config.split("-")[1]
    A.CONFIGS[config] = ("llmforge", size, BATCH[size])


OFFLOAD = {"value": True}
HOST_WEIGHTS = {"value": False}  # the plain configs keep the weights on the device, as measured before
FP8 = {"value": False}
GRAPHS = {"value": False}
SWITCH_FLAGS = {"value": ""}   # the flags of the configurations run, for ``set_switches``

_setup_hf = A.setup_hf


def _segments() -> str:
    """Reserved and allocated GiB of the CUDA allocator's segments, by (stream, pool)."""
    import torch

    by = {}
    for seg in torch.cuda.memory_snapshot():
        key = (seg.get("stream"), tuple(seg.get("segment_pool_id", ())))
        total, used = by.get(key, (0, 0))
        by[key] = (total + seg["total_size"], used + seg["allocated_size"])
    return "; ".join(f"{k}: {t / 2**30:.2f} reserved / {u / 2**30:.2f} allocated" for k, (t, u) in by.items())


def _allocator_stats() -> str:
    """The CUDA allocator's fragmentation counters: free bytes inside split blocks (now / peak), cudaMalloc
    retries after a cache flush, device allocations and frees, and for expandable segments mapped bytes."""
    import torch

    st = torch.cuda.memory_stats()
    gib = 2**30
    return (f"inactive split {st.get('inactive_split_bytes.all.current', 0) / gib:.2f} GiB now / "
            f"{st.get('inactive_split_bytes.all.peak', 0) / gib:.2f} peak; alloc retries {st.get('num_alloc_retries', 0)}; "
            f"device allocs {st.get('num_device_alloc', 0)} / frees {st.get('num_device_free', 0)}; "
            f"segments {st.get('segment.all.current', 0)} (peak {st.get('segment.all.peak', 0)})")


def _watch_reserved(model, graphs, steps: int = 4, step_gib: float = 0.0625) -> list[str]:
    """Where the reserved peak is reached in the first ``steps`` steps: at each step's start and after each layer
    graph call, a line whenever ``max_memory_reserved`` passed the last reported value by ``step_gib`` (the call
    during which it grew, captures so far, current reserved and allocated, and the segments by (stream, pool))."""
    import torch

    state = {"step": 0, "calls": 0, "reported": 0.0}
    lines: list[str] = []

    def note(where: str) -> None:
        if state["step"] > steps:
            return
        peak = torch.cuda.max_memory_reserved() / 2**30
        if peak >= state["reported"] + step_gib:
            state["reported"] = peak
            captured = sum(n for what, n in graphs.counts.items() if what.startswith("captured"))
            lines.append(f"step {state['step']} {where} (captured {captured}): peak reserved {peak:.2f}, reserved "
                         f"{torch.cuda.memory_reserved() / 2**30:.2f}, allocated {torch.cuda.memory_allocated() / 2**30:.2f}"
                         f" GiB; {_segments()}")

    def step_start(*_):
        note("at its end (loss, backward's rest, optimizer)" if state["step"] else "before training")
        state["step"] += 1
        state["calls"] = 0

    def wrap(name: str):
        method = getattr(graphs, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            state["calls"] += 1
            note(f"after {name} call {state['calls']}")
            return result
        setattr(graphs, name, call)

    model.register_forward_pre_hook(step_start)
    wrap("forward")
    wrap("backward")
    return lines


def set_switches(flags: str) -> None:
    """llmforge's A/B switches as the configuration's flags say (the settings behind LLMFORGE_MLP_CHUNK_MIB,
    _LM_HEAD_PREFETCH_MIB, _GRAPH_TRIM and _GRAPH_WARMUP, set on the modules directly)."""
    from llmforge.kernels import cross_entropy, fast_lora, layer_graphs

    fast_lora.MLP_CHUNK_BYTES[0] = (32 << 20) if "-chunk" in flags else 0
    cross_entropy.PREFETCH_BYTES[0] = (512 << 20) if "-prefetch" in flags else 0
    layer_graphs.TRIM_AFTER_CAPTURE, layer_graphs.LIGHT_WARMUP = "-trim" in flags, "-lightwarm" in flags


def setup_llmforge(path, args, dev):
    """The anchor's HF + PEFT setup, then llmforge's kernels patched in."""
    model, extra = _setup_hf(path, args, dev)
    from llmforge.kernels import cross_entropy, fast_lora, layer_graphs
    from llmforge.kernels.patch import patch_model

    set_switches(SWITCH_FLAGS["value"])
    report = patch_model(model, offload_checkpointing=None if OFFLOAD["value"] else False,
                         offload_frozen_weights=HOST_WEIGHTS["value"], fp8_base=FP8["value"],
                         cuda_graphs=GRAPHS["value"])
    A.log(report.summary())
    import atexit

    import torch

    if torch.cuda.is_available():
        atexit.register(lambda: A.log("allocator: " + _allocator_stats()))
    if report.layer_graphs is not None:   # what ran as graphs, once the run is over
        reserved_at_step = []   # reserved GiB as each step's forward starts (no sync)
        model.register_forward_pre_hook(
            lambda *_: reserved_at_step.append(round(torch.cuda.memory_reserved() / 2**30, 2)))
        growth = _watch_reserved(model, report.layer_graphs)
        atexit.register(lambda: A.log(f"{report.layer_graphs.stats()}; at exit: allocated "
                                      f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
                                      f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB; reserved at each step's start "
                                      f"{reserved_at_step[:8]}; segments (stream, pool): {_segments()}"))
        atexit.register(lambda: [A.log(f"reserved growth: {line}") for line in growth[:40]])
    extra.update(kernels=report.summary(), kernels_backend=report.backend,
                 kernels_lora_linear=report.lora_linear, kernels_mlp=report.mlp_fused_lora,
                 kernels_qkv=report.qkv_fused_lora,
                 kernels_offloaded_layers=report.offloaded_checkpoint_layers, kernels_host_weights=report.host_weights,
                 kernels_fp8_base=report.fp8_base, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                 graph_trim=layer_graphs.TRIM_AFTER_CAPTURE, light_warmup=layer_graphs.LIGHT_WARMUP,
                 mlp_chunk_mib=fast_lora.MLP_CHUNK_BYTES[0] >> 20, lm_head_prefetch_mib=cross_entropy.PREFETCH_BYTES[0] >> 20)
    return model, extra


STACKS = ["llmforge", "llmforge-hostw", "llmforge-fp8", "llmforge-hostw-fp8", "llmforge-graphs", "llmforge-fp8-graphs",
          "llmforge-hostw-fp8-graphs", "hf", "unsloth"]


def stack_setup(stack: str):
    """The setup function of a stack name (``llmforge-hostw``: llmforge with the frozen weights on the host,
    ``-fp8``: the FP8 base matmuls, ``-graphs``: CUDA graphs per layer)."""
    if stack.startswith("llmforge"):
        HOST_WEIGHTS["value"], FP8["value"], GRAPHS["value"] = "-hostw" in stack, "-fp8" in stack, "-graphs" in stack
        return setup_llmforge
    return {"unsloth": A.setup_unsloth, "hf": A.setup_hf}[stack]


# ------------------------------------------------------------------------------------------- table
def _load(results: str, name: str) -> dict | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        rc_path = os.path.join(results, f"{name}.rc")
        return {"status": f"no result (rc={open(rc_path).read().strip()})"} if os.path.exists(rc_path) else None
    with open(path) as f:
        return json.load(f)


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _memory_name(variant: str) -> str:
    """Which peak a variant is judged by: CUDA graphs keep their memory pool reserved between replays, where
    ``max_memory_allocated`` does not see it, so graph variants are judged by their reserved peak (against the
    reference's allocated peak: the stricter comparison)."""
    return "peak reserved vs alloc" if "-graphs" in variant else "peak alloc"


def _memory_ratio(ours: dict, other: dict, variant: str) -> float | None:
    key = "train_peak_reserved_gib" if "-graphs" in variant else "train_peak_alloc_gib"
    if not (ours.get(key) and other.get("train_peak_alloc_gib")):
        return None
    return ours[key] / other["train_peak_alloc_gib"]


def table(results: str) -> str:
    lines = ["| config | status | batch | tokens/s | peak alloc GiB | peak reserved GiB | loss first->last | notes |",
             "|---|---|---|---|---|---|---|---|"]
    found: dict[str, dict] = {}
    stored = sorted(f[:-5] for f in os.listdir(results) if f.endswith(".json")
                    and variant_of("llmforge-" + f[:-5].removeprefix("trainer-").removeprefix("llmforge-")) is not None)
    for size in ("1b", "8b", "tiny"):
        ours = [n for n in stored if n.split("-")[0] in ("llmforge", "trainer") and n.split("-")[1] == size]
        for name in (*sorted(ours, key=lambda n: (n.startswith("trainer"), n.count("-"), n)), f"hf-{size}",
                     f"unsloth-{size}"):
            r = _load(results, name)
            if r is None:
                continue
            found[name] = r
            ok = r.get("status") == "ok"
            note = r.get("kernels") or r.get("error") or ""
            lines.append(f"| {name} | {r.get('status')} | {r.get('batch', '-')} | "
                         f"{_num(r.get('tokens_per_s'), 0)} | {_num(r.get('train_peak_alloc_gib'), 2)} | "
                         f"{_num(r.get('train_peak_reserved_gib'), 2)} | "
                         f"{_num(r.get('loss_first'), 3)}->{_num(r.get('loss_last'), 3)} | {note[:140]} |" if ok else
                         f"| {name} | {r.get('status')} | - | - | - | - | - | {str(note)[:200]} |")
    variants = [*VARIANTS, *sorted({v for name in found if (v := variant_of(name)) is not None} - set(VARIANTS),
                                    key=lambda v: (v.count("-"), v))]
    for size in ("1b", "8b", "tiny"):
        for variant in variants:
            ours = found.get(f"llmforge-{size}{variant}")
            if not ours or ours.get("status") != "ok":
                continue
            for ref in ("hf", "unsloth", "llmforge") if variant else ("hf", "unsloth"):
                other = found.get(f"{ref}-{size}")
                if other and other.get("status") == "ok":
                    m = _memory_ratio(ours, other, variant)
                    mem = "-" if m is None else f"{m:.2f}x"
                    lines.append(f"{size}: llmforge{variant}/{ref} tokens/s = "
                                 f"{ours['tokens_per_s'] / other['tokens_per_s']:.2f}x, {_memory_name(variant)} = {mem}")
    for name, r in found.items():   # llmforge's own loop (``trainer_bench``) against the anchor loop's numbers
        if not name.startswith("trainer-") or r.get("status") != "ok":
            continue
        size, flags = name.split("-")[1], name.removeprefix(f"trainer-{name.split('-')[1]}")
        for ref in (f"hf-{size}", f"llmforge-{size}{flags}"):
            other = found.get(ref)
            if other and other.get("status") == "ok":
                m = _memory_ratio(r, other, flags)
                lines.append(f"{size}: {name}/{ref} tokens/s = {r['tokens_per_s'] / other['tokens_per_s']:.2f}x, "
                             f"{_memory_name(flags)} = {'-' if m is None else f'{m:.2f}x'}")
    targets = {"8b": ("hf", 2.0, 0.40), "1b": ("unsloth", 1.0, 1.0)}
    for (size, (ref, speed, memory)), variant in ((t, v) for t in targets.items() for v in variants):
        ours, other = found.get(f"llmforge-{size}{variant}"), found.get(f"{ref}-{size}")
        m = _memory_ratio(ours, other, variant) if ours and other else None
        if ours and other and ours.get("status") == other.get("status") == "ok" and m is not None:
            s = ours["tokens_per_s"] / other["tokens_per_s"]
            verdict = "MET" if (s >= speed and m <= memory) else "NOT MET"
            lines.append(f"target {size}{variant} vs {ref}: tokens/s >= {speed}x and memory <= {memory}x -> "
                         f"{s:.2f}x / {m:.2f}x ({_memory_name(variant)}) {verdict}")
    for size in ("1b", "8b", "tiny"):
        for stack in STACKS:
            path = os.path.join(results, f"memscale-{stack}-{size}.json")
            if os.path.exists(path):
                m = json.loads(Path(path).read_text())
                lines.append(f"memscale {stack}-{size}: peak {m['peak_gib'][0]:.2f} GiB at seq {m['seqs'][0]}, "
                             f"{m['peak_gib'][1]:.2f} GiB at {m['seqs'][1]} ({m['gib_per_1k_tokens']:.3f} GiB per 1k "
                             f"tokens) -> estimated longest seq {m['est_max_seq']} on {m['gpu_total_gib']:.0f} GiB")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ longest sequence
def maxseq(args) -> int:
    """Longest seq (batch 1) for which one full training step fits, by doubling then bisection, in this
    process (an OOM is caught and the cache emptied between tries)."""
    import argparse

    ns = argparse.Namespace(seq=args.start, no_quant=False, hf_attn="sdpa", hf_kbit_prep=False,
                            device="cuda", budget_s=args.budget_s)
    path = A.model_dir(args.models, args.size)
    t0 = time.time()
    model, _ = stack_setup(args.stack)(path, ns, "cuda")
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)

    def fits(seq: int) -> bool:
        try:
            ids = torch.randint(0, 128000, (1, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        opt.zero_grad(set_to_none=True)
        loss = ids = None
        torch.cuda.empty_cache()
        A.log(f"maxseq {args.stack}-{args.size}: seq {seq} {'fits' if ok else 'OOM'}")
        return ok

    good, bad = 0, None
    seq = args.start
    while bad is None and time.time() - t0 < args.budget_s:
        if fits(seq):
            good, seq = seq, seq * 2
        else:
            bad = seq
    while bad is not None and bad - good > args.resolution and time.time() - t0 < args.budget_s:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    result = {"stack": args.stack, "size": args.size, "max_seq_fits": good, "first_oom": bad,
              "complete": bad is not None and (bad - good) <= args.resolution,
              "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    A.log("MAXSEQ " + json.dumps(result))
    if args.result:
        Path(args.result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------- llmforge's own loop
def trainer_bench(args) -> int:
    """``trainer-SIZE-FLAGS``: ``llmforge train``'s own path (``load_model``, ``train_lora``, ``maybe_patch_kernels``,
    ``train_loop``: no host sync per step, loss read one step late) on the anchor's random model and the anchor's
    settings (LoRA r=16, alpha 16 on the 7 projections, AdamW lr 2e-4, clip 1.0, seq ``--seq``, batch of the size),
    on random tokens. ``--warmup`` steps first (compiles, graph captures), then ``--steps`` timed ones; the peak
    memory is taken over both, as the anchor does. Flags: ``-hostw`` (train.offload_embeddings), ``-fp8``,
    ``-graphs`` (train.cuda_graphs), ``-chunk``, ``-prefetch``, ``-trim``, ``-lightwarm``; the trainer sets the
    allocator's expandable segments itself, ``-nooffload`` does not apply."""
    import tempfile

    import torch

    from llmforge.trainer.config import load_config
    from llmforge.trainer.encode import Encoded
    from llmforge.trainer.load import load_model, prefer_expandable_segments
    from llmforge.trainer.run import layer_graphs_of, maybe_patch_kernels, train_lora
    from llmforge.trainer.sft import collate, train_loop

    flags = variant_of("llmforge-" + args.config.removeprefix("trainer-"))
    if flags is None or "-nooffload" in flags:
        sys.exit(f"train_gpu: unknown trainer configuration {args.config!r}")
    size = args.config.split("-")[1]
    prefer_expandable_segments()
    set_switches(flags)
    cuda = args.device.startswith("cuda")
    out = Path(tempfile.mkdtemp(prefix="trainer_bench_"))
    config = load_config({
        "model": {"path": str(A.model_dir(args.models, size)), "load_in_4bit": cuda and not args.no_quant,
                  "dtype": "bfloat16", "max_seq_length": args.seq},
        "lora": {"r": 16, "alpha": 16, "target_modules": list(A.TARGET_MODULES)},
        "train": {"output_dir": str(out), "batch_size": BATCH[size], "lr": 2e-4, "max_grad_norm": 1.0,
                  "lr_scheduler": "constant", "gradient_checkpointing": "on", "logging_steps": 10 ** 6,
                  "offload_embeddings": "on" if "-hostw" in flags else "off", "fp8": "-fp8" in flags,
                  "cuda_graphs": "-graphs" in flags}})
    model, tokenizer = load_model(config.model.path, load_in_4bit=config.model.load_in_4bit, dtype="bfloat16",
                                  max_seq_length=args.seq)
    model = train_lora(model, config)
    kernels = maybe_patch_kernels(model, config, graphs=True)
    A.log(f"trainer {args.config}: {kernels}")
    graphs = layer_graphs_of(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]

    def rows(n: int) -> list:
        ids = torch.randint(0, vocab, (n, args.seq), generator=g).tolist()
        return [Encoded(r, list(r), i) for i, r in enumerate(ids)]

    def loop(steps: int):
        config.train.max_steps = steps
        return train_loop(model, rows(steps * BATCH[size]), config.train, out, tokenizer.pad_token_id or 0,
                          collate_fn=functools.partial(collate, length=args.seq) if graphs is not None else collate)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = loop(args.warmup)
    timed = loop(args.steps)
    if cuda:
        torch.cuda.synchronize()
    result = {"config": args.config, "status": "ok", "batch": BATCH[size], "tokens_per_s": timed.tokens / timed.seconds,
              "step_time_mean_s": timed.seconds / timed.steps, "timed_steps": timed.steps,
              "train_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "train_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
              "loss_first": warm.first_loss, "loss_last": timed.last_loss, "kernels": kernels,
              "graphs": graphs.stats() if graphs is not None else None}
    A.log("RESULT " + json.dumps(result))
    if args.result:
        Path(args.result).write_text(json.dumps(result))
    return 0


def memscale(args) -> int:
    """Peak memory of one training step (batch 1) at two sequence lengths, and the longest sequence that
    fits the GPU by linear extrapolation of that peak (attention is SDPA/flash and the rest is linear in
    tokens, so peak memory is linear in the sequence length). An estimate, labelled as such."""
    import argparse

    ns = argparse.Namespace(seq=max(args.seqs), no_quant=args.device == "cpu", hf_attn="sdpa", hf_kbit_prep=False,
                            device=args.device, budget_s=600)
    path = A.model_dir(args.models, args.size)
    setup = stack_setup(args.stack)
    model, _ = setup(path, ns, args.device)
    import torch

    cuda = args.device.startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    peaks, times = [], []
    for seq in args.seqs:
        ids = torch.randint(0, 127000, (1, seq), device=args.device)
        for _ in range(2):  # the second step has the optimizer state, like the timed steps of `run`
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        A.log(f"memscale {args.stack}-{args.size}: seq {seq} peak {peaks[-1]:.2f} GiB step {times[-1]:.2f}s")
        del loss, ids
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    slope = (peaks[1] - peaks[0]) / (args.seqs[1] - args.seqs[0])
    usable = total - 1.5  # CUDA context, allocator slack
    estimate = int(args.seqs[1] + (usable - peaks[1]) / slope) if slope > 0 else None
    result = {"stack": args.stack, "size": args.size, "seqs": args.seqs, "peak_gib": peaks, "step_s": times,
              "gib_per_1k_tokens": slope * 1000, "gpu_total_gib": total, "est_max_seq": estimate}
    A.log("MEMSCALE " + json.dumps(result))
    if args.result:
        Path(args.result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------- profile
def profile(args) -> int:
    """Where one training step's GPU time goes: torch.profiler over ``--steps`` steps after warm-up, for one
    stack, the same step as ``run`` (autocast bf16, backward, clip, AdamW). Prints the top kernels by
    self CUDA time and the step's wall time."""
    import argparse

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ns = argparse.Namespace(seq=args.seq, no_quant=False, hf_attn="sdpa", hf_kbit_prep=False, device="cuda",
                            budget_s=600)
    path = A.model_dir(args.models, args.size)
    setup = stack_setup(args.stack)
    model, _ = setup(path, ns, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, 127000, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.steps
    A.log(f"PROFILE peak alloc over the timed steps {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB")
    A.log(sync_line(step))
    if args.memory:
        peak_breakdown(step, args.rows)
        return 0
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    A.log(f"PROFILE {args.stack}-{args.size} batch {args.batch} seq {args.seq}: step {wall * 1000:.1f} ms, "
          f"{args.batch * args.seq / wall:,.0f} tokens/s")
    events = prof.key_averages()
    try:
        A.log(gpu_busy_line(events, wall, args.steps))
    except (AttributeError, ZeroDivisionError) as exc:   # a diagnostic line; the tables below are the result
        A.log(f"PROFILE GPU busy: not computed ({exc})")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    print("HOST: by self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=90))
    return 0


def gpu_busy_line(events, wall_s: float, steps: int) -> str:
    """Kernel time per step (copies apart: they run on the offload side stream) against the unprofiled step's
    wall time: far below 100% means the host, not the GPU, sets the pace."""
    copies = sum(e.self_device_time_total for e in events if e.key.startswith("Memcpy")) / 1e3 / steps
    kernels = sum(e.self_device_time_total for e in events
                  if not e.key.startswith("Memcpy") and e.device_type.name == "CUDA") / 1e3 / steps
    busy = kernels / (wall_s * 1e3)
    return (f"PROFILE GPU busy: kernels {kernels:.1f} ms per step (+ copies {copies:.1f} ms) vs step "
            f"{wall_s * 1e3:.1f} ms -> {100 * busy:.0f}%{' (the host sets the pace)' if busy < 0.85 else ''}")


def sync_line(step) -> str:
    """The host-device synchronizations of one step (torch's sync debug mode) and where: each one stalls the
    host until the GPU drains its queue, so the host cannot run ahead."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_kernels_check import host_syncs

    count, places = host_syncs(step, torch.device("cuda"))
    return f"PROFILE syncs in one step: {count}{' at ' + places if places else ''}"


def _site(frames: list[dict]) -> str:
    """Where an allocation was made: its first llmforge frame and first transformers/peft frame (file:line)."""
    def first(keys):
        for f in frames:
            name = f.get("filename", "")
            if any(k in name for k in keys):
                return f"{name.split('/')[-1]}:{f.get('line')}:{f.get('name')}"
        return "-"
    return f"{first(('llmforge',))} < {first(('transformers/', 'peft/', 'train_anchor'))}"


def peak_breakdown(step, rows: int) -> None:
    """Allocations live at the step's peak (above what was allocated before it), grouped by where they were
    made: replays the allocator trace of one recorded step."""
    import collections

    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live, total, best, best_at = {}, 0, 0, -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > best:
                best, best_at = total, i
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    live = {}
    for ev in trace[: best_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_requested":
            live.pop(ev["addr"], None)
    groups = collections.Counter()
    counts = collections.Counter()
    for ev in live.values():
        key = _site(ev.get("frames", []))
        groups[key] += ev["size"]
        counts[key] += 1
    A.log(f"MEMORY before the step {base / 2**30:.3f} GiB, step peak {torch.cuda.max_memory_allocated() / 2**30:.3f} "
          f"GiB; live at the peak, allocated during the step: {best / 2**20:.0f} MiB in {len(live)} tensors "
          f"(peak at trace event {best_at} of {len(trace)}: {_site(trace[best_at].get('frames', []))})")
    for key, size in groups.most_common(rows):
        print(f"MEMORY {size / 2**20:9.1f} MiB {counts[key]:4d}x {key}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("--results", required=True)
        p.add_argument("--write", default=None)
        a = p.parse_args(argv[1:])
        text = table(a.results)
        print(text)
        if a.write:
            Path(a.write).write_text(text + "\n")
        return 0
    if argv[:1] == ["maxseq"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("--stack", choices=STACKS, required=True)
        p.add_argument("--size", choices=["1b", "8b"], required=True)
        p.add_argument("--models", default="/tmp/models")
        p.add_argument("--start", type=int, default=4096)
        p.add_argument("--resolution", type=int, default=2048)
        p.add_argument("--budget-s", type=float, default=200)
        p.add_argument("--result", default=None)
        return maxseq(p.parse_args(argv[1:]))
    if argv[:1] == ["memscale"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("--stack", choices=STACKS, required=True)
        p.add_argument("--size", choices=["1b", "8b", "tiny"], required=True)
        p.add_argument("--models", default="/tmp/models")
        p.add_argument("--seqs", type=int, nargs=2, default=[4096, 16384])
        p.add_argument("--device", default="cuda")
        p.add_argument("--result", default=None)
        return memscale(p.parse_args(argv[1:]))
    if argv[:1] == ["profile"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("--stack", choices=STACKS, required=True)
        p.add_argument("--size", choices=["1b", "8b", "tiny"], required=True)
        p.add_argument("--models", default="/tmp/models")
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--rows", type=int, default=45)
        p.add_argument("--memory", action="store_true",
                       help="instead of the profiler: what is live at the step's peak, by allocation site")
        return profile(p.parse_args(argv[1:]))
    if argv[:1] == ["run"] and any(a.startswith("trainer-") for a in argv):
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("--config", required=True)
        p.add_argument("--models", default="/tmp/models")
        p.add_argument("--result", default=None)
        p.add_argument("--device", default="cuda")
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--steps", type=int, default=25)
        p.add_argument("--no-quant", action="store_true")
        p.add_argument("--budget-s", type=float, default=None)   # gpu_run.sh passes it; the timeout bounds the run
        return trainer_bench(p.parse_known_args(argv[1:])[0])
    if argv[:1] == ["run"]:
        A.setup_hf = setup_llmforge  # only llmforge-* configs are run through this script
        OFFLOAD["value"] = not any(a.endswith("-nooffload") for a in argv)
        configs = [a for a in argv if a.startswith("llmforge-")]
        for config in configs:
            register(config)
        HOST_WEIGHTS["value"] = any("-hostw" in a for a in configs)
        FP8["value"] = any("-fp8" in a for a in configs)
        GRAPHS["value"] = any("-graphs" in a for a in configs)
        SWITCH_FLAGS["value"] = "".join(configs)
        if any("-expseg" in a for a in configs):   # read when CUDA's allocator starts: before any tensor
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return A.main(argv)


if __name__ == "__main__":
    sys.exit(main())
