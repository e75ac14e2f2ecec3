"""The console entry point: one sub-command per service, readable failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conspo.cli import SERVICES, build_parser


@pytest.mark.parametrize("command", sorted(SERVICES))
def test_every_service_has_a_sub_command(command):
    args = build_parser().parse_args([command, "--run", "x"])
    assert args.command == command
    assert args.module == SERVICES[command]


def test_help_lists_the_services():
    out = subprocess.run(
        [sys.executable, "-m", "conspo.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("api", "generator", "verifier", "learner", "demo", "train", "eval"):
        assert name in out


def test_invalid_settings_exit_2_with_the_reason():
    env = {"CONSPO_PROCESSES": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", "verifier"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert "CONSPO_PROCESSES" in proc.stderr


def test_demo_on_vllm_without_vllm_says_how_to_get_it():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the vllm-marked demo test runs it")
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", "demo", "--backend", "vllm", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "make vllm-env" in proc.stderr
