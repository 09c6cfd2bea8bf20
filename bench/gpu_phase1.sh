#!/usr/bin/env bash
# Phase 1 on the lent H100, after the vLLM kit's four calls (../shared/device/vllm-kit/README.md):
# a smoke test of VllmEngine on SmolLM2, then arm A (and A') with the 8B-shaped dummy model.
# Run from the repository root; writes into ${OUT:-bench/results/phase1}.
set -u
out=${OUT:-bench/results/phase1}
mkdir -p "$out/bench"
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -iE '^(grpcio|protobuf|pydantic|httpx|matplotlib|transformers|torch) '
  # What `vllm serve` would still need on this machine (phase 2 carries those wheels).
  timeout 90 python3 -m bench.missing_imports vllm.entrypoints.openai.api_server vllm.entrypoints.cli.main 2>&1 \
    | grep -v -E '^(INFO|WARNING|DEBUG)'
} > "$out/box.txt" 2>&1
cat "$out/box.txt"

timeout 200 python3 -m bench.vllm_smoke --model /tmp/vkit_models/smollm2-135m-instruct-bf16 \
  --out "$out/smoke.json" > "$out/smoke.log" 2>&1
echo "smoke exit $?"
grep -E '^(PASS|FAIL|SMOKE|engine started)|Error' "$out/smoke.log" | cut -c1-400

timeout 290 python3 -m bench.serving --arms engine,engine-wrapper \
  --model /tmp/vkit_models/llama3-8b-shape-smollm2-tok-dummy --model-id llama3-8b-shape-dummy \
  --load-format dummy --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 \
  --concurrency 1,100 --input-len 512 --output-len 256 \
  --label "Phase 1, arm A: in-process vLLM 0.25.1, 8B-shaped dummy weights" \
  --out "$out/bench" > "$out/bench.log" 2>&1
echo "bench exit $?"
grep -E '^\[|^engine|^results|Error' "$out/bench.log" | cut -c1-300
