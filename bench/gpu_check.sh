#!/usr/bin/env bash
# The GPU checks, as one script for a lent machine (see docs/benchmarks.md, "GPU").
# Expects the image's python3 with CUDA torch, and this project's missing pure dependencies
# as wheels in .whl/ (installed to /tmp/site). Every step is time-boxed and logs to $OUT, so
# one failing step leaves the others' numbers.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
ONLY=${ONLY:-tests vllm objectives_overhead gpu_scale demo}
step() {  # step NAME SECONDS CMD...  (skipped unless NAME is in $ONLY)
  local name=$1 secs=$2; shift 2
  [[ " $ONLY " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
step tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/conspo/objectives \
  tests/services/learner/test_step.py -m "gpu or not slow" -x
# The vLLM backend's tests on CUDA where the machine has vLLM (they skip with a reason if not).
step vllm 300 python3 -m pytest -q -p no:cacheprovider -rs -m vllm tests/services/generator
step objectives_overhead 90 python3 bench/objectives_overhead.py --device cuda --all \
  --json "$OUT/objectives_overhead_cuda.json"
step gpu_scale 200 python3 bench/gpu_scale.py --json "$OUT/gpu_scale.json"
step demo 180 python3 -m conspo.cli demo --steps 12 --out /tmp/gpu-demo --quiet
cp /tmp/gpu-demo/summary.json "$OUT/demo_summary.json" 2>/dev/null
cp /tmp/gpu-demo/*/curves.png "$OUT/demo_curves.png" 2>/dev/null
grep -h -i -E "cuda|device|error|Traceback" /tmp/gpu-demo/logs/learner-0.log /tmp/gpu-demo/*/logs/learner-0.log \
  /tmp/gpu-demo/logs/generator-0.log 2>/dev/null | head -20
exit 0
