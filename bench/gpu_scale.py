"""One rollout-and-update cycle at 0.5B scale: generation vs learner step, per objective.

The pipeline's CPU runs use a 0.5M-parameter model; this script times the two halves of an RL
step on a model with Qwen2.5-0.5B's body (24 layers, hidden 896, 14 query / 2 KV heads, MLP
4864) and our character vocabulary (so ~358M parameters rather than 494M: the embedding is
tiny). Weights are random: nothing here measures learning, only time.

- generation: ``HFBackend.generate`` (the generator's CPU/GPU fallback backend; vLLM is the
  production GPU path and is not installed here) for ``--prompts`` x ``--group`` completions of
  up to ``--max-tokens`` tokens, in bf16 on the GPU;
- learner: ``Trainer.step`` (services.learner.step: teacher-forced log-probs, objective,
  backward, clip, AdamW) on exactly those completions, fp32 master weights under bf16 autocast,
  for each ``--objectives`` (the ConSPO / GRPO ratio is the objective's overhead at scale);
- weight hand-off: the bf16 device-to-host copy a gloo push starts with (the parameter list a
  ``weight_sync_dtype=bfloat16`` learner sends), and ``HFBackend.load_weights`` of it (what a
  generator does on receipt).

Rewards are synthetic (the first half of each group "correct"): a random model solves nothing,
and the step's cost does not depend on the labels. The ideal asynchronous speed-up
``(t_gen + t_train) / max(t_gen, t_train)`` at this scale is printed from the two times.

    python bench/gpu_scale.py                 # the 0.5B body on CUDA (what the device run used)
    python bench/gpu_scale.py --smoke         # a 2-layer model on the CPU, < 30 s
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, machine, result_paths, summary, table, write_json

from conspo.models.tiny import TinyModelConfig, build_tiny_model, count_parameters
from conspo.protocol import SamplingParams
from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split
from services.generator.backends.hf import HFBackend
from services.learner.data import TrainGroup
from services.learner.distributed import DistContext
from services.learner.step import TrainConfig, Trainer
from services.learner.sync import parameter_list

log = logging.getLogger("bench.gpu_scale")

QWEN25_05B_BODY = TinyModelConfig(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
)
SMOKE = TinyModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _groups(prompts: list[list[int]], completions, temperature: float, max_tokens: int):
    out = []
    for i, (p, group) in enumerate(zip(prompts, completions, strict=True)):
        g = len(group)
        correct = tuple(j < g // 2 for j in range(g))
        out.append(
            TrainGroup(
                group_id=f"g{i}",
                prompt_ids=tuple(p),
                completions=tuple(tuple(c.token_ids) for c in group),
                behaviour_logprobs=tuple(tuple(c.logprobs) for c in group),
                rewards=tuple(float(c) for c in correct),
                correct=correct,
                temperature=temperature,
                max_tokens=max_tokens,
                policy_version=0,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--objectives", nargs="+", default=["conspo", "grpo", "gspo"])
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps per objective")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model, 4 prompts (< 30 s)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        args.prompts, args.max_tokens, args.steps = 4, 16, 1
    device = torch.device(args.device)
    if device.type == "cpu" and not args.smoke:
        # 358M parameters x 32 x 8 x 128 sampled tokens would take hours on a few cores.
        print("gpu_scale.py is the GPU variant: run it on a CUDA device, or with --smoke "
              "(a 2-layer model) on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    info = machine()
    print(header(info), flush=True)
    torch.manual_seed(0)

    cfg = SMOKE if args.smoke else QWEN25_05B_BODY
    model, tokenizer = build_tiny_model(cfg, seed=0)
    n_params = count_parameters(model)
    train_model = model.to(device).train()
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen_model = copy.deepcopy(train_model).to(gen_dtype).eval()
    backend = HFBackend(gen_model, tokenizer, seed_mode="batch")

    problems = make_split(None, DEFAULT_N_TEST, DEFAULT_SPLIT_SEED).train[: args.prompts]
    prompts = [list(x) for x in tokenizer([p.prompt for p in problems]).input_ids]
    params = SamplingParams(n=args.group, temperature=1.0, max_tokens=args.max_tokens, seed=0)

    backend.generate(prompts[:2], params)  # warm-up: kernels, allocator
    _sync(device)
    t0 = time.perf_counter()
    completions = backend.generate(prompts, params)
    _sync(device)
    t_gen = time.perf_counter() - t0
    gen_tokens = sum(len(c.token_ids) for g in completions for c in g)

    groups = _groups(prompts, completions, 1.0, args.max_tokens)
    rows = []
    train_times: dict[str, float] = {}
    for name in args.objectives:
        trainer = Trainer(
            TrainConfig(objective=name, lr=1e-6, total_steps=100, token_budget=65_536),
            train_model,
            DistContext(device=device),
            pad_id=tokenizer.pad_token_id,
            dummy_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id),
        )
        trainer.step(groups, 0, 100)  # warm-up (optimizer state allocation)
        _sync(device)
        times = []
        for s in range(args.steps):
            t = time.perf_counter()
            stats = trainer.step(groups, s + 1, 100)
            _sync(device)
            times.append(time.perf_counter() - t)
        train_times[name] = min(times)
        rows.append([name, f"{min(times):.3f}", f"{stats.forward_tokens / min(times):,.0f}"])
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    _sync(device)
    t = time.perf_counter()
    # What a bf16 push sends (services.learner.sync.parameter_list: tied weights once), on host.
    pushed = parameter_list(train_model, None, dtype=torch.bfloat16)
    host = {name: t.cpu() for name, t in pushed}
    t_d2h = time.perf_counter() - t
    t = time.perf_counter()
    backend.load_weights(host)  # host -> device copy and cast, as a generator receives them
    _sync(device)
    t_load = time.perf_counter() - t
    weight_bytes = sum(v.numel() * v.element_size() for v in host.values())

    base = args.objectives[0]
    t_train = train_times[base]
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    print(
        f"model: {n_params / 1e6:.1f}M parameters on {device} "
        f"({'smoke' if args.smoke else 'Qwen2.5-0.5B body'})"
    )
    print(
        f"generation: {args.prompts}x{args.group} completions, {gen_tokens} tokens "
        f"in {t_gen:.2f} s = {gen_tokens / t_gen:,.0f} tok/s (hf backend, {gen_dtype})"
    )
    print(table(rows, ["objective", "step s", "fwd tok/s"]))
    print(
        f"weights: {weight_bytes / 1e9:.2f} GB bf16; device->host {t_d2h:.3f} s, "
        f"load into generator {t_load:.3f} s"
    )
    ratios = {k: v / train_times.get("grpo", t_train) for k, v in train_times.items()}
    out = {
        "machine": info,
        "config": {**vars(args), "model": cfg.model_dump(), "parameters": n_params},
        "generation": {"seconds": t_gen, "tokens": gen_tokens, "tokens_per_s": gen_tokens / t_gen},
        "train_step_s": train_times,
        "step_ratio_vs_grpo": ratios,
        "weights": {"bytes": weight_bytes, "d2h_s": t_d2h, "load_s": t_load},
        "ideal_async_speedup": ideal,
    }
    path, _ = result_paths(args.json, "gpu_scale")
    write_json(path, "gpu_scale", out)
    summary(
        f"{n_params / 1e6:.0f}M on {device}: gen {gen_tokens / t_gen:,.0f} tok/s ({t_gen:.1f} s), "
        f"{base} step {t_train:.2f} s (x{ratios.get(base, 1):.2f} of grpo), "
        f"ideal async speed-up {ideal:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
