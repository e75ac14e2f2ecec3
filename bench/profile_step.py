"""Where each process of the pipeline spends one training step: a per-process wall-time profile.

Runs the stack as ``bench/vs_trl.py`` and ``bench/async_vs_sync.py`` run it (``LocalStack``: api,
one ``hf`` generator, 2 verifiers, the learner; every group trained, like TRL) for ``--steps``
steps at each ``--staleness``, and over the steady window (after ``--warm`` steps) measures, per
process:

- CPU seconds per step, from ``/proc`` (the process and its children: grading pools);
- with py-spy installed (``pip install py-spy``; it needs ptrace on the processes), where the
  MAIN thread's wall time goes: ``py-spy record --idle`` samples every ``1/--rate`` s, each
  sample is put in one category by the frames on its stack (``CATEGORIES``, first match wins:
  waiting first, so a blocking read is waiting, not a Redis round trip) and the table gives the
  share of samples per category, i.e. seconds per step once multiplied by the step time. Threads
  other than the main one (heartbeats, the weight subscriber) are left out: they mostly sleep;
- the learner's own per-step timings (``metrics.jsonl``: wait for data, forward/backward with
  the optimizer, push, checkpoint), which need no profiler.

Without py-spy the script still prints the CPU and learner tables (``--no-py-spy`` forces that).
The profiler itself costs a few percent of a core per process at the default rate.

Usage::

    python bench/profile_step.py [--steps 40] [--staleness 0 1] [--rate 100] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    arith_training_rows,
    final_accounting,
    header,
    loadavg,
    machine,
    model_path,
    result_paths,
    rl_hyperparameters,
    stack_config,
    summary,
    table,
    train_records,
    write_json,
)
from async_vs_sync import tree_cpu

log = logging.getLogger("bench.profile_step")

#: (category, regex on the whole collapsed stack), first match wins. Waiting comes first: a
#: blocking XREADGROUP or a flow-control wait is idle time, whatever Redis frames it shows.
CATEGORIES: list[tuple[str, str]] = [
    ("wait: flow control / backlog", r"_admission_wait|ServiceRuntime\.sleep|FlowControl\.wait"),
    ("wait: blocking read (no input)", r"xreadgroup.*(recv|read_response|_read_from_socket)"),
    ("wait: HTTP / idle loop", r"uvicorn|select \(selectors|run_forever"),
    ("learner: backward", r"run_backward|_engine_run_backward"),
    ("learner: forward (teacher forcing)", r"completion_logprobs|_forward_chunk"),
    ("learner: optimizer + clip", r"Optimizer|optim/|clip_grad"),
    ("learner: loss (objective)", r"conspo/objectives"),
    ("weights: push (learner)", r"WeightPush|weight_sync/publisher"),
    ("weights: apply (generator)", r"apply_staged_weights"),
    ("checkpoint / ledger", r"CheckpointManager|save_pretrained|safetensors"),
    ("generator: sampling forward", r"sample_groups|HFBackend\.generate"),
    ("verifier: grading (pool IPC)", r"GradingPool"),
    (
        "serialisation (msgpack / pydantic)",
        r"msgpack|pydantic|model_validate|model_dump|"
        r"conspo/protocol|from_labeled|_decode|_encode",
    ),
    ("redis round trips", r"redis/"),
    ("metrics / logging", r"metrics\.py|logging/|prometheus"),
]
OTHER = "other python"
_THREAD_ROOT = re.compile(r"^Thread\._bootstrap|^_bootstrap \(threading")


def classify(stack: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, stack):
            return name
    return OTHER


def read_raw(path: Path, pid: int, all_threads: bool = False) -> Counter:
    """Samples per category in a py-spy ``--format raw`` file (process ``pid`` only, if the file
    names processes): its main thread only unless ``all_threads`` (the api's feeder is a
    thread); heartbeat threads never."""
    out: Counter = Counter()
    if not path.exists():
        return out
    prefix = f"process {pid}:"
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack
        if stack.startswith("process "):  # recorded with --subprocesses: keep ``pid`` only
            if not stack.startswith(prefix):
                continue
            frames = stack.split(";", 1)[1] if ";" in stack else ""
        threaded = bool(_THREAD_ROOT.match(frames))
        if threaded and (not all_threads or "_beat_loop" in frames):
            continue
        out[classify(frames)] += int(count)
    return out


def start_py_spy(exe: str, pid: int, rate: int, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", str(rate), "--idle", "--nonblocking",
         "--format", "raw", "-o", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def learner_step(stack: Any) -> int:
    raw = stack.client.hget(stack.keys.state, "step")
    return int(raw or 0)


def profile_run(
    staleness: int, args: argparse.Namespace, redis_url: str, model: Path, hp: dict, spy: str | None
) -> dict[str, Any]:
    from conspo.launch import LocalStack

    run = f"prof-s{staleness}-{uuid.uuid4().hex[:6]}"
    cfg = stack_config(
        run, args.work, redis_url, model, hp,
        objective=args.objective, steps=args.steps, staleness=staleness, seed=args.seed,
        learner_env={"CONSPO_SKIP_UNINFORMATIVE": "false"},
    )  # fmt: skip
    stack = LocalStack(cfg)
    spies: dict[str, tuple[subprocess.Popen, Path]] = {}
    window: dict[str, Any] = {}
    try:
        stack.start()
        pids = {p.name: p.popen.pid for p in stack.procs if p.popen is not None}
        stack.submit_dataset(arith_training_rows(args.n_train), epochs=100, name="arith")
        deadline = time.monotonic() + args.timeout
        while learner_step(stack) < args.warm and time.monotonic() < deadline:
            stack.check_alive()
            time.sleep(0.05)
        window["step0"], window["t0"], window["cpu0"] = (
            learner_step(stack),
            time.monotonic(),
            (tree_cpu(pids)),
        )
        if spy:
            for name, pid in pids.items():
                path = Path(cfg.out_dir) / f"py-spy-{name}.txt"
                spies[name] = (start_py_spy(spy, pid, args.rate, path), path)
        end = args.steps - 1  # the last step is followed by the shutdown: leave it out
        while learner_step(stack) < end and time.monotonic() < deadline:
            stack.check_alive()
            time.sleep(0.05)
        window["step1"], window["t1"], window["cpu1"] = (
            learner_step(stack),
            time.monotonic(),
            (tree_cpu(pids)),
        )
        for proc, _ in spies.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in spies.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.wait_finished(timeout=args.timeout, every=0.2)
    finally:
        for proc, _ in spies.values():
            if proc.poll() is None:
                proc.kill()
        stack.stop()
    accounting = final_accounting(cfg)
    records = train_records(cfg.out_dir / run / "metrics.jsonl")
    steps = max(1, window["step1"] - window["step0"])
    wall = window["t1"] - window["t0"]
    cpu = {
        n: (window["cpu1"].get(n, 0.0) - window["cpu0"].get(n, 0.0)) / steps for n in window["cpu1"]
    }
    samples = {
        name: read_raw(path, pids[name], all_threads=name.startswith("api"))
        for name, (_, path) in spies.items()
    }
    win = [r for r in records if window["step0"] < r["step"] <= window["step1"]]
    learner = {
        k: statistics.fmean(r.get(f"{k}_s", 0.0) for r in win) if win else float("nan")
        for k in ("wait", "fwd_bwd", "push", "checkpoint")
    }
    if not args.keep:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
    return {
        "max_staleness": staleness,
        "steps": steps,
        "step_s": wall / steps,
        "samples_per_s": steps * hp["batch_groups"] * hp["group_size"] / wall,
        "cpu_s_per_step": cpu,
        "cores_busy": sum(cpu.values()) * steps / wall,
        "learner_s_per_step": learner,
        "py_spy": {n: dict(c) for n, c in samples.items()},
        "accounting": accounting,
    }


def print_run(r: dict[str, Any]) -> None:
    step = r["step_s"]
    print(
        f"\nmax_staleness {r['max_staleness']}: {step:.3f} s/step ({r['samples_per_s']:,.0f} "
        f"samples/s) over {r['steps']} steady steps; cores busy {r['cores_busy']:.2f} of 2"
    )
    lw = r["learner_s_per_step"]
    print(
        "learner per step: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in lw.items())
        + f", rest {step - sum(lw.values()):.3f} s"
    )
    names = sorted(r["cpu_s_per_step"])
    cats: Counter = Counter()
    for c in r["py_spy"].values():
        cats.update({k: 1 for k in c})
    header_row = ["category (main thread, s/step)", *names]
    rows = [["CPU s/step (/proc)", *[f"{r['cpu_s_per_step'][n]:.3f}" for n in names]]]
    if r["py_spy"]:
        order = [name for name, _ in CATEGORIES] + [OTHER]
        for cat in [c for c in order if c in cats]:
            row = [cat]
            for n in names:
                c = r["py_spy"].get(n, {})
                total = sum(c.values())
                row.append(f"{step * c.get(cat, 0) / total:.3f}" if total and c.get(cat) else "")
            rows.append(row)
    print(table(rows, header_row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--objective", default="grpo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=8, help="steps left out at the start")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--no-py-spy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true", help="keep run folders and py-spy files")
    ap.add_argument("--smoke", action="store_true", help="8 steps, s=1 only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warm, args.staleness = 8, 3, [1]
    logging.basicConfig(level=logging.WARNING)
    from conspo.redis_conn import reachable_or_local

    spy = None if args.no_py_spy else shutil.which("py-spy", path=str(Path(sys.executable).parent))
    spy = spy or (None if args.no_py_spy else shutil.which("py-spy"))
    model = model_path(args.model)
    hp, _ = rl_hyperparameters(model)
    info = machine()
    load_start = loadavg()
    print(header(info))
    print(
        f"{args.objective}, {args.steps} steps x {hp['batch_groups']} x G={hp['group_size']}, "
        f"steady window after step {args.warm}; py-spy: {spy or 'not installed (CPU only)'}"
    )
    started = time.monotonic()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="conspo-prof-")
        args.work = tmp.name
    runs = []
    try:
        with reachable_or_local(args.redis_url) as redis_url:
            for s in args.staleness:
                runs.append(profile_run(s, args, redis_url, model, hp, spy))
                print_run(runs[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    json_path, _ = result_paths(args.json, "profile_step")
    write_json(
        json_path,
        "profile_step",
        {
            "machine": info,
            "load_start": load_start,
            "load_end": loadavg(),
            "wall_s": time.monotonic() - started,
            "config": {**vars(args), "model": str(model)},
            "py_spy": spy,
            "categories": CATEGORIES,
            "runs": runs,
        },
    )
    print(f"raw numbers: {json_path}")
    summary(
        "; ".join(
            f"s={r['max_staleness']} {r['step_s']:.3f} s/step, learner fwd/bwd "
            f"{r['learner_s_per_step']['fwd_bwd']:.3f} s, cores busy {r['cores_busy']:.2f}"
            for r in runs
        )
    )
    lost = sum(r["accounting"].get("lost", 0) for r in runs)
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
