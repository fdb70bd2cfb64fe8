"""Shared fixtures: tiny models built once per session (other engineers' tests reuse ``tiny_model_dir``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import TINY_ARCHS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch, **overrides)`` -> folder of a tiny random ``arch`` model, built once per session."""
    cache: dict[tuple, Path] = {}

    def build(arch: str, **overrides) -> Path:
        if arch not in TINY_ARCHS:
            raise KeyError(f"no tiny model for {arch!r}; have {', '.join(TINY_ARCHS)}")
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
            out = tmp_path_factory.mktemp(f"tiny-{arch}{'-' + suffix if suffix else ''}")
            cache[key] = build_tiny_model(arch, out, **overrides)
        return cache[key]

    return build
