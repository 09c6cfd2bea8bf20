#!/usr/bin/env bash
# Phase 2 on the lent H100, after the vLLM kit's first three calls (../shared/device/vllm-kit/README.md).
# Each step is one device call; run them back to back on the warm machine, from the repository root,
# carrying .whl (wheels the machine lacks: grpcio 1.85.1, pydantic-settings, redis, uvicorn, ...) and
# .rds (a redis-server for the cacher's embedded Redis). Output goes to $OUT (the device's folder).
#
#   bash bench/gpu_phase2.sh smoke   VllmEngine smoke on SmolLM2, then cacher + generator (vLLM) + edge
#                                    with SmolLM2: a TIL for examples/sample.diff and a JSON-schema request
#   bash bench/gpu_phase2.sh ab      8B-shaped dummy model: arms A and A_til in process, then B (vllm serve)
#   bash bench/gpu_phase2.sh cde     the stack on the 8B dummy: arms C, C_til, D, E, then the cancel test
# CONC, ROUNDS, ARMS_A, ARMS_B, ARMS_CDE, SKIP_A and CANCEL (a command, or `true`) narrow a re-run.
set -u
step=${1:?usage: gpu_phase2.sh smoke|ab|cde}
out=${OUT:-/tmp/phase2-out}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD:$PWD/gen VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
MODELS=/tmp/vkit_models
SMOL=$MODELS/smollm2-135m-instruct-bf16
DUMMY=$MODELS/llama3-8b-shape-smollm2-tok-dummy
CONC=${CONC:-1,16,64,100,128}
# The engine settings every 8B arm shares (the generator's GENERATOR_* equivalents below).
ENGINE=(--model "$DUMMY" --model-id llama3-8b-shape-dummy --load-format dummy --dtype bfloat16
  --max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 --enable-prefix-caching)
LOAD=(--concurrency "$CONC" --input-len 512 --til-input-len 512 --output-len 256 --rounds "${ROUNDS:-2}")
ARMS_A=${ARMS_A:-engine,engine-til}
ARMS_B=${ARMS_B:-openai}
ARMS_CDE=${ARMS_CDE:-generator,generator-til,edge,edge-hit}

marker=/tmp/site/.phase2-wheels-$(ls .whl | md5sum | cut -c1-8)
if [ ! -f "$marker" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch "$marker" || { echo "wheel install failed"; exit 1; }
fi

tail_logs() {  # service logs' tails into one file
  for f in "$1"/logs/*.log; do echo "== $f"; tail -n "${2:-40}" "$f"; done > "$out/$3" 2>&1
}

case "$step" in
smoke)
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import grpc, google.protobuf, pydantic, vllm, llguidance, xgrammar, torch; print("grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "pydantic", pydantic.VERSION, "vllm", vllm.__version__, "llguidance", llguidance.__version__, "torch", torch.__version__)'
    timeout 60 python3 -m bench.missing_imports services.edge.__main__ services.cacher.__main__ \
      services.generator.__main__ bench.serving vllm.entrypoints.openai.api_server 2>&1 | grep -v -E '^(INFO|WARNING|DEBUG)'
  } > "$out/box.txt" 2>&1
  cat "$out/box.txt"
  timeout 240 python3 -m bench.vllm_smoke --model "$SMOL" --out "$out/smoke.json" > /tmp/smoke.log 2>&1
  echo "smoke exit $?"
  grep -E '^(PASS|FAIL|SMOKE|engine started)|Error' /tmp/smoke.log | cut -c1-600 | tee "$out/smoke.log"
  rm -rf /tmp/stack-smol
  timeout 300 python3 -m bench.gpu_stack --data /tmp/stack-smol \
    --env GENERATOR_BACKEND=vllm --env GENERATOR_MODEL="$SMOL" --env GENERATOR_MAX_MODEL_LEN=4096 \
    --env GENERATOR_GPU_MEMORY_UTILIZATION=0.4 --env CACHER_REDIS_SERVER_BIN="$PWD/.rds/redis-server" \
    --run "python3 -m bench.til_check --diff examples/sample.diff --out $out/til_check.json" 2>&1 | tail -20
  tail_logs /tmp/stack-smol 30 stack-smol.log
  ;;
ab)
  [ -n "${SKIP_A:-}" ] || timeout 290 python3 -m bench.serving --arms "$ARMS_A" "${ENGINE[@]}" "${LOAD[@]}" \
    --label "Phase 2, arms A and A_til: in-process vLLM 0.25.1, 8B-shaped dummy weights" \
    --out "$out/a" > "$out/a.log" 2>&1
  [ -n "${SKIP_A:-}" ] || echo "A exit $?"; [ -n "${SKIP_A:-}" ] || grep -E '^\[c=|^engine|Error' "$out/a.log" | grep -v warm-up | grep -v measuring | cut -c1-250
  python3 -m vllm.entrypoints.openai.api_server --model "$DUMMY" --served-model-name llama3-8b-shape-dummy \
    --load-format dummy --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 \
    --enable-prefix-caching --seed 0 \
    --structured-outputs-config '{"backend":"guidance","disable_any_whitespace":true,"disable_additional_properties":true}' \
    --host 127.0.0.1 --port 8000 > "$out/vllm-serve.log" 2>&1 &
  serve=$!
  python3 - <<'EOF2'
import time, urllib.request
for _ in range(180):
    try:
        print("vllm serve up:", urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=2).read()[:200])
        break
    except OSError:
        time.sleep(1)
EOF2
  timeout 200 python3 -m bench.serving --arms "$ARMS_B" --openai-url http://127.0.0.1:8000 "${ENGINE[@]}" "${LOAD[@]}" \
    --label "Phase 2, arm B: vllm serve (vLLM 0.25.1 OpenAI server), same engine settings" \
    --out "$out/b" > "$out/b.log" 2>&1
  echo "B exit $?"; grep -E '^\[c=|Error' "$out/b.log" | grep -v warm-up | grep -v measuring | cut -c1-250
  kill "$serve"; wait "$serve" 2>/dev/null
  grep -E 'Error|error' "$out/vllm-serve.log" | tail -5
  ;;
cde)
  rm -rf /tmp/stack-8b
  timeout 560 python3 -m bench.gpu_stack --data /tmp/stack-8b \
    --env GENERATOR_BACKEND=vllm --env GENERATOR_MODEL="$DUMMY" --env GENERATOR_MODEL_ID=llama3-8b-shape-dummy \
    --env GENERATOR_LOAD_FORMAT=dummy --env GENERATOR_DTYPE=bfloat16 --env GENERATOR_MAX_MODEL_LEN=4096 \
    --env GENERATOR_GPU_MEMORY_UTILIZATION=0.85 --env GENERATOR_MAX_NUM_SEQS=256 \
    --env GENERATOR_ENABLE_PREFIX_CACHING=true \
    --env EDGE_RETRIEVAL_TOP_K=0 --env EDGE_QUESTION_HISTORY_K=0 --env EDGE_INDEX_TILS=false \
    --env CACHER_REDIS_SERVER_BIN="$PWD/.rds/redis-server" \
    --run "timeout 380 python3 -m bench.serving --arms $ARMS_CDE ${ENGINE[*]} ${LOAD[*]} --label 'Phase 2, arms C, C_til, D, E: the stack on vLLM 0.25.1, 8B-shaped dummy weights' --out $out/cde > $out/cde.log 2>&1" \
    --run "${CANCEL:-timeout 60 python3 -m bench.cancel --streams 100 --out $out/cancel.json}" 2>&1 | tail -12
  grep -E '^\[c=|Error' "$out/cde.log" | grep -v warm-up | grep -v measuring | cut -c1-250
  tail_logs /tmp/stack-8b 25 stack-8b.log
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac
