"""Name -> bundled task: everything task-specific that the demo, the learner's evaluation, the
warm start and the benchmarks need, in one place.

A task is a problem source (a deterministic train / held-out split), the verifier the pipeline
grades it with (and the same rule in-process, for evaluation and the warm start), a generation
budget, the bundled warm-started model (``conspo/assets/<asset>``, with the ``recipe.json`` that
made it) and the RL settings it was tuned with. Consumers look a task up by name and never
branch on it, so adding a task is one module in ``conspo/tasks/`` and one entry here.

Registered: ``arith`` (the default: two-digit addition / subtraction, answers of at most 4
tokens, ``conspo.tasks.arith``) and ``chain`` (2-4 step scratchpad arithmetic ending in a boxed
answer graded by the ``math`` verifier, completions of 23-55 tokens, ``conspo.tasks.chain``).

This module imports only pydantic and the task modules (no torch), so the CLI stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field

from conspo.tasks import arith, chain

__all__ = ["DEFAULT_TASK", "TASKS", "Problem", "RLDefaults", "Task", "UnknownTaskError", "get_task"]

DEFAULT_TASK = "arith"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


class Problem(Protocol):
    """What every task's problems provide."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def target(self) -> str:
        """The supervised completion of the warm start (EOS excluded)."""
        ...


class Split(NamedTuple):
    train: list[Any]
    test: list[Any]


class RLDefaults(BaseModel):
    """The RL settings a task's bundled warm start was tuned with (demo and benchmarks)."""

    model_config = ConfigDict(frozen=True)

    lr: float = Field(gt=0)
    steps: int = Field(default=200, ge=1)
    group_size: int = Field(default=8, ge=1)
    batch_groups: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    eval_every: int = Field(default=25, ge=0)
    eval_samples: int = Field(default=500, ge=1)


class UnknownTaskError(KeyError):
    """Raised by :func:`get_task` for a name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Task:
    """A bundled task. ``make_split(n_train, n_test, seed, spec)`` is the task module's."""

    name: str
    description: str
    asset: str
    verifier: str
    max_tokens: int
    rl: RLDefaults
    spec: BaseModel
    grade: Callable[[str, str], bool] = field(repr=False)
    make_split: Callable[..., Any] = field(repr=False)
    n_test: int
    split_seed: int
    #: Training problems the RL run draws from (None: every problem not held out).
    n_train: int | None
    #: ``conspo.models.sft.warm_start`` keyword arguments that differ from its defaults.
    warm_start: Mapping[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        """The bundled warm-started model (a ``from_pretrained`` folder with ``recipe.json``)."""
        return ASSETS / self.asset

    def split(self, n_train: int | None = None) -> Split:
        """The canonical split; ``n_train`` overrides how many training problems are drawn
        (the held-out problems never change)."""
        n = self.n_train if n_train is None else n_train
        train, test = _split(self.name, n)
        return Split(list(train), list(test))

    def test_problems(self, n: int | None = None) -> list[Any]:
        """The first ``n`` held-out problems (all by default)."""
        return self.split().test[:n]

    def training_rows(self) -> list[dict[str, str]]:
        """The training split as ``{"prompt", "answer"}`` rows for the REST API."""
        return [{"prompt": p.prompt, "answer": p.answer} for p in self.split().train]


_TASK_LIST = (
    Task(
        name="arith",
        description="two-digit addition and subtraction, the answer only",
        asset="tiny-arith",
        verifier="arith",
        max_tokens=8,
        rl=RLDefaults(lr=1e-4),
        spec=arith.DEFAULT_SPEC,
        grade=arith.score,
        make_split=arith.make_split,
        n_test=arith.DEFAULT_N_TEST,
        split_seed=arith.DEFAULT_SPLIT_SEED,
        n_train=None,
    ),
    Task(
        name="chain",
        description="2-4 additions/subtractions solved line by line, answer in \\boxed{}",
        asset="tiny-chain",
        verifier=chain.VERIFIER,
        max_tokens=64,
        # lr 1e-4 (arith's) made ConSPO lose 5-14 points within 40 steps on this task (one
        # seed, 4 updates per rollout batch); at 5e-5 no objective lost ground (docs/benchmarks.md).
        rl=RLDefaults(lr=5e-5, eval_samples=300),
        spec=chain.DEFAULT_SPEC,
        grade=chain.grade,
        make_split=chain.make_split,
        n_test=chain.DEFAULT_N_TEST,
        split_seed=chain.DEFAULT_SPLIT_SEED,
        n_train=chain.DEFAULT_N_TRAIN,
        # SFT draws a larger pool (the RL rows are its first 20,000); 2-layer model as arith.
        warm_start={"n_train": 100_000, "steps": 1500, "min_steps": 200, "probe_prompts": 256},
    ),
)

#: Read-only ``name -> Task`` mapping of every bundled task.
TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in _TASK_LIST})


def get_task(name: str | None = None) -> Task:
    """Look up a task (``None``: the default); unknown names raise :class:`UnknownTaskError`."""
    try:
        return TASKS[name or DEFAULT_TASK]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}") from None


@lru_cache(maxsize=8)
def _split(name: str, n_train: int | None) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    # Problems are frozen models: caching the tuples is safe, callers get fresh lists.
    task = TASKS[name]
    split = task.make_split(n_train, task.n_test, task.split_seed, task.spec)
    return tuple(split.train), tuple(split.test)
