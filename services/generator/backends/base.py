"""The one interface every generation engine implements, and the errors it may raise.

Why a ``Protocol`` and not a base class: the two engines share no code (``hf`` wraps
``conspo.models.sample_groups`` in this process, ``vllm`` drives an async engine whose model lives
in worker processes), so inheritance would only add coupling; the loop and the tests depend on the
structural contract below and nothing else.

Contract (both backends, tested by ``tests/services/generator/test_backend_contract.py``):

- ``generate(prompts, params)`` returns, for each prompt, ``params.n`` completions. ``params`` is
  one ``SamplingParams`` for all prompts or one per prompt (each group carries its own seed).
- A completion's ``logprobs[t]`` is ``log_softmax(logits / T)`` of ``token_ids[t]`` given the prompt
  and the completion so far, before top-p (temperature 0 means greedy, with T = 1 log-probs): what
  the learner's teacher forcing (``conspo.models.completion_logprobs``) recomputes.
- EOS ends a completion with ``finish_reason="stop"`` and is kept in ``token_ids`` (the learner
  trains on it); a stop string ends it at the token that completed it, which is kept, and the stop
  string stays in ``text``; hitting the token budget gives ``"length"``. ``text`` is the completion
  decoded with special tokens skipped.
- The same prompts, params (seeds included) and weights give the same completions.
- ``load_weights`` replaces parameters by name; it validates every name and shape before the first
  copy, so a bad push leaves the model untouched, never half-updated. It is only ever called
  between two ``generate`` calls.
- ``weight_template`` is what the engine expects from the learner (``backends.templates``):
  Hugging Face names, the engine's shapes, the learner's dtype; its layout hash is what the
  generator registers for weight sync, so it must equal the learner's.

Where the weights live decides how updates reach them (``services.generator.weights``): ``Backend``
alone means in this process (the weight subscriber receives tensors, ``load_weights`` copies them
in); an ``EngineBackend`` holds them in the engine's own processes, which receive broadcasts
themselves (``start_receive`` ...) or, when they cannot, read checkpoints.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from conspo.protocol import Completion, Rendezvous, SamplingParams

if TYPE_CHECKING:  # this module stays importable without torch (``import services.generator``)
    import torch


class BackendError(RuntimeError):
    """A generation call failed; the engine is still usable (the batch may be retried)."""


class BackendDeadError(BackendError):
    """The engine cannot serve any more requests; the process should exit and be restarted."""


class GenerationCancelledError(BackendError):
    """``generate`` stopped early because the stop event was set (SIGTERM)."""


class WeightLoadError(ValueError):
    """Tensors that do not fit the model (unknown name, wrong shape); nothing was changed."""


@runtime_checkable
class Backend(Protocol):
    """A generation engine as the generator loop sees it."""

    name: str
    #: A Hugging Face tokenizer: the loop formats prompts with it (chat template included).
    tokenizer: Any
    #: Longest prompt + completion the model accepts, in tokens.
    max_model_len: int
    #: Where the model computes; weight sync offers the learner NCCL only on a CUDA device.
    device: torch.device
    #: The (name, tensor) list the learner sends, tensors possibly on the meta device: names,
    #: shapes and dtypes only (``backends.templates``).
    weight_template: list[tuple[str, torch.Tensor]]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        stop_event: threading.Event | None = None,
    ) -> list[list[Completion]]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None: ...

    def load_checkpoint(self, path: str | Path) -> None: ...

    def device_info(self) -> dict[str, str]:
        """``device``, the served ``dtype`` (and ``gpu_uuid`` on CUDA) for the heartbeat: the
        learner uses them to detect a generator on its own GPU (NCCL cannot broadcast to it),
        operators to see in what precision behaviour log-probs are computed."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class EngineBackend(Backend, Protocol):
    """A backend whose weights live in the engine's own worker processes (vLLM).

    The worker joins the learner's group itself, so a broadcast never crosses a process boundary
    twice: ``start_receive`` has it receive one push into its staging area in the background,
    ``poll_receive`` says how that goes, ``apply_received`` loads it between two engine calls,
    ``leave_weight_group`` drops a group the learner has abandoned.
    """

    #: False for a tensor-parallel engine: one member is one rank of the learner's group, and
    #: every TP worker needs the full tensors, so it follows checkpoints instead of broadcasts.
    receives_broadcast: bool

    def start_receive(
        self, ticket: str, rendezvous: Rendezvous, rank: int, *, version: int, timeout_s: float
    ) -> None: ...

    def poll_receive(self, ticket: str) -> dict[str, Any]:
        """``done`` once the receive ended; then ``ok``, else ``error`` (and ``refused`` for a
        layout the worker does not accept)."""
        ...

    def leave_weight_group(self, rendezvous: Rendezvous) -> None: ...

    def apply_received(self, ticket: str) -> None: ...


def per_prompt(
    params: SamplingParams | Sequence[SamplingParams], count: int
) -> list[SamplingParams]:
    """Normalise ``params`` to one ``SamplingParams`` per prompt."""
    if isinstance(params, SamplingParams):
        return [params] * count
    out = list(params)
    if len(out) != count:
        raise ValueError(f"{len(out)} sampling params for {count} prompts")
    return out
