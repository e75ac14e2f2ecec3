"""Name -> verifier function, filled by ``@register("name")`` at import time.

A verifier is a pure function ``(completion: str, gold: str, config: GradeConfig) -> Label``.
It receives the *sanitised* completion (see ``conspo.grading.sanitize``) and returns
``correct``, ``wrong``, ``no_answer`` or ``error``; ``timeout`` is the pool's verdict, never a
verifier's. A verifier may raise: the grading wrapper turns any exception into ``error``.

Adding a verifier is one file: decorate a function with ``@register("name")`` and either put the
module in this package (and import it from ``__init__``) or name it in the pool's
``plugins`` so each worker process imports it (module name or ``.py`` path). Names are
unique: registering a taken name raises, unless ``replace=True`` says it is deliberate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from conspo.protocol import Label

if TYPE_CHECKING:
    from conspo.grading.config import GradeConfig

Verifier = Callable[[str, str, "GradeConfig"], Label]

_VERIFIERS: dict[str, Verifier] = {}
_LOCK = threading.Lock()


class UnknownVerifierError(KeyError):
    """A prompt named a verifier that is not registered in this process."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown verifier {self.name!r}; known verifiers: {', '.join(self.known)}"


def register(name: str, *, replace: bool = False) -> Callable[[Verifier], Verifier]:
    """Decorator: make ``fn`` available as verifier ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError("a verifier needs a non-empty string name")

    def decorator(fn: Verifier) -> Verifier:
        with _LOCK:
            existing = _VERIFIERS.get(name)
            if existing is not None and existing is not fn and not replace:
                raise ValueError(
                    f"verifier {name!r} is already registered "
                    f"({existing.__module__}.{existing.__qualname__})"
                )
            _VERIFIERS[name] = fn
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove ``name`` (tests use this to undo their registrations)."""
    with _LOCK:
        _VERIFIERS.pop(name, None)


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name``; ``UnknownVerifierError`` lists the known names."""
    try:
        return _VERIFIERS[name]
    except KeyError:
        raise UnknownVerifierError(name, known_verifiers()) from None


def known_verifiers() -> list[str]:
    with _LOCK:
        return sorted(_VERIFIERS)
