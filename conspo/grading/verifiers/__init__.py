"""The verifier registry and the built-in verifiers (``math``, ``exact``, ``arith``).

Importing this package registers the built-ins. See ``registry`` for how to add one.
"""

from conspo.grading.verifiers import arith, exact, math_answer
from conspo.grading.verifiers.registry import (
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
    "arith",
    "exact",
    "get_verifier",
    "known_verifiers",
    "math_answer",
    "register",
    "unregister",
]
