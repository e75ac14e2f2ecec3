"""A generator stand-in for the weight-sync tests, driven over stdin/stdout (one JSON per line).

It is started once and reused by several tests (importing torch costs seconds on a loaded
2-core machine). Commands:

- ``start``: run a ``WeightSubscriber`` for one run namespace with the template ``variant``; an
  applier thread takes staged weights, copies them into the template (the "live model"), saves
  them to ``out_dir/<instance>-v<version>-<source>.safetensors`` and then reports them served.
- ``status``: last error, counters, epoch, served version.
- ``stop``: close the subscriber (leave the group, deregister).
- ``exit``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import torch

VARIANTS = ("mixed", "mlp", "other")


def make_named(variant: str, seed: int | None) -> list[tuple[str, torch.Tensor]] | torch.nn.Module:
    """The test models. ``seed=None`` gives zeros (a generator's template before any sync)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)

    def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if seed is None:
            return torch.zeros(shape, dtype=dtype)
        if dtype == torch.bool:
            return torch.rand(shape, generator=gen) > 0.5
        if dtype == torch.int64:
            return torch.randint(-(2**40), 2**40, shape, generator=gen)
        return torch.randn(shape, generator=gen).to(dtype)

    if variant == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False)
        )
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(rnd(*p.shape))
        return model
    wide = 41 if variant == "other" else 40
    return [
        ("embed.weight", rnd(50, wide)),
        ("layers.0.norm", rnd(40, dtype=torch.bfloat16)),
        ("layers.0.proj", rnd(40, 24, dtype=torch.float16)),
        ("layers.0.scale", rnd()),
        ("layers.0.empty", rnd(0, 3)),
        ("layers.0.mask", rnd(7, dtype=torch.bool)),
        ("layers.0.index", rnd(5, dtype=torch.int64)),
        ("head.weight", rnd(24, 50, dtype=torch.float64)),
    ]


class Runner:
    def __init__(self) -> None:
        self.sub = None
        self.applier: threading.Thread | None = None
        self.stop_applier = threading.Event()
        self.served: int | None = None
        self.applied: list[dict] = []

    def start(self, cmd: dict) -> dict:
        import redis

        from conspo.keys import Keys
        from conspo.weight_sync import WeightSubscriber

        self.stop()
        client = redis.Redis.from_url(cmd["redis_url"])
        template = make_named(cmd["variant"], None)
        self.sub = WeightSubscriber(
            client,
            Keys(run=cmd["run"]),
            cmd["instance"],
            timeout_s=cmd.get("timeout_s", 10.0),
            heartbeat_s=cmd.get("heartbeat_s", 0.5),
        )
        self.sub.start(template)
        self.stop_applier = threading.Event()
        self.applied = []
        out_dir = Path(cmd["out_dir"])
        self.applier = threading.Thread(
            target=self._apply_loop, args=(self.sub, template, out_dir), daemon=True
        )
        self.applier.start()
        return {"ok": True}

    def _apply_loop(self, sub, template, out_dir: Path) -> None:
        from safetensors.torch import save_file

        while not self.stop_applier.wait(0.02):
            staged = sub.take_staged()
            if staged is None:
                continue
            staged.apply_to(template)  # what a generator does between requests
            name = f"{sub.instance}-v{staged.version}-{staged.source}.safetensors"
            tensors = {k: v.detach().clone().contiguous() for k, v in staged.tensors.items()}
            save_file(tensors, str(out_dir / f".{name}.tmp"))
            (out_dir / f".{name}.tmp").rename(out_dir / name)
            sub.report_served(staged.version)
            self.applied.append(
                {"version": staged.version, "source": staged.source, "epoch": staged.epoch}
            )

    def status(self) -> dict:
        sub = self.sub
        if sub is None:
            return {"running": False}
        latest = sub.latest_announcement()
        return {
            "running": True,
            "last_error": sub.last_error,
            "counters": sub.counters,
            "epoch": sub.epoch,
            "applied": self.applied,
            "latest_version": latest.version if latest else None,
        }

    def stop(self) -> dict:
        if self.applier is not None:
            self.stop_applier.set()
            self.applier.join(5)
            self.applier = None
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        return {"ok": True}


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    runner = Runner()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "exit":
                runner.stop()
                print(json.dumps({"ok": True}), flush=True)
                return
            reply = getattr(runner, cmd["cmd"])(*([cmd] if cmd["cmd"] == "start" else []))
        except Exception as exc:
            logging.exception("command %s failed", cmd.get("cmd"))
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
        time.sleep(0)


if __name__ == "__main__":
    main()
