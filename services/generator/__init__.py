"""The generator service: prompts in, grouped rollouts out, live weight updates in between.

Modules: ``main`` (process entry, ``conspo generator``), ``loop`` (the work loop), ``prompting``
(per-group seeds and budgets; encoding a prompt is ``conspo.prompting``, shared with
evaluation), ``weights`` (following the learner's pushes), ``metrics``,
``backends`` (``hf``, ``vllm`` behind one interface) and ``vllm_worker`` (code that runs inside
vLLM's worker). Importing this package imports neither torch-heavy backends nor vLLM.
"""
