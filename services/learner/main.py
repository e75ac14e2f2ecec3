"""``conspo learner``: the process around the learner's service and training loop.

One process on CPU or one GPU (``conspo learner``), or ``torchrun --nproc-per-node N -m
conspo.cli learner`` for FSDP2 over N GPUs (or N CPU processes with gloo). Rank 0 is the service:
settings, Redis, heartbeats, Prometheus, signal handling. SIGTERM / SIGINT only set a flag: the
step in flight finishes, a checkpoint is written, and the process exits 0. Other ranks ignore
the signals (torchrun forwards them to every rank) and stop when rank 0 broadcasts the stop.
Note that torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM: when the step in flight
plus a checkpoint take longer, signal the rank-0 worker process directly instead of torchrun.

``build_learner`` composes the two halves: rank 0 runs ``LearnerService`` (Redis, the ack
window, pushes, metrics, checkpoint commits) inside its ``TrainingLoop``; the other ranks run
the loop alone.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conspo.settings import LearnerSettings, load

if TYPE_CHECKING:
    import redis

    from services.learner.distributed import DistContext
    from services.learner.loop import TrainingLoop

log = logging.getLogger(__name__)


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(LearnerSettings)
    from services.learner.distributed import init_distributed

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
                learner = build_learner(
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


def build_learner(
    settings: LearnerSettings,
    ctx: DistContext,
    *,
    client: redis.Redis | None = None,
    registry: Any = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainingLoop:
    """Rank 0: the service (``client``, Prometheus ``registry``, ``stop_requested``) inside
    the training loop; the other ranks: the loop alone (they need no Redis)."""
    from services.learner.loop import TrainingLoop
    from services.learner.service import LearnerService

    if not ctx.is_main:
        return TrainingLoop(settings, ctx)
    if client is None:
        raise ValueError("rank 0 needs a Redis client")
    service = LearnerService(
        settings, ctx, client=client, registry=registry, stop_requested=stop_requested
    )
    return TrainingLoop(settings, ctx, service)


def _follower(settings: LearnerSettings, ctx: DistContext) -> int:
    from conspo.logs import setup as setup_logging

    setup_logging(settings.log_level, json_lines=settings.log_json, service=f"learner{ctx.rank}")
    signal.signal(signal.SIGTERM, lambda *_: log.info("rank %d: SIGTERM left to rank 0", ctx.rank))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    build_learner(settings, ctx).run()
    return 0
