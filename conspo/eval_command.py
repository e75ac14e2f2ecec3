"""``conspo eval``: greedy pass@1, avg@k and pass@k of a model folder on a benchmark.

``conspo eval --model PATH --benchmark math500 --k 4`` samples at the paper's setting (temperature
0.6, top-p 0.95; greedy for pass@1) with the encoding training uses (``conspo.evaluation``: the
api's row mapping, ``encode_prompt``, the chat template when the model has one, the math
instruction; ``--template`` / ``--system-prompt`` / ``--chat`` as given to ``conspo train``),
shows a progress bar over the prompts, prints the JSON result and writes it to ``--out``.

Backends: ``hf`` samples in this process with ``ModelSampler``, exactly as the learner's periodic
evaluation does, so the same weights and seed give the learner's numbers. Any other backend is an
engine of the generator service (``vllm``: ``VLLMBackend``, driven through the ``Backend``
protocol's ``generate``), built by an ``EngineFactory`` the caller passes in: ``conspo.cli``, the
composition root, names it (``EVAL_ENGINES``), so ``conspo/`` never imports a service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from conspo.evaluation import Sampler
from conspo.logs import setup as setup_logging
from conspo.settings import SettingsError


class Engine(Sampler, Protocol):
    """A generation engine as this command drives it (a subset of the generator's ``Backend``)."""

    tokenizer: Any
    max_model_len: int

    def close(self) -> None: ...


class EngineFactory(Protocol):
    """Builds an engine serving the model folder ``model_path``, sampling from ``seed``."""

    def __call__(self, model_path: Path, *, seed: int) -> Engine: ...


def _model(args: argparse.Namespace) -> Path:
    if args.model is None:
        from conspo.models import default_checkpoint

        return Path(default_checkpoint())
    path = Path(args.model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SettingsError(f"--model {args.model}: not a model folder (no config.json)")
    return path


def _engine(
    args: argparse.Namespace, model: Path, engines: Mapping[str, EngineFactory]
) -> tuple[Sampler, Any, int, Callable[[], None] | None]:
    """(sampler, tokenizer, context length, close)."""
    if args.backend != "hf":
        factory = engines.get(args.backend)
        if factory is None:
            raise SettingsError(
                f"--backend {args.backend}: no engine of that name was given "
                f"(known: hf{''.join(', ' + name for name in sorted(engines))})"
            )
        engine = factory(model, seed=args.seed)
        return engine, engine.tokenizer, engine.max_model_len, engine.close
    import torch

    from conspo.evaluation import ModelSampler
    from conspo.models.tiny import context_length, load_policy

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tokenizer = load_policy(model, device=device)
    return ModelSampler(policy, tokenizer), tokenizer, context_length(policy, tokenizer), None


def run(
    args: argparse.Namespace, engines: Mapping[str, EngineFactory] | None = None
) -> dict[str, Any]:
    """Evaluate ``args.model``; ``engines`` builds any ``--backend`` other than ``hf``."""
    from tqdm import tqdm

    from conspo.evaluation import EVAL_CHUNK, evaluate, load_eval_set
    from conspo.train_config import has_chat_template, prompt_format

    if args.k < 1:
        raise SettingsError("--k must be at least 1")
    model = _model(args)
    verifier = "arith" if args.benchmark == "arith" else "math"
    fmt = prompt_format(
        verifier,
        has_chat_template(model),
        template=args.template,
        system_prompt=args.system_prompt,
        chat=args.chat or ("off" if args.benchmark == "arith" else "auto"),
    )
    try:
        eval_set = load_eval_set(args.benchmark, args.n, fmt=fmt)
    except (ValueError, FileNotFoundError) as exc:
        raise SettingsError(f"--benchmark {args.benchmark}: {exc}") from None
    sampler, tokenizer, context, close = _engine(args, model, engines or {})
    bar = tqdm(
        total=2 * len(eval_set.prompts),
        desc=f"eval {eval_set.name}",
        unit="prompt",
        file=sys.stderr,
        disable=None,  # off when stderr is not a terminal
    )
    started = time.time()
    try:
        result = evaluate(
            sampler,
            tokenizer,
            eval_set,
            max_model_len=context,
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            chunk=args.chunk or EVAL_CHUNK,
            progress=bar.update,
        )
    finally:
        bar.close()
        if close is not None:
            close()
    return {
        "model": str(model),
        "benchmark": eval_set.name,
        "backend": args.backend,
        **result,
        "seed": args.seed,
        "prompt_format": fmt.model_dump(),
        "started_at": started,
    }


def main(args: argparse.Namespace, engines: Mapping[str, EngineFactory] | None = None) -> int:
    setup_logging("WARNING", service="eval")
    result = run(args, engines)
    text = json.dumps(result, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return 0
