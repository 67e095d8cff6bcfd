"""Locates ``../shared`` (field cases and the QR corpus) for tests, or skips with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The shared folder: $QRGATE_SHARED, else ../shared beside the repo root; None if absent."""
    env = os.environ.get("QRGATE_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared")
    for c in candidates:
        if (c / "cases").is_dir() and (c / "corpus").is_dir():
            return c
    return None


def need_shared() -> Path:
    """The shared folder, or skip: only a user's clone lacks it; CI's .ci/run checks it exists."""
    d = shared_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("../shared is missing in CI (set QRGATE_SHARED)")
        pytest.skip("../shared (field cases, corpus) is not beside this clone; set QRGATE_SHARED")
    return d


def case_file(name: str) -> Path:
    """A file from ``shared/cases``."""
    return need_shared() / "cases" / name
