"""Shared fixtures: the real media folder and tiny model sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """``../shared/media`` beside the checkout (real clips and photos with captions)."""
    if not MEDIA.is_dir():
        pytest.skip(f"real media folder {MEDIA} is absent (it sits beside the checkout in CI)")
    return MEDIA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: ``tiny_dir(task)`` -> folder with that task's tiny model set, made once a session."""
    made: dict[str, Path] = {}

    def make(task: str) -> Path:
        if task not in made:
            from wanlora.tools.tiny import make_tiny

            out = tmp_path_factory.mktemp(f"tiny-{task}")
            make_tiny(task, out)
            made[task] = out
        return made[task]

    return make
