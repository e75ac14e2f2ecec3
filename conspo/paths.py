"""Where things live on disk."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The math benchmark files: the ``shared_data`` setting (``CONSPO_SHARED_DATA``), else
    ``../shared/data/math`` of the repo."""
    from conspo.settings import CommonSettings, load

    return load(CommonSettings).shared_data or REPO_ROOT.parent / "shared" / "data" / "math"
