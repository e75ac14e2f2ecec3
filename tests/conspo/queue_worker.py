"""A consumer process for the queue tests (run as a script, killed by the tests).

hold:  read one entry, report it on stdout, then wait to be killed.
relay: copy every entry of `prompts` to `rollouts` through the idempotent commit until the run's
       state hash has stop=1.
"""

from __future__ import annotations

import sys
import time

import redis

from conspo.keys import Keys
from conspo.protocol import Prompt
from conspo.queue import StreamQueue, consumer_name


def main() -> None:
    mode, url, run, visibility = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    client = redis.Redis.from_url(url)
    keys = Keys(run=run)
    src = StreamQueue(client, keys, "prompts", Prompt, visibility_timeout_s=visibility)
    dst = StreamQueue(client, keys, "rollouts", Prompt)
    me = consumer_name(mode)
    if mode == "hold":
        while True:
            got = src.read(me, count=1, block_ms=200)
            if got:
                print(f"GOT {got[0].entry_id}", flush=True)
                time.sleep(3600)
    while client.hget(keys.state, "stop") != b"1":
        for d in src.read(me, count=50, block_ms=100):
            src.commit(d, stage="relay", item=d.key, outputs=[(dst, d.message, d.key)])


if __name__ == "__main__":
    main()
