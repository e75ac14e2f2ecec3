"""An hf-style generator stand-in for the learner's weight-push test.

Holds the tiny model, follows the learner's pushes with a ``WeightSubscriber`` and, for each
version it applies to the model, writes the model's parameters to
``<out>/<instance>-v<version>.safetensors`` and then reports the version served.

Usage: python receiver_worker.py REDIS_URL RUN INSTANCE MODEL_DIR OUT_DIR TIMEOUT_S
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def main() -> None:
    redis_url, run, instance, model_dir, out_dir, timeout_s = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {instance} %(name)s: %(message)s")
    import redis
    from safetensors.torch import save_file

    from conspo.keys import Keys
    from conspo.models.tiny import load_policy
    from conspo.weight_sync import WeightSubscriber

    model, _ = load_policy(model_dir)
    client = redis.Redis.from_url(redis_url)
    sub = WeightSubscriber(
        client, Keys(run=run), instance, backend="gloo", timeout_s=float(timeout_s), heartbeat_s=0.5
    )
    sub.start(model)
    logging.info("receiver ready")
    out = Path(out_dir)
    while True:
        staged = sub.take_staged()
        if staged is None:
            time.sleep(0.02)
            continue
        staged.apply_to(model)
        tensors = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
        tmp = out / f".{instance}-v{staged.version}.tmp"
        save_file(tensors, tmp)
        tmp.rename(out / f"{instance}-v{staged.version}.safetensors")
        sub.report_served(staged.version)
        logging.info("applied v%d (%s)", staged.version, staged.source)


if __name__ == "__main__":
    main()
