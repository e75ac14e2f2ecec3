"""The import path verifier plugins were written against: ``from services.verifier.verifiers
import register``.

The grading core moved to ``conspo.grading`` (the learner's evaluation and ``conspo eval`` grade
with it too, and a service must not import another service); this module keeps existing plugins
working by re-exporting the registry. New plugins may import ``conspo.grading.verifiers``.
"""

from conspo.grading.verifiers import (
    UnknownVerifierError,
    Verifier,
    get_verifier,
    known_verifiers,
    register,
    unregister,
)

__all__ = [
    "UnknownVerifierError",
    "Verifier",
    "get_verifier",
    "known_verifiers",
    "register",
    "unregister",
]
