#!/usr/bin/env bash
# The GPU check of issue #20, on one CUDA GPU, in under 8 minutes:
#   1. the test suite's CUDA cases (tests/test_cuda.py; they skip on a machine without a GPU);
#   2. `peftkit compare` on SmolLM2-135M in bf16, LoRA against its HF PEFT twin (--peer peft), few steps;
#   3. the mixed-batch routing benchmark at 1, 8 and 32 adapters, against PEFT's mixed batches;
#   4. benchmarks/versus_peft.py's training step on the GPU (LoRA on every linear: peftkit, its hook path, PEFT).
# and writes OUT/summary.json and OUT/summary.md (benchmarks/gpu_summary.py), with the targets:
# the LoRA step >= 1.3x PEFT's speed, mixed batches >= 2x PEFT's at 32 adapters.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to gpu-check/
#
# Run it from the repository root, with the environment `bash run.sh test` builds plus a CUDA build of torch
# (pip install torch==2.13.0 from the CUDA index). Without a GPU it stops at once and says so.
set -euo pipefail
out="$(realpath -m "${1:-gpu-check}")"  # relative to where it was called from, before the cd below
cd "$(dirname "$0")/.."
mkdir -p "$out"
# a step that fails or times out must not leave an earlier run's result for the summary to read as this run's
rm -rf "$out/cuda-tests.xml" "$out/cuda-tests.log" "$out/compare" "$out/compare.log" "$out/routing.json" \
  "$out/routing.md" "$out/versus_peft.json" "$out/versus_peft.md" "$out/summary.json" "$out/summary.md"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
  echo "gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); nothing was run" >&2
  exit 3
}
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*" >&2; }

step "1/4 the CUDA test cases"
timeout 120 python -m pytest -q -n 0 tests/test_cuda.py --junitxml="$out/cuda-tests.xml" -p no:cacheprovider \
  | tee "$out/cuda-tests.log" || echo "CUDA tests failed or timed out: see $out/cuda-tests.log" >&2

step "2/4 peftkit compare on SmolLM2, bf16, LoRA against HF PEFT"
timeout 240 peftkit compare --task r8-generation --device cuda --dtype bf16 --peer peft --methods lora \
  --seeds 1 --steps 30 --set budget.batch_size=16 --set task.eval_size=64 --set budget.speed_probe_steps=10 \
  --set budget.latency_repeats=5 --fresh --out "$out/compare" > "$out/compare.log" 2>&1 || echo "compare failed: see $out/compare.log" >&2

step "3/4 mixed-batch routing at 1, 8, 32 adapters"
timeout 120 python benchmarks/routing_throughput.py --device cuda --adapters 1,8,32 --json "$out/routing.json" \
  > "$out/routing.md" 2>&1 || echo "routing failed: see $out/routing.md" >&2

step "4/4 LoRA training step against PEFT on the GPU"
timeout 120 python benchmarks/versus_peft.py --device cuda --dtype bfloat16 --targets all --no-memory --no-mixed \
  --json "$out/versus_peft.json" > "$out/versus_peft.md" 2>&1 || echo "versus_peft failed: see $out/versus_peft.md" >&2

step "summary"
python -m peftkit_benchmarks.gpu_summary "$out" --seconds "$((SECONDS - start))"
