"""Shared test setup: the ``real_data`` marker and an isolated cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_data: needs the packaged SmolLM2 model or downloaded BIG-bench files; skipped when absent",
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``ASYMLORA_CACHE`` for this test only."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ASYMLORA_CACHE", str(folder))
    return folder
