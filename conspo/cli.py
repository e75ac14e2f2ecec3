"""The ``conspo`` command: one sub-command per service, plus demo, train and eval.

Service modules are imported lazily so that ``conspo verifier`` never imports torch and
``conspo api`` never imports transformers: start-up time and memory per replica matter when a
verifier is scaled to dozens of containers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from conspo.settings import SettingsError

SERVICES = {
    "api": "services.api.main",
    "generator": "services.generator.main",
    "verifier": "services.verifier.main",
    "learner": "services.learner.main",
    "demo": "conspo.demo",
    "train": "conspo.train",
    "eval": "conspo.eval_command",
}
#: Engines ``conspo eval --backend NAME`` drives besides the in-process model: the generator
#: service's. Named by string, like ``SERVICES``, and imported only when chosen: this module is
#: the composition root, the one place in ``conspo/`` that names a service's module.
EVAL_ENGINES = {"vllm": "services.generator.backends.vllm:VLLMBackend"}
HELP = {
    "demo": "embedded CPU run of the bundled arithmetic task",
    "train": "the whole pipeline on this machine for your model and data",
    "eval": "greedy pass@1 and avg@k of a model on a benchmark",
}


def _add_command_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "demo":
        from conspo.demo_args import add_demo_arguments

        add_demo_arguments(p)
    elif name == "train":
        from conspo.train_args import add_train_arguments

        add_train_arguments(p)
    elif name == "eval":
        from conspo.train_args import add_eval_arguments

        add_eval_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conspo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SERVICES.items():
        p = sub.add_parser(name, help=HELP.get(name, f"run the {name}"))
        p.add_argument("--config", help="YAML or TOML settings file (sets CONSPO_CONFIG)")
        p.add_argument("--run", help="run name (sets CONSPO_RUN)")
        p.add_argument("--redis-url", help="Redis URL (sets CONSPO_REDIS_URL)")
        p.set_defaults(module=module)
        _add_command_arguments(name, p)
    return parser


def _resolve(spec: str) -> object:
    """``module:attribute`` -> the attribute."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, env in (
        ("config", "CONSPO_CONFIG"),
        ("run", "CONSPO_RUN"),
        ("redis_url", "CONSPO_REDIS_URL"),
    ):
        value = getattr(args, flag, None)
        if value:
            os.environ[env] = value
    module = importlib.import_module(args.module)
    extra = {}
    if args.command == "eval" and args.backend in EVAL_ENGINES:
        extra["engines"] = {args.backend: _resolve(EVAL_ENGINES[args.backend])}
    try:
        return int(module.main(args, **extra) or 0)
    except SettingsError as exc:
        logging.basicConfig()
        print(f"conspo {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
