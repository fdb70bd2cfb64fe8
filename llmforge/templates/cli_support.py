"""``llmforge template``: print the Go template (stdout) or the check table; diagnostics on stderr."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import LlmforgeError
from .source import TemplateSource, load_template_source, require_template


def _source_or_named(source: Path, named: str | None) -> tuple[str, TemplateSource]:
    from .named import get_named_template

    if named:
        template = get_named_template(named)
        loaded = load_template_source(source) if source.exists() else TemplateSource(None, origin=str(source))
        return template, loaded
    loaded = load_template_source(source)
    return require_template(loaded), loaded


def run_template_command(source: Path, check: bool = False, named: str | None = None) -> None:
    """Translate SOURCE's chat template to an Ollama Go template; with ``check``, print the Jinja/Go table."""
    from .translate import translate_template

    chat_template, loaded = _source_or_named(Path(source), named)
    translation = translate_template(chat_template, loaded.special_tokens)
    if translation.fallback:
        click.echo(f"warning: not translatable ({'; '.join(translation.problems)}); using llmforge's "
                   f"named template {translation.fallback!r}", err=True)
    for note in translation.notes:
        click.echo(f"note: {note}", err=True)
    if not check:
        click.echo(translation.go_template, nl=False)
        return
    from .check import check_template

    report = check_template(chat_template, loaded.special_tokens, translation.go_template, name=str(source))
    report.fallback, report.problems = translation.fallback, translation.problems
    if translation.fallback:
        for row in report.rows:
            if row.category != "n/a":
                row.category = "fallback"
    click.echo(report.table())
    if not report.passed:
        raise LlmforgeError(f"{report.counts['different']} rendering(s) differ between Jinja and Go",
                            hint="see the table above")
