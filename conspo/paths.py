"""Where things live on disk."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The math benchmark files: $CONSPO_SHARED_DATA, else ``../shared/data/math`` of the repo."""
    env = os.environ.get("CONSPO_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "math"


def cache_dir() -> Path:
    """Per-user cache for rebuilt models (``conspo demo --fresh``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conspo"
