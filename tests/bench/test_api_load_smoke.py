"""``bench/api_load.py --smoke`` starts its own api, loads it and writes its report; every
answer was a 202, and its goals carry the names ``bench/run_all.py`` judges. No speed is
asserted (a shared CI machine's timings mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from run_all import ISSUE_GOALS  # noqa: E402


def test_api_load_smoke(tmp_path, redis_url):
    out = tmp_path / "api_load.json"
    proc = subprocess.run(
        [sys.executable, "bench/api_load.py", "--smoke", "--workers", "2", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "CONSPO_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "summary: idle: single:" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {
        "single capacity",
        "single at goal",
        "batch capacity",
        "batch at goal",
    }
    names = {g["name"] for g in report["goals"]}
    assert names == {n for n, (src, *_) in ISSUE_GOALS.items() if src == "api_load"}
    for row in report["results"].values():
        assert row["errors"] == 0 and row["requests"] > 0 and row["p99_ms"] >= row["p50_ms"]
