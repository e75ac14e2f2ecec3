"""``conspo generator``: one generator process (one GPU, or the CPU with the ``hf`` backend).

Start-up order matters: settings are validated first (a bad config exits with code 2 before
anything heavy happens), the heartbeat starts before the engine loads (a slow vLLM start shows
as "starting", not as a dead instance), the late-join checkpoint is loaded before the weight
subscriber registers (so the first request is sampled with the newest weights the learner has
written), and only then does the loop pull prompts. Once the engine is up, the generator tells the
api what it serves (``conspo.serving.ServedModel``: context length, tokenizer folder, longest
token), so the api can refuse prompts that cannot fit.

Before the engine is built the generator takes the run settings it follows from what the learner
announced (``GeneratorSettings.follow``: the weight-sync dtype and timeout; flow control reads
``batch_groups`` and ``max_staleness`` from the learner as it goes), and refuses to start when a
value it sets itself disagrees with the learner's.

Exit codes: 0 after SIGTERM/SIGINT (the batch in flight is finished and published, prompts read
but not started are released, the flow lease and the weight-sync membership are dropped);
1 when the engine died (its prompts are released for other generators); 2 for invalid settings,
among them run settings that disagree with the learner's (the error names both values).
"""

from __future__ import annotations

import argparse
import logging

import redis

from conspo.service import ServiceRuntime
from conspo.serving import ServedModel, max_token_chars, publish_served_model
from conspo.settings import GeneratorSettings, RunSettingsMismatchError, load
from services.generator.backends import Backend, BackendDeadError, build_backend, model_path_of
from services.generator.loop import GeneratorLoop
from services.generator.metrics import GeneratorMetrics
from services.generator.weights import initial_load, start_weight_sync

log = logging.getLogger(__name__)


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(GeneratorSettings)
    runtime = ServiceRuntime(settings, "generator")
    runtime.install_signal_handlers()
    try:
        with runtime:
            run(runtime, settings)
    except BackendDeadError as exc:
        log.error("generator %s: engine died: %s", runtime.instance, exc)
        return 1
    except RunSettingsMismatchError as exc:
        log.error("generator %s: %s", runtime.instance, exc)
        return 2
    return 0


def publish_serving(runtime: ServiceRuntime, settings: GeneratorSettings, backend: Backend) -> None:
    """What the api needs to judge a prompt's length (see ``conspo.serving``)."""
    try:
        model = ServedModel(
            max_model_len=backend.max_model_len,
            tokenizer_path=str(model_path_of(settings).resolve()),
            max_token_chars=max_token_chars(backend.tokenizer),
            instance=runtime.instance,
        )
        publish_served_model(runtime.client, runtime.keys, model)
    except (redis.RedisError, AttributeError, TypeError, ValueError) as exc:
        log.warning("could not publish what this generator serves: %s", exc)
        return
    runtime.info.update({"max_model_len": model.max_model_len})


def run(runtime: ServiceRuntime, settings: GeneratorSettings) -> None:
    """Build the engine, catch up with the learner, serve until asked to stop."""
    settings = settings.follow(runtime.store.announced_run())
    runtime.info.update(
        {"backend": settings.backend, "weight_sync_dtype": settings.weight_sync_dtype}
    )
    backend = build_backend(settings)
    weights = None
    try:
        try:
            runtime.info.update(backend.device_info())
        except Exception as exc:  # informational only
            log.warning("could not describe the engine's device: %s", exc)
        if runtime.stopping:
            return
        publish_serving(runtime, settings, backend)
        served = initial_load(runtime.client, runtime.keys, backend, loaded_version=0)
        weights = start_weight_sync(runtime, settings, backend)
        weights.report_served(served)
        loop = GeneratorLoop(
            runtime,
            settings,
            backend,
            weights=weights,
            metrics=GeneratorMetrics(runtime.registry),
            served_version=served,
        )
        log.info(
            "generator %s ready: backend %s, serving v%d, G=%d, batch %d prompts",
            runtime.instance,
            settings.backend,
            served,
            settings.group_size,
            settings.prompts_per_batch,
        )
        loop.run()
    finally:
        if weights is not None:
            weights.close()
        backend.close()
        log.info("generator %s stopped", runtime.instance)
