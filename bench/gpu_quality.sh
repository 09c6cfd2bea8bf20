#!/usr/bin/env bash
# The model table's SmolLM2-on-vLLM row (issue 11): the 32 diffs of bench/quality through cacher + generator
# (GENERATOR_BACKEND=vllm on SmolLM2-135M-Instruct bf16) + edge on a lent H200, VRAM instead of RSS.
#
# Here, once:  bash bench/gpu_quality.sh prepare     fills the ignored .vq0 (58 MB) and .vq1 (33 MB + scripts)
# Then, on the machine that `bash bench/gpu_til.sh stage1` and `stage2` staged (vLLM in /tmp/site, tilserve's
# metadata, /tmp/til-tree/.rds), two device calls back to back while it is warm:
#
#   carry [".vq0"]           bash bench/gpu_quality.sh model0          (appends model part 0; seconds)
#   carry [".vq1"]           bash bench/gpu_quality.sh run             (part 1, converts the GGUF to bf16 (~30 s),
#                                                                       starts the stack (~1 min), 32 TILs one
#                                                                       after another; QUALITY_TIMEOUT 200 s)
# (GENERATOR_MAX_NUM_SEQS 8: fewer CUDA graphs to capture at start; the TILs run one at a time anyway.)
# Rows are written after every diff, so a run cut short by the timeout still brings back what it measured.
#
# `run` writes $OUT/quality/{smollm2-vllm-defaults.json,table.md,table.json}, $OUT/quality-logs.txt and
# $OUT/quality-box.txt. Copy the row's JSON into bench/results/quality and rerun `python -m bench.quality.run
# --table-only` there to put it in the table. `bash bench/gpu_quality.sh dry` runs the same bench options on
# this machine with llama.cpp and 2 diffs (everything but vLLM and nvidia-smi).
set -u
step=${1:?usage: gpu_quality.sh prepare|model0|run|dry}
out=${OUT:-/tmp/til-out}
mkdir -p "$out"
SITE=/tmp/site
META=/tmp/tilserve-meta
TREE=/tmp/til-tree
MODEL=/tmp/vkit_models/smollm2-135m-instruct-bf16
LIMIT=${LIMIT:-}  # all 32 diffs unless set
# vLLM reserves this share of the GPU up front (weights, activations, KV cache): the VRAM figure is mostly this
# reservation, measured above what other engines held before the stack started. 0.10 of an H200 is ~14 GiB,
# and fits beside gpu_til.sh's three engines (0.28 each) if they are still up.
MEM=${MEM:-0.10}
# The bench's options on every machine: no retriever (none on the GPU machine: its model is not there; the edge
# then writes without related TILs, as the CPU rows' empty index does), greedy, 1024 tokens, the server's defaults.
bench_args() {  # $1 label, $2 model, then extra options
  local label=$1 model=$2; shift 2
  echo --model "$label=$model" --services cacher,generator,edge --max-tokens 1024 \
    ${LIMIT:+--limit "$LIMIT"} "$@"
}

case "$step" in
prepare)
  set -e
  KIT=${KIT:-$(cd "$(dirname "$0")/../.." && pwd)/shared/device/vllm-kit}
  [ -d "$KIT" ] || KIT=/work/shared/device/vllm-kit
  root=$(git rev-parse --show-toplevel)
  cd "$root"
  exclude=$(git rev-parse --git-common-dir)/info/exclude
  for d in /.vq0/ /.vq1/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done
  rm -rf .vq0 .vq1 && mkdir -p .vq0 .vq1
  for d in .vq0 .vq1; do cp "$KIT"/{CHUNKS.sha256,ARCHIVES.txt,vkit_append.sh} "$d"/; done
  cp "$KIT"/remote_models.sh .vq1/
  cp "$KIT"/chunks/model.tar.xz.part00 .vq0/
  cp "$KIT"/chunks/model.tar.xz.part01 .vq1/
  du -sh .vq0 .vq1
  ;;
model0)
  bash .vq0/vkit_append.sh .vq0/model.tar.xz.part00
  ;;
run)
  if [ ! -f $MODEL/config.json ]; then
    bash .vq1/vkit_append.sh .vq1/model.tar.xz.part01 || exit 1
    bash .vq1/remote_models.sh >/tmp/vkit-models.log 2>&1 || { tail -30 /tmp/vkit-models.log; exit 1; }
  fi
  PYTHONPATH=$SITE python3 -c 'import vllm' 2>/dev/null || { echo "vLLM is not staged: run gpu_til.sh stage1 and stage2 first"; exit 1; }
  mkdir -p "$out/quality" && rm -rf /tmp/til-quality
  export PYTHONPATH=$SITE:$META:$PWD:$PWD/gen VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee "$out/quality-box.txt"
  python3 -c 'import vllm, llguidance; print("vllm", vllm.__version__, "llguidance", llguidance.__version__)' 2>&1 \
    | tail -1 | tee -a "$out/quality-box.txt"
  # shellcheck disable=SC2046
  timeout "${QUALITY_TIMEOUT:-200}" python3 -m bench.quality.run $(bench_args smollm2-vllm "$MODEL") --memory vram \
    --start-timeout-s 150 --env GENERATOR_BACKEND=vllm --env GENERATOR_DTYPE=bfloat16 \
    --env GENERATOR_GPU_MEMORY_UTILIZATION="$MEM" --env GENERATOR_SEED=0 --env GENERATOR_MAX_NUM_SEQS=8 \
    --env CACHER_REDIS_SERVER_BIN=$TREE/.rds/redis-server --data /tmp/til-quality --out "$out/quality" \
    >"$out/quality.log" 2>&1
  echo "bench.quality.run exit $?"
  tail -5 "$out/quality.log"
  for f in /tmp/til-quality/logs/*.log; do [ -f "$f" ] && { echo "== $f"; tail -40 "$f"; }; done >"$out/quality-logs.txt" 2>&1
  ;;
dry)  # the same options on this machine: llama.cpp, no GPU, 2 diffs
  LIMIT=${LIMIT:-2}
  # shellcheck disable=SC2046
  rm -rf /tmp/til-quality-dry
  PYTHONPATH=$PWD:$PWD/gen ${PY:-python3} -m bench.quality.run $(bench_args smollm2-dry packaged) --data /tmp/til-quality-dry --out "$out/quality" \
    >"$out/quality.log" 2>&1
  echo "bench.quality.run exit $?"
  tail -3 "$out/quality.log"
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac
