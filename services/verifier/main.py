"""``conspo verifier``: one replica; start as many as the rollouts backlog needs."""

from __future__ import annotations

import argparse
import functools

from conspo.service import ServiceRuntime
from conspo.settings import VerifierSettings, load
from services.verifier.worker import VerifierWorker, make_pool


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(VerifierSettings)
    with ServiceRuntime(settings, "verifier") as runtime:
        runtime.install_signal_handlers()
        VerifierWorker(runtime, settings, functools.partial(make_pool, settings)).run()
    return 0
