"""The learner's end of weight sync: push after a committed step, never fail the run for it.

``conspo.weight_sync.WeightPublisher`` does the work (membership, group rebuilds, bucketed
broadcast with timeouts, announcement with the newest checkpoint path so that late joiners load
files). This wrapper adds what is the learner's business: timing, counting failures, turning the
full (possibly gathered) state into the parameter list the generators expect, and detecting a
generator on the learner's own GPU.

Same-GPU deployments: NCCL cannot put two ranks of one group on one device, so a generator that
shares the learner's GPU cannot take broadcasts; it must reload from the checkpoint path in the
announcement (or, in the future, CUDA IPC). The learner detects it from an explicit setting
(``colocated_generator``) or from generator heartbeats whose ``info`` carries ``gpu_uuid`` (or
``device`` on the same host), and says so once, loudly.
"""

from __future__ import annotations

import logging
import socket
import time

import redis
import torch
from torch import nn

from conspo.keys import Keys
from conspo.state import RunStore
from conspo.weight_sync import PushReport, WeightPublisher, resolve_backend
from conspo.weight_sync.layout import TensorSource

log = logging.getLogger(__name__)


def parameter_list(
    model: nn.Module,
    full_state: dict[str, torch.Tensor] | None,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[str, torch.Tensor]]:
    """``named_parameters`` order and names (what receivers' templates hold); tensors from the
    gathered full state under FSDP2, the live parameters otherwise; cast to ``dtype`` (the
    ``weight_sync_dtype`` every generator's template is built with) where they differ."""
    if full_state is None:
        items = [(name, p.detach()) for name, p in model.named_parameters()]
    else:
        names = [name for name, _ in model.named_parameters()]
        items = [(name, full_state[name]) for name in names if name in full_state]
    return [(name, t if t.dtype == dtype else t.to(dtype)) for name, t in items]


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except (RuntimeError, AttributeError):
        return None


def colocated_generators(store: RunStore, device: torch.device) -> list[str]:
    """Generators whose heartbeat says they use the learner's GPU."""
    if device.type != "cuda":
        return []
    mine = gpu_uuid(device)
    host = socket.gethostname()
    found = []
    for beat in store.heartbeats():
        if beat.service != "generator" or beat.status in ("stopped", "failed"):
            continue
        uuid = beat.info.get("gpu_uuid")
        dev = beat.info.get("device")
        if (uuid and mine and str(uuid) == mine) or (
            not uuid and beat.host == host and dev is not None and str(dev) == str(device)
        ):
            found.append(beat.instance)
    return found


class WeightPush:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        host: str,
        port: int,
        backend: str,
        timeout_s: float,
        member_ttl_s: float,
        bucket_bytes: int,
        device: torch.device,
        colocated: bool = False,
        join_timeout_s: float | None = None,
    ) -> None:
        self.store = RunStore(client, keys)
        self.device = device
        self.backend = resolve_backend(backend, device)
        self.publisher = WeightPublisher(
            client,
            keys,
            host=host,
            port=port,
            backend=backend,  # type: ignore[arg-type]
            timeout_s=timeout_s,
            member_ttl_s=member_ttl_s,
            bucket_bytes=bucket_bytes,
            join_timeout_s=join_timeout_s,
        )
        self.pushes = 0
        self.failures = 0
        self._warned: set[str] = set()
        # gloo stages through host memory, so ranks sharing a GPU are fine; only NCCL refuses them.
        self.nccl_possible = backend != "gloo"
        if colocated and self.nccl_possible:
            self._warn_colocated(["(colocated_generator=true)"])

    def _warn_colocated(self, names: list[str]) -> None:
        new = [n for n in names if n not in self._warned]
        if not new:
            return
        self._warned.update(new)
        log.warning(
            "SAME-GPU DEPLOYMENT: generator(s) %s run on the learner's device %s. NCCL cannot "
            "connect two ranks on one GPU, so broadcasts to them will fail; they must load the "
            "checkpoint named in each announcement (set checkpoint_every <= push_every) or run "
            "on another GPU.",
            ", ".join(new),
            self.device,
        )

    def push(
        self, source: TensorSource, *, version: int, step: int, checkpoint_path: str | None
    ) -> PushReport:
        """The publisher's report of the push; never raises (a push must never be fatal)."""
        start = time.perf_counter()
        try:
            if self.nccl_possible:
                self._warn_colocated(colocated_generators(self.store, self.device))
        except redis.RedisError as exc:
            log.debug("could not read heartbeats: %s", exc)
        try:
            report = self.publisher.push(
                source, version=version, step=step, checkpoint_path=checkpoint_path
            )
        except Exception as exc:  # the publisher should not raise; a push must never be fatal
            log.exception("weight push v%d raised", version)
            report = PushReport(
                ok=False,
                version=version,
                step=step,
                transport="broadcast",
                error=f"{type(exc).__name__}: {exc}",
                seconds=time.perf_counter() - start,
            )
        self.pushes += 1
        if not report.ok:
            self.failures += 1
            log.warning(
                "weight push v%d failed (%d so far): %s", version, self.failures, report.error
            )
        return report

    def missing_members(self, layout_hash: str) -> list[str]:
        """Live generators the last push did not reach (joined or restarted since)."""
        try:
            return self.publisher.wants_push(layout_hash, self.backend)
        except redis.RedisError as exc:
            log.debug("could not read the weight-sync members: %s", exc)
            return []

    def close(self) -> None:
        try:
            self.publisher.close()
        except Exception:
            log.exception("closing the weight publisher")
