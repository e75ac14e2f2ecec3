"""Methods mixed into vLLM's GPU worker (``worker_extension_cls``) for weight updates.

vLLM adds this class to its worker's bases, so the methods below run inside the worker process,
next to the model, and the generator calls them with ``AsyncLLM.collective_rpc(name, ...)``.
Arguments and results are plain data (dicts, lists, strings, CPU tensors) because they cross
vLLM's RPC serialisation.

Receiving runs in a thread of the worker, not in the RPC itself: a worker executes RPCs and model
steps one at a time, so a receive inside an RPC would stall generation for the whole transfer,
and a peer that wedges would stall it until the group's timeout. Instead
``conspo_receive_start`` starts a receive thread and returns, the generator polls
``conspo_receive_poll`` (answered between two model steps), and generation goes on meanwhile.

- The thread joins (or reuses) the learner's group at the announced rank and receives the push
  with ``WeightGroup.iter_receive``: one bucket of device memory at a time, each tensor copied
  to host memory as it completes. Staging on the host leaves the live model untouched (requests
  in flight keep sampling with one version) and needs no second copy of the model in GPU
  memory, which vLLM has given to the KV cache. Only the newest completed receive is kept.
- ``conspo_apply_staged``: ``model.load_weights(staged)``; vLLM maps the Hugging Face names onto
  its fused, sharded parameters and casts to the engine dtype. Called only between engine calls.
- ``conspo_load_checkpoint`` / ``conspo_load_tensors``: the same from a checkpoint directory
  (late joiners, failed pushes) or from tensors shipped over the RPC (tests, small models).
- ``conspo_leave_group``: drop a group the learner has abandoned (closed once no receive in it
  is still running).

Nothing here imports vLLM, so the logic is importable and testable on the CPU install.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


def _iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    from conspo.weight_sync import checkpoint_files

    for file in sorted(set(checkpoint_files(path).values())):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


@dataclass
class _Receive:
    ticket: str
    version: int
    key: str
    done: threading.Event = field(default_factory=threading.Event)
    tensors: list[tuple[str, torch.Tensor]] | None = None
    refused: bool = False
    error: str | None = None
    seconds: float = 0.0
    nbytes: int = 0


@dataclass
class _GroupSlot:
    group: Any = None
    busy: int = 0
    retired: bool = False


class ConspoWorkerExtension:
    """Weight-sync endpoints of a vLLM worker (``self`` is the worker: ``model_runner`` and
    ``device`` come from vLLM's worker class)."""

    # -- state (created lazily: vLLM constructs the worker, not us) -------------------------------
    def _conspo_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_conspo")
        if state is None:
            state = {"lock": threading.Lock(), "groups": {}, "receives": {}, "staged": None}
            self.__dict__["_conspo"] = state
        return state

    def _conspo_model(self) -> Any:
        runner = self.model_runner  # type: ignore[attr-defined]
        get_model = getattr(runner, "get_model", None)
        return get_model() if callable(get_model) else runner.model

    def _conspo_device(self) -> torch.device:
        device = getattr(self, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())

    def _conspo_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self._conspo_model().load_weights(weights=counted())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count

    def _conspo_collect(self, key: str, slot: _GroupSlot) -> None:
        """Close and forget a group that is retired or broken and no longer in use."""
        groups = self._conspo_state()["groups"]
        broken = slot.group is not None and slot.group.closed
        if (slot.retired or broken) and not slot.busy:
            if slot.group is not None:
                slot.group.close()
            groups.pop(key, None)

    # -- receiving --------------------------------------------------------------------------------
    def conspo_receive_start(
        self,
        ticket: str,
        rendezvous: dict[str, Any],
        rank: int,
        specs: list[list[Any]],
        version: int,
        timeout_s: float,
    ) -> dict[str, Any]:
        from conspo.protocol import Rendezvous

        rdv = Rendezvous.model_validate(rendezvous)
        job = _Receive(ticket=ticket, version=version, key=rdv.model_dump_json())
        state = self._conspo_state()
        with state["lock"]:
            state["receives"][ticket] = job
            slot = state["groups"].setdefault(job.key, _GroupSlot())
            slot.busy += 1
        thread = threading.Thread(
            target=self._conspo_receive,
            args=(job, slot, rdv, rank, specs, timeout_s),
            name=f"conspo-rx-v{version}",
            daemon=True,
        )
        thread.start()
        return {"ok": True}

    def _conspo_receive(
        self,
        job: _Receive,
        slot: _GroupSlot,
        rdv: Any,
        rank: int,
        specs: list[list[Any]],
        timeout_s: float,
    ) -> None:
        from conspo.weight_sync import LayoutMismatchError, layout_of, open_group
        from services.generator.weights import template_from_specs

        state = self._conspo_state()
        t0 = time.perf_counter()
        try:
            layout = layout_of(template_from_specs(specs))
            if slot.group is None or slot.group.closed:
                device = self._conspo_device() if rdv.backend == "nccl" else None
                slot.group = open_group(rdv, rank, timeout_s, device)
            staged: list[tuple[str, torch.Tensor]] = []
            for name, tensor in slot.group.iter_receive(layout, expect_version=job.version):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
                host.copy_(tensor)
                staged.append((name, host))
            job.tensors = staged
            job.nbytes = sum(t.numel() * t.element_size() for _, t in staged)
        except LayoutMismatchError as exc:
            job.refused, job.error = True, str(exc)
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
            if slot.group is not None:
                slot.group.close()
        finally:
            job.seconds = time.perf_counter() - t0
            with state["lock"]:
                slot.busy -= 1
                self._conspo_collect(job.key, slot)
            job.done.set()
        if job.tensors is not None:
            log.info("worker received v%d: %d tensors, %.1f MB in %.2fs", job.version,
                     len(job.tensors), job.nbytes / 1e6, job.seconds)  # fmt: skip

    def conspo_receive_poll(self, ticket: str) -> dict[str, Any]:
        """Status of a receive; once done, a successful one becomes the staged version."""
        state = self._conspo_state()
        with state["lock"]:
            job = state["receives"].get(ticket)
            if job is None:
                return {"done": True, "ok": False, "refused": False, "error": "unknown ticket"}
            if not job.done.is_set():
                return {"done": False}
            del state["receives"][ticket]
            if job.tensors is not None:
                state["staged"] = (ticket, job.tensors)
        return {
            "done": True,
            "ok": job.tensors is not None,
            "refused": job.refused,
            "error": job.error,
            "seconds": job.seconds,
            "bytes": job.nbytes,
        }

    def conspo_leave_group(self, rendezvous: dict[str, Any]) -> dict[str, Any]:
        from conspo.protocol import Rendezvous

        key = Rendezvous.model_validate(rendezvous).model_dump_json()
        state = self._conspo_state()
        with state["lock"]:
            slot = state["groups"].get(key)
            if slot is not None:
                slot.retired = True
                self._conspo_collect(key, slot)
        return {"ok": True}

    def conspo_device_info(self) -> dict[str, str]:
        device = self._conspo_device()
        return {
            "device": str(device),
            "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid),
        }

    # -- loading ----------------------------------------------------------------------------------
    def conspo_apply_staged(self, ticket: str) -> dict[str, Any]:
        state = self._conspo_state()
        with state["lock"]:
            staged = state["staged"]
            if staged is None or staged[0] != ticket:
                held = None if staged is None else staged[0]
                return {"ok": False, "error": f"receive {ticket} is not staged (holding {held})"}
            state["staged"] = None
        try:
            count = self._conspo_load(staged[1])
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "tensors": count}

    def conspo_load_checkpoint(self, path: str) -> dict[str, Any]:
        try:
            count = self._conspo_load(_iter_checkpoint(path))
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "tensors": count}

    def conspo_load_tensors(self, named: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        try:
            count = self._conspo_load((str(n), t) for n, t in named)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "tensors": count}
