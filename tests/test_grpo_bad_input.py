"""Bad GRPO input to `llmforge train`: one `error:` line, a non-zero exit, no traceback, no adapter; and how prompts
and reward arguments are read from each dataset shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_runner import run_cli  # noqa: E402

from llmforge.trainer.example import build_base_model  # noqa: E402
from llmforge.trainer.grpo_data import load_prompts  # noqa: E402

QA = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}
      for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "model")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, base: Path, rows: list[dict] = QA, train: dict | None = None, **grpo) -> Path:
    data = jsonl(tmp_path / "data.jsonl", rows)
    config = {"model": {"path": str(base), "load_in_4bit": False, "max_seq_length": 64},
              "data": {"path": data.name},
              "train": {"method": "grpo", "output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 4,
                        "threads": 1, **(train or {})},
              "grpo": {"num_generations": 4, "max_completion_length": 4, "rewards": [{"name": "exact_match"}], **grpo}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line_error(tmp_path: Path, code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "adapter").exists()


CASES = {
    "unknown reward": ({"rewards": [{"name": "exact_match"}, {"name": "exactmatch"}]},
                       ["grpo.rewards[1]", "unknown reward 'exactmatch'"]),
    "name and python": ({"rewards": [{"name": "length", "python": "r.py:f"}]}, ["exactly one of name or python"]),
    "missing file": ({"rewards": [{"python": "nowhere.py:score"}]}, ["grpo.rewards[0]", "nowhere.py not found"]),
    "missing module": ({"rewards": [{"python": "no_such_module_xyz:score"}]}, ["cannot import 'no_such_module_xyz'"]),
    "missing function": ({"rewards": [{"python": "rewards_ok.py:nope"}]}, ["has no function 'nope'"]),
    "broken module": ({"rewards": [{"python": "rewards_broken.py:score"}]}, ["importing", "ZeroDivisionError"]),
    "syntax error": ({"rewards": [{"python": "rewards_syntax.py:score"}]},
                     ["grpo.rewards[0]", "rewards_syntax.py failed: SyntaxError", "line 1"]),
    "not MODULE:FUNCTION": ({"rewards": [{"python": "rewards_ok.py"}]}, ["is not MODULE:FUNCTION"]),
    "key that does not apply": ({"rewards": [{"name": "length", "pattern": "x"}]},
                                ["'pattern' does not apply to the length reward"]),
    "bad regex": ({"rewards": [{"name": "regex_format", "pattern": "(<think>"}]}, ["not a valid regular expression"]),
    "contains without text": ({"rewards": [{"name": "contains"}]}, ["exactly one of text or column"]),
    "missing column": ({"rewards": [{"name": "exact_match", "column": "solution"}]},
                       ["needs column 'solution'", "row 1"]),
    "no rewards": ({"rewards": []}, ["at least one reward"]),
    "group of one": ({"num_generations": 1}, ["num_generations must be at least 2"]),
    "batch not a multiple": ({"num_generations": 3}, ["batch_size (4) must be a multiple of grpo.num_generations (3)"]),
    "completion too long": ({"max_completion_length": 64}, ["leaves no room for a prompt"]),
    "zero temperature": ({"temperature": 0}, ["temperature must be > 0"]),
    "typo in a key": ({"bta": 0.1}, ["unknown config key 'grpo.bta'", "grpo.beta"]),
    "typo in a reward key": ({"rewards": [{"name": "length", "wieght": 2}]},
                             ["grpo.rewards[0].wieght", "grpo.rewards[0].weight"]),
    "bad loss type": ({"loss_type": "ppo"}, ["grpo.loss_type must be one of dapo, grpo, bnpo, dr_grpo"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_mistakes_are_one_line(case: str, base: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "rewards_ok.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "rewards_broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "rewards_syntax.py").write_text("def score(prompts, completions, **kw)\n    return []\n")
    grpo, needles = CASES[case]
    code, _, err = run_cli(["train", str(write_config(tmp_path, base, **grpo))], capsys)
    assert_one_line_error(tmp_path, code, err, *needles)


@pytest.mark.parametrize("body,needles", [
    ("def score(prompts, completions, **kw):\n    return [kw['difficulty'][0]] * len(prompts)\n",
     ["reward score failed: KeyError", "'difficulty'"]),
    ("def score(prompts, completions, **kw):\n    return [1.0]\n", ["reward score must return 4 numbers"]),
    ("def score(prompts, completions, **kw):\n    return ['high'] * len(prompts)\n", ["must return 4 numbers"]),
    ("def score(prompts, completions, **kw):\n    return ['1.0'] * len(prompts)\n", ["4 numbers", "got text"]),
    ("def score(prompts, completions, **kw):\n    return '1111'\n", ["4 numbers", "got str"]),
    ("def score(prompts, completions, **kw):\n    return [float('inf')] * len(prompts)\n",
     ["reward score returned an infinite value"]),
], ids=["reads a missing column", "too few values", "not numbers", "numbers as text", "a string", "infinite"])
def test_a_failing_reward_function_is_one_line(body: str, needles: list[str], base: Path, tmp_path: Path,
                                               capsys) -> None:
    (tmp_path / "mine.py").write_text(body)
    code, _, err = run_cli(["train", str(write_config(tmp_path, base, rewards=[{"python": "mine.py:score"}]))],
                           capsys)
    assert_one_line_error(tmp_path, code, err, *needles)


def test_text_rows_have_no_prompts(base: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, base, rows=[{"text": "just text"}])
    code, _, err = run_cli(["train", str(config)], capsys)
    assert_one_line_error(tmp_path, code, err, "GRPO needs prompts")


def test_a_row_without_the_prompt_column_is_one_line(base: Path, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": "1 + 1?", "answer": "2"}, QA[0], {"prompt": "2 + 2?", "answer": "4"},
            {"prompt": "x", "answer": "y"}]
    code, _, err = run_cli(["train", str(write_config(tmp_path, base, rows=rows))], capsys)
    assert_one_line_error(tmp_path, code, err, "row 2 has no 'prompt', but row 1 has one")


def test_rows_with_images_are_refused(base: Path, tmp_path: Path, capsys) -> None:
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}]}] * 4
    code, _, err = run_cli(["train", str(write_config(tmp_path, base, rows=rows))], capsys)
    assert_one_line_error(tmp_path, code, err, "row 1 has an image", "GRPO trains on text prompts only")


def test_unknown_method(base: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["train", str(write_config(tmp_path, base, train={"method": "ppo"}))], capsys)
    assert_one_line_error(tmp_path, code, err, "train.method must be one of sft, grpo")


# ------------------------------------------------------------------------------------------- prompts
def test_prompts_from_each_dataset_shape(tmp_path: Path) -> None:
    messages = load_prompts(str(jsonl(tmp_path / "m.jsonl", [QA[0] | {"level": 2}])))[0]
    assert messages.messages == [{"role": "user", "content": "What is 1 + 2?"}]
    assert messages.columns == {"level": 2, "answer": "3"} and messages.conversational

    kept = load_prompts(str(jsonl(tmp_path / "k.jsonl", [QA[0] | {"answer": "three"}])))[0]
    assert kept.columns["answer"] == "three"     # a real answer column wins over the final turn

    text = load_prompts(str(jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi", "answer": "hi"}])))[0]
    assert text.messages == [{"role": "user", "content": "Say hi"}] and text.original == "Say hi"
    assert not text.conversational and text.columns == {"answer": "hi"}

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    listed = load_prompts(str(jsonl(tmp_path / "c.jsonl", [{"prompt": chat}])))[0]
    assert listed.messages == chat and listed.conversational

    alpaca = load_prompts(str(jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])))[0]
    assert alpaca.messages == [{"role": "user", "content": "Add\n\n1 2"}] and alpaca.columns == {"answer": "3"}


def test_reward_arguments_follow_trl() -> None:
    from llmforge.trainer.grpo import reward_kwargs
    from llmforge.trainer.grpo_data import Prompt
    from llmforge.trainer.rewards import build_rewards, score
    from llmforge.trainer.config import load_config

    chunk = [Prompt([{"role": "user", "content": "q1"}], "q1", {"answer": "a"}, conversational=False),
             Prompt([{"role": "user", "content": "q2"}], "q2", {"answer": "b", "extra": 1}, conversational=False)]
    kwargs = reward_kwargs(chunk, 2, ["a", " a ", "<answer>b</answer>", "b!"], [[1], [1, 2], [3, 4, 5], [6]])
    assert kwargs["prompts"] == ["q1", "q1", "q2", "q2"]
    assert kwargs["answer"] == ["a", "a", "b", "b"] and kwargs["extra"] == [None, None, 1, 1]
    grpo = load_config({"grpo": {"max_completion_length": 10, "rewards": [
        {"name": "exact_match"}, {"name": "exact_match", "pattern": "<answer>(.*?)</answer>"},
        {"name": "contains", "column": "answer"}, {"name": "length", "target": 2},
        {"name": "regex_format", "pattern": "<answer>.*</answer>"}]}}).grpo
    table = score(build_rewards(grpo), kwargs, 4)
    assert table == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0],
                     [-0.1, 0.0, -0.1, -0.1], [0.0, 0.0, 1.0, 0.0]]
    conversational = reward_kwargs([Prompt([{"role": "user", "content": "q"}], [{"role": "user", "content": "q"}])],
                                   2, ["x", "y"], [[1], [2]])
    assert conversational["completions"] == [[{"role": "assistant", "content": "x"}],
                                             [{"role": "assistant", "content": "y"}]]


def test_the_example_config_is_valid() -> None:
    from llmforge.trainer.config import load_config
    from llmforge.trainer.grpo import check_settings
    from llmforge.trainer.rewards import build_rewards

    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "grpo.yaml")
    check_settings(config)
    labels = [r.label for r in build_rewards(config.grpo)]
    assert config.train.method == "grpo" and labels == ["regex_format", "exact_match(answer)", "length(200)"]


def test_vision_language_bases_are_refused(tmp_path: Path, capsys) -> None:
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                 "model_type": "gemma3", "vision_config": {}}))
    code, _, err = run_cli(["train", str(write_config(tmp_path, vlm))], capsys)
    assert_one_line_error(tmp_path, code, err, "GRPO on vision-language models", "not supported yet")
