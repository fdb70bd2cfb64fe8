"""GRPO: the objective against hand-computed values, log-probs under left padding, the reward rising on a toy
task with a fixed seed, the KL to the adapter-disabled base, exact resume, and train-and-ship to a GGUF whose
llama.cpp logits match the trained adapter."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmforge.trainer.config import load_config  # noqa: E402
from llmforge.trainer.example import DATA_PATH, build_base_model  # noqa: E402
from llmforge.trainer.grpo import AGGREGATE, group_advantages, per_token_loss, token_logprobs  # noqa: E402
from llmforge.trainer.run import train  # noqa: E402

# a toy verifiable reward: the share of completion tokens with an id below 64 (1/8 of the vocabulary)
LOW_IDS = '''
def low_ids(prompts, completions, completion_ids, **columns):
    assert len(prompts) == len(completions) == len(columns["answer"])
    return [sum(t < 64 for t in ids) / max(len(ids), 1) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "toy_rewards.py"
    path.write_text(LOW_IDS)
    return path


def grpo_config(base: Path, out: Path, reward_file: Path, train: dict | None = None, **grpo):
    return load_config({
        "model": {"path": str(base), "load_in_4bit": False, "max_seq_length": 64},
        "data": {"path": str(DATA_PATH)}, "lora": {"r": 16, "alpha": 32},
        "train": {"method": "grpo", "output_dir": str(out), "max_steps": 10, "batch_size": 16, "lr": 0.02,
                  "lr_scheduler": "constant", "threads": 1, **(train or {})},
        "grpo": {"num_generations": 4, "max_completion_length": 16,
                 "rewards": [{"python": f"{reward_file}:low_ids"}], **grpo}})


# ------------------------------------------------------------------------------------------- the math
def test_group_advantages_match_hand_values() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]
    got = group_advantages(torch.tensor(rewards), 4, "group").tolist()
    expected = []
    for g in (rewards[:4], rewards[4:]):
        mean = sum(g) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / 3)      # unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in g]
    assert got == pytest.approx(expected, rel=1e-6)
    mean_all = sum(rewards) / 8
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in rewards) / 7)
    batch = group_advantages(torch.tensor(rewards), 4, "batch").tolist()
    centred = [r - sum(g) / 4 for g in (rewards[:4], rewards[4:]) for r in g]
    assert batch == pytest.approx([c / (std_all + 1e-4) for c in centred], rel=1e-6)
    assert group_advantages(torch.tensor(rewards), 4, "none").tolist() == pytest.approx(centred)
    assert group_advantages(torch.tensor([3.0] * 4), 4, "group").tolist() == [0.0] * 4   # no signal, no NaN


@pytest.mark.parametrize("corrected", [True, False], ids=["kl times ratio", "plain kl"])
def test_clipped_loss_kl_and_aggregation_match_hand_values(corrected: bool) -> None:
    logp = [[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]
    old = [[-1.5, -2.0, -0.1], [-1.0, -0.9, -3.0]]   # ratios beyond both clip bounds, with A > 0 and A < 0
    ref = [[-1.2, -1.8, -0.5], [-1.5, -0.4, -2.0]]
    adv = [0.7, -1.3]
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    beta, lo, hi = 0.05, 0.2, 0.28
    hand, hand_kl, hand_grad, hand_cut = [], [], [], []
    for i in range(2):
        row, row_kl, row_grad, row_cut = [], [], [], []
        for j in range(3):
            ratio = math.exp(logp[i][j] - old[i][j])
            clipped = min(max(ratio, 1 - lo), 1 + hi)
            unclipped_wins = ratio * adv[i] <= clipped * adv[i]
            k3 = math.exp(ref[i][j] - logp[i][j]) - (ref[i][j] - logp[i][j]) - 1
            kl = k3 * ratio if corrected else k3
            row.append(-min(ratio * adv[i], clipped * adv[i]) + beta * kl)
            row_kl.append(kl)
            row_cut.append(not unclipped_wins)
            # d/dlogp: -ratio*A where the unclipped term is the min, 0 where the clip holds;
            # k3: 1 - e^(ref-logp); k3 * ratio: ratio * (k3 + 1 - e^(ref-logp))
            dk3 = 1 - math.exp(ref[i][j] - logp[i][j])
            row_grad.append((-ratio * adv[i] if unclipped_wins else 0.0)
                            + beta * (ratio * (k3 + dk3) if corrected else dk3))
        hand.append(row), hand_kl.append(row_kl), hand_grad.append(row_grad), hand_cut.append(row_cut)
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    losses, kl, cut = per_token_loss(lp, torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                                     torch.tensor(adv, dtype=torch.float64), beta, lo, hi, corrected)
    assert losses.tolist() == [pytest.approx(r, rel=1e-12) for r in hand]
    assert kl.tolist() == [pytest.approx(r, rel=1e-12) for r in hand_kl]
    assert cut.tolist() == hand_cut == [[True, False, False], [True, False, False]]
    losses.sum().backward()
    assert lp.grad.tolist() == [pytest.approx(r, rel=1e-12, abs=1e-15) for r in hand_grad]

    m = torch.tensor(mask, dtype=torch.float64)
    flat = [hand[i][j] * mask[i][j] for i in range(2) for j in range(3)]
    per_seq = [sum(hand[i][j] * mask[i][j] for j in range(3)) / sum(mask[i]) for i in range(2)]
    expected = {"grpo": sum(per_seq) / 2 / 2, "bnpo": sum(flat) / 5 / 2, "dr_grpo": sum(flat) / (2 * 16) / 2,
                "dapo": sum(flat) / 11}       # dapo: over the tokens of the whole step (11 here)
    for loss_type, value in expected.items():
        got = AGGREGATE[loss_type](losses.detach(), m, 16, 11, 2).item()
        assert got == pytest.approx(value, rel=1e-12), loss_type


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradients_equal_trl(loss_type: str, trl_trainer) -> None:
    """TRL's own GRPOTrainer._compute_loss on the same batch (clipping and the KL term active) is the oracle."""
    trainer, inputs = trl_trainer
    model = trainer.model
    trainer.loss_type = loss_type
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n = inputs["completion_ids"].size(1)
    logp = token_logprobs(model, ids, mask, n, trainer.temperature)
    losses, _, cut = per_token_loss(logp, inputs["old_per_token_logps"], inputs["ref_per_token_logps"],
                                    inputs["advantages"], trainer.beta, 0.2, 0.28)
    completion_mask = inputs["completion_mask"].float()
    ours = AGGREGATE[loss_type](losses, completion_mask, trainer.max_completion_length,
                                int(inputs["num_items_in_batch"]), 1)
    ours.backward()
    assert bool(cut.any()) and not bool(cut.all())                  # the clip is exercised
    # the loss is a small difference of per-token terms of size ~1: float32 rounding of those terms (~1e-7 each) is
    # the tolerance, in absolute terms; trl 1.16 rounds differently from 1.15 (9e-8 apart here)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    for mine, theirs in zip((p.grad for p in model.parameters()), trl_grads):   # float32 summation order only
        assert float((mine - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max()) + 1e-9


@pytest.fixture(scope="module")
def trl_trainer(base: Path, tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, beta=0.1, epsilon=0.2, epsilon_high=0.28,
                      temperature=0.8, use_cpu=True, bf16=False, report_to=[])  # fp32: no autocast
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
                          processing_class=AutoTokenizer.from_pretrained(base))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1      # set by Trainer's loop, which this test does not run
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, 500, (4, 5), generator=g), "prompt_mask": torch.ones(4, 5, dtype=torch.long),
              "completion_ids": torch.randint(3, 500, (4, 6), generator=g),
              "completion_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 6, [1] + [0] * 5]),
              "advantages": torch.tensor([0.5, -1.0, 1.5, -0.2]),
              "num_items_in_batch": torch.tensor(16.0)}
    with torch.no_grad():   # old/ref log-probs near the policy's, so some ratios fall inside the clip range
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        logp = token_logprobs(trainer.model, ids, torch.ones_like(ids), 6, 0.8)
    inputs["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    return trainer, inputs


def test_completion_mask_ends_at_the_first_stop_token() -> None:
    from llmforge.trainer.grpo import completion_mask_of

    completions = torch.tensor([[5, 6, 2, 7, 2], [5, 9, 9, 9, 9], [3, 0, 0, 0, 0]])
    mask, truncated = completion_mask_of(completions, [2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_logprobs_under_left_padding_equal_the_unpadded_ones(base: Path) -> None:
    from llmforge.trainer.load import load_model

    model, _ = load_model(base, load_in_4bit=False)
    short, long = [5, 9, 17, 33, 40, 41], [7, 8, 100, 200, 300, 12, 13, 14, 15]
    ids = torch.tensor([[0, 0, 0] + short, long])
    mask = torch.tensor([[0, 0, 0] + [1] * len(short), [1] * len(long)])
    padded = token_logprobs(model, ids, mask, 4, 0.7)
    with torch.no_grad():
        for row, seq in enumerate((short, long)):
            logits = model(torch.tensor([seq])).logits[0, -5:-1].double() / 0.7
            alone = logits.log_softmax(-1).gather(-1, torch.tensor(seq[-4:]).unsqueeze(-1)).squeeze(-1)
            assert padded[row].tolist() == pytest.approx(alone.tolist(), abs=2e-5)


# ------------------------------------------------------------------------------------------- training
def test_mean_reward_rises_on_a_toy_task(base: Path, reward_file: Path, tmp_path: Path, capsys) -> None:
    result = train(grpo_config(base, tmp_path / "out", reward_file))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("grpo ")]
    assert len(lines) == 10 and lines[-1].startswith("grpo 10/10 reward ") and " loss " in lines[-1], lines
    first, last = sum(result.rewards[:3]) / 3, sum(result.rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.4, result.rewards      # measured: ~0.14 -> 1.0
    adapter = result.adapter_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "llmforge_train.json"):
        assert (adapter / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 11))
    assert [e["reward"] for e in log] == pytest.approx(result.rewards)
    assert "mean reward" in "\n".join(result.summary_lines())


def test_kl_to_the_adapter_disabled_base_and_exact_resume(base: Path, reward_file: Path, tmp_path: Path) -> None:
    settings = dict(train={"max_steps": 6, "save_steps": 2, "batch_size": 8}, beta=0.1, num_iterations=2,
                    loss_type="grpo", rewards=[{"python": f"{reward_file}:low_ids"}, {"name": "length", "weight": 0.5}])
    full = train(grpo_config(base, tmp_path / "full", reward_file, **settings))
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == 0.0           # LoRA B starts at zero: the policy is the base model
    assert all(e["kl"] > 0 for e in log[1:]), log
    assert set(log[0]["reward_by_function"]) == {"low_ids", "length(0)"}
    assert any(e["clip_ratio"] >= 0 for e in log)
    part = tmp_path / "part"
    train(grpo_config(base, part, reward_file, **settings))
    (part / "train_log.jsonl").write_text("".join(
        line + "\n" for line in (part / "train_log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4))
    import shutil

    shutil.rmtree(part / "adapter")
    resumed = train(grpo_config(base, part, reward_file, **settings), resume=True)
    assert resumed.resumed_from == 4
    assert resumed.rewards == pytest.approx(full.rewards[4:], abs=1e-6)
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-4, abs=1e-6)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("llama_cpp"), reason="needs llama-cpp-python")
def test_train_and_ship_grpo_on_the_bundled_example(tmp_path: Path) -> None:
    from fake_ollama import FakeOllama
    from oracles import llama_cpp_logits, rel_error

    from llmforge.templates import render_go
    from llmforge.trainer.run import train_and_ship

    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.method=grpo", "train.max_steps=3",
                 "train.batch_size=8", "train.lr=0.01", "grpo.num_generations=4", "grpo.max_completion_length=12",
                 "grpo.beta=0.02", "grpo.rewards=[{name: exact_match}, {name: contains, text: capital, weight: 0.5}]"]
    with FakeOllama(renderer=render_go) as server:
        result = train_and_ship(None, overrides=overrides, quant="f16", host=server.url)
        assert result.ship.pushed and "llmforge-demo:latest" in server.models
    assert len(result.train.rewards) == 3
    gguf = Path(result.ship.gguf)
    assert gguf.read_bytes()[:4] == b"GGUF"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(result.train.base_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(result.train.adapter_dir)).eval()
    ids = [5, 40, 17, 300, 12, 99, 7]
    with torch.no_grad():
        reference = tuned(torch.tensor([ids])).logits[0].numpy()
        with tuned.disable_adapter():
            untuned = tuned(torch.tensor([ids])).logits[0].numpy()
    assert rel_error(untuned, reference) > 1e-4          # GRPO moved the adapter
    assert rel_error(llama_cpp_logits(gguf, ids), reference) < 5e-3

