"""The learner: the single writer of the policy.

Modules, one responsibility each:

- ``main``: the process (settings, ServiceRuntime, signals, torchrun ranks), ``build_learner``;
- ``service``: rank 0's service and its ordering rules (step -> checkpoint -> ack -> push): the
  batcher, the ack window and release ledger, flow control, pushes, metrics, checkpoint commits;
- ``loop``: the SPMD training loop every rank runs (model, optimizer, gathers, checkpoints);
- ``command``: the ``StepCommand`` rank 0 broadcasts each iteration, the loop's ``Progress``;
- ``batcher``: assembling a step's groups from ``labeled`` (skip, drop, duplicates, replay);
- ``data``: the trainer's view of a group, rank shares and micro-batch plans;
- ``step``: one optimizer step with exact gradient accumulation over whole groups;
- ``distributed``: world size 1 and torchrun + FSDP2 behind one interface;
- ``checkpoint``: atomic checkpoints with the consumed stream entries;
- ``sync``: weight pushes to the generators;
- ``evaluation``: held-out greedy / avg@k accuracy;
- ``metrics`` and ``plots``: JSONL, Prometheus, Redis series, stderr, curves.png.
"""
