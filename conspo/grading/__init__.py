"""Grading a completion against a gold answer: the rules every component shares.

The verifier service runs these in a process pool with hard timeouts (``services/verifier``);
the learner's held-out evaluation and ``conspo eval`` call the same functions in-process, so a
completion gets the same verdict wherever it is graded.

Modules: ``config`` (``GradeConfig``: rewards, scan cap, fallback phrases, math-verify knobs),
``sanitize`` (untrusted text to a capped, control-free tail), ``extract`` (the final answer:
last balanced box, else a benchmark's answer phrase), ``labels`` (verdict to reward),
``verifiers`` (the registry and the built-ins ``math``, ``exact``, ``arith``), ``grade``
(``grade_one``: one completion in-process, never raises).

The package root imports nothing: ``conspo.grading.extract`` is used by the api without pulling
in math-verify.
"""
