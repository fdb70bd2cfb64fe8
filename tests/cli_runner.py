"""Run the llmforge CLI in-process, as the tests of several commands do."""

from __future__ import annotations

from llmforge.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``llmforge ARGV``: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
