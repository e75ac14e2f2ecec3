"""Same-GPU detection from the generators' heartbeats; the pushed layout matches the generators'
templates whatever dtype the engine serves in."""

from __future__ import annotations

import socket

import torch

from conspo.models.tiny import build_tiny_model
from conspo.protocol import Heartbeat
from conspo.state import RunStore
from conspo.weight_sync.layout import layout_of
from services.generator.backends.hf import HFBackend
from services.learner.sync import colocated_generators, parameter_list


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


def test_the_pushed_layout_matches_a_bf16_generators_template():
    # Found on an H200: the hf backend serves bf16 on a GPU, and its template followed the
    # engine's dtype while the learner pushed float32 master weights; every push was refused
    # as a layout mismatch. Both sides now follow weight_sync_dtype (float32 by default).
    learner_model, _ = build_tiny_model(seed=0)
    served, tokenizer = build_tiny_model(seed=1)
    served.to(torch.bfloat16)
    for setting in ("float32", "bfloat16"):
        dtype = getattr(torch, setting)
        pushed = layout_of(parameter_list(learner_model, None, dtype=dtype))
        generator_setting = "auto" if setting == "float32" else setting
        engine = HFBackend(served, tokenizer, weight_sync_dtype=generator_setting)
        template = engine.weight_template
        assert pushed.hash == layout_of(template).hash, setting
    full = dict(learner_model.named_parameters())  # the gathered-state route (FSDP2)
    assert layout_of(parameter_list(learner_model, full)).hash == layout_of(learner_model).hash


def test_a_push_that_raises_is_reported_not_raised(redis_client, keys):
    """The publisher's ``PushReport`` is the one report of a push, also when the push raised."""
    from conspo.weight_sync import PushReport
    from services.learner.sync import WeightPush

    model, _ = build_tiny_model(seed=0)
    push = WeightPush(redis_client, keys, host="127.0.0.1", port=0, backend="gloo",
                      timeout_s=5, member_ttl_s=5, bucket_bytes=1 << 20,
                      device=torch.device("cpu"))  # fmt: skip
    try:
        report = push.push(parameter_list(model, None), version=1, step=1, checkpoint_path=None)
        assert isinstance(report, PushReport) and report.ok and report.receivers == []
        push.publisher.close()  # pushing through a closed publisher raises inside
        report = push.push(parameter_list(model, None), version=2, step=2, checkpoint_path="c")
        assert isinstance(report, PushReport) and not report.ok
        assert (report.version, report.step) == (2, 2) and "closed" in (report.error or "")
        assert (push.pushes, push.failures) == (2, 1)
    finally:
        push.close()
