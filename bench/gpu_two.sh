#!/usr/bin/env bash
# Issue 14 on two H200s of one host (device kind nvidia-h200-x2): generator replicas behind one edge, and
# tensor parallelism. Device calls back to back from the checkout's root, after `bash bench/gpu_prepare.sh`
# (the kit's first part travels in two halves, .vk1a/a and .vk1b/b, since with the tree it is over 64 MiB):
#
#   1a. kind nvidia-h200-x2, carry [".vk1a"]      mkdir -p /tmp/p && cp .vk1a/a /tmp/p/a
#   1b. carry [".vk",".vk1b"]   cat /tmp/p/a .vk1b/b >/tmp/p/kit.tar.xz.part00 && bash .vk/vkit_append.sh /tmp/p/kit.tar.xz.part00
#   2. carry [".vk",".vk3",".dm",".whl",".rds"]                        bash bench/gpu_two.sh stage2
#   3. carry [".rds"]   bash bench/gpu_two.sh one    one generator on GPU 0 behind the edge      (~4 min)
#   4. carry [".rds"]   bash bench/gpu_two.sh two    one generator per GPU behind one edge       (~4 min)
#   5. carry [".rds"]   bash bench/gpu_two.sh tp2    one generator over both GPUs (TP=2)         (~3 min)
#   6. carry [".rds"]   bash bench/gpu_two.sh ceiling   the in-process engine alone on GPU 0     (~2 min)
#   7. carry [".rds"]   CONC=512 SUFFIX=-512 ARMS=edge ROUNDS=1 bash -c 'bash bench/gpu_two.sh one; bash bench/gpu_two.sh two'
#   8.                  bash bench/gpu_two.sh combine   one table of every phase run: results.json/.md/.png
# (bench/results/issue14-h200x2 is steps 1-7 as run on 2026-11-29, with the times each took.)
#
# Each of 3-5 starts the stack (bench/gpu_stack.py: cacher, generators, edge with EDGE_GENERATOR_ADDR
# listing every replica), drives the TIL arms through it at c=1 and c=200 (edge, and generator-til
# against the first replica) with every request the same length (ignore_eos, the edge's request), and
# stops it; rows carry generator_replicas and tensor_parallel_size. Results also stay in /tmp/two-out
# for `combine`. Same engine settings as bench/gpu_til.sh but each engine has its GPU(s) to itself
# (MEM 0.85). NCCL_NVLS_ENABLE=0 for TP (bench/gpu_stack.py sets it): NVLink multicast is off on these
# machines. Grammar masks are filled as issue 13 settled (bench/results/issue13-h200-s18): llguidance's own
# parallel fill, 14 threads, batches of 1024 (BITMASK_FILL, BITMASK_WORKERS, BITMASK_BATCH). Knobs: CONC,
# ROUNDS, MEM, EDGE_WORKERS, CLIENT_PROCS, EDGE_EXTRA, ARMS, SUFFIX (of the phase's folder: CONC=512
# SUFFIX=-512 ARMS=edge runs one and two again at saturation, beside the first results), CEIL_CONC (the
# ceiling's levels, 100,200). STREAM_INTERVAL is not applied here (vLLM's default, a message a token).
set -u
step=${1:?usage: gpu_two.sh stage2|one|two|tp2|ceiling|combine}
out=${OUT:-/tmp/two-final}
mkdir -p "$out"
TREE=/tmp/til-tree
SITE=/tmp/site
META=/tmp/tilserve-meta
KEEP=/tmp/two-out
DUMMY=/tmp/vkit_models/llama3-8b-shape-smollm2-tok-dummy
MODEL_ID=llama3-8b-shape-dummy
# Prompt tokens of every arm, plain and TIL alike (ratios need equal lengths): 512, as issue 13 measured.
INPUT_LEN=${INPUT_LEN:-512}
MEM=${MEM:-0.85}
CONC=${CONC:-1,200}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$META:$TREE:$TREE/gen
EDGE_ENV=(EDGE_ALLOW_IGNORE_EOS=true EDGE_RETRIEVAL_TOP_K=0 EDGE_QUESTION_HISTORY_K=0 EDGE_INDEX_TILS=false
  EDGE_MAX_ACTIVE=512 EDGE_WORKERS=${EDGE_WORKERS:-8} EDGE_METRICS_PORT=9200 ${EDGE_EXTRA:-})
GENERATOR_ENV=(GENERATOR_BACKEND=vllm GENERATOR_MODEL=$DUMMY GENERATOR_MODEL_ID=$MODEL_ID
  GENERATOR_LOAD_FORMAT=dummy GENERATOR_DTYPE=bfloat16 GENERATOR_MAX_MODEL_LEN=4096
  GENERATOR_GPU_MEMORY_UTILIZATION=$MEM GENERATOR_MAX_NUM_SEQS=256 GENERATOR_ENABLE_PREFIX_CACHING=false
  GENERATOR_SEED=0 GENERATOR_STRUCTURED_OUTPUT_PARALLEL_THRESHOLD=0
  GENERATOR_STRUCTURED_OUTPUT_PARALLEL_WORKERS=${BITMASK_WORKERS:-14}
  GENERATOR_STRUCTURED_OUTPUT_PARALLEL_BATCH_SIZE=${BITMASK_BATCH:-1024})
# (the plugin's variable, exported: every process started here inherits it, each engine core too)
export TILSERVE_VLLM_BITMASK_FILL=${BITMASK_FILL:-llguidance}

phase() {  # $1 name, $2 replicas, $3 GPUs per replica, $4 arms
  local name=$1 replicas=$2 gpus=$3 arms=$4
  cd $TREE || exit 1
  rm -rf "$KEEP/$name" "/tmp/two-run/$name" && mkdir -p "$KEEP/$name" "$out/$name"
  for kv in "${EDGE_ENV[@]}"; do export "${kv?}"; done
  local stack_env=()
  for kv in "${GENERATOR_ENV[@]}" "${EDGE_ENV[@]}" CACHER_REDIS_SERVER_BIN=$TREE/.rds/redis-server; do
    stack_env+=(--env "$kv")
  done
  local serving="python3 -m bench.serving --arms $arms --model $DUMMY --model-id $MODEL_ID --concurrency $CONC \
--input-len $INPUT_LEN --til-input-len $INPUT_LEN --output-len 256 --rounds ${ROUNDS:-2} --min-requests 8 \
--client-procs ${CLIENT_PROCS:-6} --generator-replicas $replicas \
--generator-addr 127.0.0.1:50052 --edge-addr 127.0.0.1:50051 \
--label 'Issue 14: $name ($replicas x generator, $gpus GPU each)' --out $KEEP/$name"
  echo "python3 -m bench.gpu_stack --replicas $replicas --gpus-per-replica $gpus ${stack_env[*]} --run \"$serving\"" \
    >"$KEEP/$name/command.txt"
  timeout 560 python3 -m bench.gpu_stack --data "/tmp/two-run/$name" --replicas "$replicas" \
    --gpus-per-replica "$gpus" "${stack_env[@]}" \
    --run "timeout 400 $serving > $KEEP/$name/serving.log 2>&1" 2>&1 | tail -15
  grep -E '^\[c=[0-9]+ [a-z-]+\] [0-9,]+ tok/s|all .* failed|Error' "$KEEP/$name/serving.log" | cut -c1-260
  for f in /tmp/two-run/"$name"/logs/*.log /tmp/two-run/"$name"/generator-*/logs/*.log; do
    if [ -f "$f" ]; then echo "== $f"; tail -n 30 "$f"; fi
  done >"$KEEP/$name/logs.txt" 2>&1
  cp "$KEEP/$name"/* "$out/$name/" 2>/dev/null
}

case "$step" in
stage2) OUT=$out bash "$(dirname "$0")/gpu_til.sh" "$step" ;;
one) phase one${SUFFIX:-} 1 1 "${ARMS:-generator-til,edge}" ;;
two) phase two${SUFFIX:-} 2 1 "${ARMS:-edge}" ;;
tp2) phase tp2${SUFFIX:-} 1 2 "${ARMS:-generator-til,edge}" ;;
ceiling)  # the engine alone (in-process AsyncLLM, no tilserve process) on GPU 0 at c=100 and c=200: what
  # one GPU gains from a batch twice as large says what a second replica can be expected to add
  cd $TREE || exit 1
  for kv in "${EDGE_ENV[@]}"; do export "${kv?}"; done
  rm -rf "$KEEP/ceiling" && mkdir -p "$KEEP/ceiling" "$out/ceiling"
  cmd=(python3 -m bench.serving --arms engine,engine-til --model "$DUMMY" --model-id $MODEL_ID --load-format dummy
    --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization "$MEM" --max-num-seqs 256
    --no-enable-prefix-caching --engine-seed 0 --bitmask-parallel-threshold 0
    --bitmask-parallel-workers "${BITMASK_WORKERS:-14}" --bitmask-parallel-batch-size "${BITMASK_BATCH:-1024}"
    --concurrency "${CEIL_CONC:-100,200}" --input-len $INPUT_LEN --til-input-len $INPUT_LEN --output-len 256
    --rounds "${ROUNDS:-2}" --min-requests 8 --label "Issue 14: the engine alone on one H200" --out "$KEEP/ceiling")
  printf '%q ' "${cmd[@]}" >"$KEEP/ceiling/command.txt"
  CUDA_VISIBLE_DEVICES=0 timeout 540 "${cmd[@]}" >"$KEEP/ceiling/serving.log" 2>&1
  echo "bench.serving exit $?"
  grep -E '^\[c=[0-9]+ [a-z-]+\] [0-9,]+ tok/s|Error' "$KEEP/ceiling/serving.log" | cut -c1-260
  cp "$KEEP/ceiling"/* "$out/ceiling/" 2>/dev/null
  ;;
combine)
  cd $TREE || exit 1
  python3 -m bench.combine --label "Issue 14: replicas and tensor parallelism on two H200s" --out "$out" \
    $KEEP/*/results.json
  for f in $KEEP/*/command.txt; do cp "$f" "$out/command-$(basename "$(dirname "$f")").txt"; done
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac
