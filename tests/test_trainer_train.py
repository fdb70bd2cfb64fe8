"""Training on the bundled tiny Llama: loss falls for every data format and file kind, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.trainer.config import load_config
from llmforge.trainer.example import build_base_model
from llmforge.trainer.run import train

QA = [("What is 2 + 3?", "2 + 3 = 5."), ("What is 4 + 1?", "4 + 1 = 5."), ("What is 6 + 2?", "6 + 2 = 8."),
      ("What is 7 + 1?", "7 + 1 = 8."), ("What is 3 + 3?", "3 + 3 = 6."), ("What is 1 + 1?", "1 + 1 = 2.")]


def rows_in(fmt: str) -> list[dict]:
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a} for q, a in QA]
    return [{"text": f"Question: {q} Answer: {a}"} for q, a in QA]


def write(rows: list[dict], path: Path) -> Path:
    """One file kind per format, so every reader is exercised."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "model")


def config_for(base: Path, data: Path, out: Path, **train):
    settings = {"max_steps": 12, "batch_size": 6, "lr": 0.003, "threads": 1, "logging_steps": 4, **train}
    return load_config({"model": {"path": str(base), "load_in_4bit": False, "max_seq_length": 64},
                        "data": {"path": str(data)}, "lora": {"r": 16, "alpha": 32},
                        "train": {"output_dir": str(out), **settings}})


@pytest.mark.parametrize("fmt,suffix", [("messages", ".jsonl"), ("sharegpt", ".json"), ("alpaca", ".parquet"),
                                        ("text", "")])
def test_loss_falls_for_each_format(base: Path, tmp_path: Path, fmt: str, suffix: str) -> None:
    data = write(rows_in(fmt), tmp_path / f"data{suffix or '_ds'}")
    result = train(config_for(base, data, tmp_path / "out"))
    assert len(result.losses) == 12
    assert result.last_loss < 0.5 * result.first_loss, result.losses
    adapter = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "llmforge_train.json"):
        assert (adapter / name).is_file(), name
    assert "<|im_start|>" in (adapter / "chat_template.jinja").read_text()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert not list(tmp_path.glob("out/.*tmp"))  # nothing half-written left behind


def test_resume_continues_the_same_loss_curve(base: Path, tmp_path: Path) -> None:
    data = write(rows_in("messages"), tmp_path / "data.jsonl")
    full = train(config_for(base, data, tmp_path / "full", max_steps=8, save_steps=4, batch_size=4))
    # an interrupted run: the same config stopped after its step-4 checkpoint
    part_dir = tmp_path / "part"
    train(config_for(base, data, part_dir, max_steps=8, save_steps=4, batch_size=4))
    for later in part_dir.glob("checkpoint-*"):
        assert later.name == "checkpoint-4"
    log = [json.loads(line) for line in (part_dir / "train_log.jsonl").read_text().splitlines()]
    (part_dir / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log if e["step"] <= 4))
    resumed = train(config_for(base, data, part_dir, max_steps=8, save_steps=4, batch_size=4), resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5, abs=1e-6)
    logged = [json.loads(line)["loss"] for line in (part_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_different_seed_gives_a_different_curve(base: Path, tmp_path: Path) -> None:
    data = write(rows_in("messages"), tmp_path / "data.jsonl")
    a = train(config_for(base, data, tmp_path / "a", max_steps=3, seed=1))
    b = train(config_for(base, data, tmp_path / "b", max_steps=3, seed=2))
    assert a.losses != b.losses


def test_packing_fills_rows_without_losing_tokens() -> None:
    from llmforge.trainer.encode import Encoded
    from llmforge.trainer.sft import pack

    rows = [Encoded(list(range(n)), [-100] + list(range(1, n)), i) for i, n in enumerate([10, 20, 30, 40, 5])]
    packed = pack(rows, 50)
    assert [len(r.input_ids) for r in packed] == [30, 30, 45]
    assert sum(len(r.labels) for r in packed) == 105
    assert packed[2].labels[:41] == rows[3].labels + [-100]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU fallback")
def test_4bit_without_cuda_falls_back_with_a_note(base: Path, capsys) -> None:
    import torch

    from llmforge.trainer.load import load_model

    model, tokenizer = load_model(base, load_in_4bit=True)
    assert "4-bit loading needs CUDA" in capsys.readouterr().err
    assert next(model.parameters()).dtype == torch.float32 and not getattr(model, "is_loaded_in_4bit", False)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


def test_each_steps_loss_is_read_after_the_next_step_is_queued(base: Path, tmp_path: Path, monkeypatch) -> None:
    """The loop never waits for the step it has just queued: step k's loss is read back (and checked, logged)
    only after step k+1's forward, backward and optimizer step are issued; the last one after the loop. A
    checkpoint step is read before its checkpoint is written. The logged losses are those of every step."""
    from llmforge.trainer import sft

    events: list[tuple[str, int]] = []
    real_loss, real_record, real_save = sft.summed_loss, sft._record, sft.save_checkpoint

    def loss(model, batch):
        events.append(("forward", sum(1 for kind, _ in events if kind == "forward") + 1))
        return real_loss(model, batch)

    def record(done, *args):
        events.append(("read", done.step))
        return real_record(done, *args)

    def save(out_dir, step, *args):
        events.append(("save", step))
        return real_save(out_dir, step, *args)

    monkeypatch.setattr(sft, "summed_loss", loss)
    monkeypatch.setattr(sft, "_record", record)
    monkeypatch.setattr(sft, "save_checkpoint", save)
    data = write(rows_in("messages"), tmp_path / "data.jsonl")
    result = train(config_for(base, data, tmp_path / "out", max_steps=5, save_steps=3, batch_size=4))
    assert events == [("forward", 1), ("forward", 2), ("read", 1), ("forward", 3), ("read", 2), ("read", 3),
                      ("save", 3), ("forward", 4), ("forward", 5), ("read", 4), ("read", 5)]
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4, 5]
    assert [e["loss"] for e in logged] == pytest.approx(result.losses) and len(result.losses) == 5


def test_cuda_graphs_pad_every_batch_to_the_fixed_length(base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """With layer graphs on (a stand-in here: graphs need CUDA), every batch the model sees has the one shape
    ``model.max_seq_length``, and the graphs' stats are printed after training; without them, batches keep
    their own length."""
    from llmforge.trainer import run

    seen: list[tuple] = []

    class StandIn:
        def stats(self) -> str:
            return "layer graphs: stand-in"

    def patch(model, config, host_weights=True, graphs=False):
        assert graphs is True, "text SFT keeps one batch shape: it must say so"
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                        with_kwargs=True)
        return "stand-in"

    monkeypatch.setattr(run, "maybe_patch_kernels", patch)
    data = write(rows_in("messages"), tmp_path / "d.jsonl")
    for graphs, want in ((StandIn(), {64}), (None, None)):
        seen.clear()
        monkeypatch.setattr(run, "layer_graphs_of", lambda model, graphs=graphs: graphs)
        train(config_for(base, data, tmp_path / f"out{graphs is None}", max_steps=2, batch_size=3, cuda_graphs=True))
        lengths = {shape[1] for shape in seen}
        assert len(seen) == 2 and (lengths == want if want else max(lengths) < 64), seen
    assert "layer graphs: stand-in" in capsys.readouterr().err


def test_train_cuda_graphs_reaches_the_patch_or_says_why_not(monkeypatch, capsys) -> None:
    import torch

    from llmforge.kernels import patch as patch_module
    from llmforge.trainer import run
    from llmforge.trainer.config import Config

    config = Config()
    config.train.cuda_graphs = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.maybe_patch_kernels(object(), config, graphs=True) == "off (no CUDA device)"
    assert "note: train.cuda_graphs is not applied (no CUDA device" in capsys.readouterr().err
    run.maybe_patch_kernels(object(), config)   # GRPO, vision: their shapes change every step
    assert "train.cuda_graphs is not applied here (only text SFT" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(patch_module, "patch_model", lambda model, **kw: seen.append(kw["cuda_graphs"]) or
                        patch_module.PatchReport(model_type="llama", supported=True, backend="triton"))
    run.maybe_patch_kernels(object(), config, graphs=True)
    run.maybe_patch_kernels(object(), config)
    config.train.gradient_checkpointing = "off"   # nothing to replay: the graphs run the checkpointed layers
    run.maybe_patch_kernels(object(), config, graphs=True)
    assert "train.gradient_checkpointing is off" in capsys.readouterr().err
    config.train.gradient_checkpointing, config.train.cuda_graphs = "auto", False
    run.maybe_patch_kernels(object(), config, graphs=True)
    assert seen == [True, False, False, False]


def test_fixed_length_collate() -> None:
    import torch

    from llmforge.trainer.encode import Encoded
    from llmforge.trainer.sft import collate

    cpu = torch.device("cpu")
    rows = [Encoded(input_ids=[5, 6, 7], labels=[-100, 6, 7], row=0), Encoded(input_ids=[8], labels=[8], row=1)]
    batch = collate(rows, 0, cpu, length=6)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, -100], [8, -100, -100, -100, -100, -100]]
    assert collate(rows, 0, cpu)["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit the fixed batch length 2"):
        collate(rows, 0, cpu, length=2)


def test_training_turns_on_expandable_segments_unless_the_allocator_is_configured(base: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """``train`` sets PyTorch's expandable segments before CUDA starts; a user's own allocator setting, or a CUDA
    context that already exists (the setting would not be read any more), leaves the environment alone."""
    import os

    import torch

    from llmforge.trainer import load

    for name in load.ALLOC_CONF_VARS:
        monkeypatch.delenv(name, raising=False)
    train(config_for(base, write(rows_in("text"), tmp_path / "data.jsonl"), tmp_path / "out", max_steps=1))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == load.EXPANDABLE_SEGMENTS
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert not load.prefer_expandable_segments() and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not load.prefer_expandable_segments() and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
