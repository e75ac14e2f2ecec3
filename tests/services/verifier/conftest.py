"""Shared fixtures for the verifier tests: grading pools and the benchmark data folder.

Pools are module-scoped: a pool start costs ~1.5 s the first time (forkserver, imports,
warm-up) and a few ms afterwards, and tests that kill workers also check that the pool
recovers, so sharing one per module is part of what is being tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conspo.grading.config import GradeConfig
from services.verifier.pool import GradingPool

HERE = Path(__file__).resolve().parent
FAULTY = str(HERE / "faulty_verifiers.py")
# tests/services/verifier/conftest.py -> parents[3] is the repository root.
DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "math"

# Short enough to keep the suite fast (every hostile item that hits it burns it in CPU), long
# enough that the honest items graded in these pools (plain integers, ~5 ms; ~50 ms on a
# heavily loaded 2-core machine) never get near it.
FAST_TIMEOUT_S = 0.75


@pytest.fixture(scope="module")
def fast_pool() -> Iterator[GradingPool]:
    """Two workers, a short timeout, and the misbehaving test verifiers loaded."""
    with GradingPool(
        processes=2, timeout_s=FAST_TIMEOUT_S, config=GradeConfig(), plugins=[FAULTY]
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def bench_pool() -> Iterator[GradingPool]:
    """Two workers and a generous timeout for the benchmark agreement checks."""
    with GradingPool(processes=2, timeout_s=20.0, config=GradeConfig()) as pool:
        yield pool


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data folder {DATA_DIR.resolve()} does not exist")
    return DATA_DIR
