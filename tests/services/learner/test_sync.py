"""Same-GPU detection from the generators' heartbeats."""

from __future__ import annotations

import socket

import torch

from conspo.protocol import Heartbeat
from conspo.state import RunStore
from services.learner.sync import colocated_generators


def test_a_generator_on_the_learners_gpu_is_detected(redis_client, keys):
    store = RunStore(redis_client, keys)
    host = socket.gethostname()
    beats = [
        ("gen-same", host, {"device": "cuda:0"}),
        ("gen-other-gpu", host, {"device": "cuda:1"}),
        ("gen-other-host", "elsewhere", {"device": "cuda:0"}),
    ]
    for instance, h, info in beats:
        store.heartbeat(Heartbeat(service="generator", instance=instance, host=h, info=info))
    store.heartbeat(Heartbeat(service="generator", instance="gen-gone", host=host,
                              status="stopped", info={"device": "cuda:0"}))  # fmt: skip
    assert colocated_generators(store, torch.device("cuda", 0)) == ["gen-same"]
    assert colocated_generators(store, torch.device("cuda", 1)) == ["gen-other-gpu"]
    assert colocated_generators(store, torch.device("cpu")) == []
