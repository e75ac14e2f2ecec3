"""Helpers shared by the test suite and the benchmarks (kept in the package so that subprocess
workers started by tests can import them too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from conspo.keys import Keys

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def delete_run(client: redis.Redis, run: str, prefix: str = "conspo") -> int:
    """Delete every key of one run namespace (tests clean up after themselves)."""
    keys = list(client.scan_iter(match=Keys(run=run, prefix=prefix).everything, count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    return len(keys)


def heavy_imports(statements: str, heavy: Sequence[str], timeout: float = 120.0) -> list[str]:
    """The modules of the ``heavy`` packages that running ``statements`` in a fresh interpreter
    imports (the check that a light process stays light); raises if the statements fail."""
    script = (
        f"{statements}\nimport sys\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {tuple(heavy)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the statements failed:\n{out.stderr}")
    return out.stdout.split()


def spawn(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen:
    """Start ``python args...`` with the repo's interpreter, output to ``log`` (or inherited)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    out = open(log, "ab") if log else None  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, *args],
        env=full_env,
        stdout=out or None,
        stderr=subprocess.STDOUT if out else None,
        cwd=REPO_ROOT,
    )
