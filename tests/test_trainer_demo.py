"""The embedded default end to end: `train-and-ship` trains the bundled tiny Llama, exports it through the
exporter (layer-by-layer merge) and the learned answers come out of llama.cpp with the Modelfile's template."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from llmforge.trainer.demo import check_gguf  # noqa: E402
from llmforge.trainer.example import demo_pairs  # noqa: E402
from llmforge.trainer.run import train_and_ship  # noqa: E402


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = train_and_ship(None, overrides=[f"train.output_dir={out}"], quant="f16", demo_check=True,
                            host="127.0.0.1:9")  # nothing listens there: ship writes the Modelfile, no push
    return out, result


@pytest.mark.slow
def test_f16_gives_every_learned_answer(shipped) -> None:
    out, result = shipped
    demo = result.demo
    assert demo.total == len(demo_pairs()) == 20
    assert demo.correct == demo.total, "\n".join(demo.summary_lines())
    assert demo.template_ok == demo.total          # Ollama's Go render == the Jinja render
    assert result.train.last_loss < 0.05 < result.train.first_loss
    assert Path(result.ship.gguf).is_file() and Path(result.ship.modelfile).is_file()
    assert not result.ship.pushed and "ollama create" in result.ship.create_command
    text = "\n".join(result.summary_lines())
    for needle in ("quant: f16", "learned answers through llama.cpp: 20/20", "Ollama name: llmforge-demo"):
        assert needle in text


@pytest.mark.slow
def test_q4_k_m_rate(shipped, capsys) -> None:
    from llmforge.pipeline import ship

    out, result = shipped
    report = ship(result.train.adapter_dir, name="llmforge-demo-q4", quant="q4_k_m", output_dir=out / "q4",
                  base=result.train.base_model, host="127.0.0.1:9")
    demo = check_gguf(report.gguf, report.modelfile, result.train.adapter_dir, demo_pairs())
    with capsys.disabled():
        print(f"\nq4_k_m: {demo.correct}/{demo.total} learned answers through llama.cpp")
    assert demo.template_ok == demo.total
    assert demo.correct >= 15, "\n".join(demo.summary_lines())   # measured: 20/20 (state it in RESULTS)
