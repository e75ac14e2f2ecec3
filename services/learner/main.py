"""``conspo learner``: the process around ``Learner``.

One process on CPU or one GPU (``conspo learner``), or ``torchrun --nproc-per-node N -m
conspo.cli learner`` for FSDP2 over N GPUs (or N CPU processes with gloo). Rank 0 is the service:
settings, Redis, heartbeats, Prometheus, signal handling. SIGTERM / SIGINT only set a flag: the
step in flight finishes, a checkpoint is written, and the process exits 0. Other ranks ignore
the signals (torchrun forwards them to every rank) and stop when rank 0 broadcasts the stop.
Note that torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM: when the step in flight
plus a checkpoint take longer, signal the rank-0 worker process directly instead of torchrun.
"""

from __future__ import annotations

import argparse
import logging
import signal

from conspo.settings import LearnerSettings, load

log = logging.getLogger(__name__)


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(LearnerSettings)
    from services.learner.distributed import init_distributed
    from services.learner.learner import Learner

    ctx = init_distributed(settings.device)
    try:
        if not ctx.is_main:
            return _follower(settings, ctx)
        from conspo.service import ServiceRuntime

        instance = f"learner-{settings.run}-rank0"
        with ServiceRuntime(settings, "learner", instance=instance) as runtime:
            runtime.install_signal_handlers()
            learner = None
            try:
                learner = Learner(
                    settings,
                    ctx,
                    client=runtime.client,
                    registry=runtime.registry,
                    stop_requested=lambda: runtime.stopping,
                )
                runtime.status = "running"
                runtime.info.update({"device": str(ctx.device), "world_size": ctx.world_size})
                status = learner.run()
            except Exception as exc:
                runtime.error(f"learner failed: {type(exc).__name__}: {exc}")
                try:
                    runtime.store.set_fields(status="failed")
                except Exception:
                    log.exception("could not record the failure")
                raise
            finally:
                if learner is not None:
                    learner.close()
            runtime.status = "stopped"
            log.info("learner exits: %s", status)
            return 0
    finally:
        ctx.close()


def _follower(settings: LearnerSettings, ctx) -> int:
    from conspo.logs import setup as setup_logging
    from services.learner.learner import Learner

    setup_logging(settings.log_level, json_lines=settings.log_json, service=f"learner{ctx.rank}")
    signal.signal(signal.SIGTERM, lambda *_: log.info("rank %d: SIGTERM left to rank 0", ctx.rank))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    learner = Learner(settings, ctx)
    learner.run()
    return 0
