#!/usr/bin/env bash
# Issue 13's like-for-like run on one lent H200: every arm, one GPU, one run, arms interleaved.
# Three device calls back to back (the machine keeps /tmp only while warm), from the checkout's root,
# after `bash bench/gpu_prepare.sh` there (kind nvidia-h200; ~1 + ~4 + ~4 minutes of device time):
#
#   1. carry [".vk",".vk1"]                         timeout_s 300  bash bench/gpu_til.sh stage1
#   2. carry [".vk",".vk3",".dm",".whl",".rds"]     timeout_s 600  bash bench/gpu_til.sh stage2 && bash bench/gpu_til.sh up
#   3. carry [".rds"]                               timeout_s 600  bash bench/gpu_til.sh measure
#
# Call 2's carry and the tree passed 64 MiB in session 20: split it, the kit first, then stage2 finds it
# installed. (`.vk1` split in two, `.vk1a` and `.vk1b`, for the same reason; bench/results/issue13-h200-s20.)
#   2a. carry [".vk",".vk3"]            bash .vk/vkit_append.sh .vk3/kit.tar.xz.part01 && bash .vk/remote_install.sh
#   2b. carry [".dm",".whl",".rds"]     bash bench/gpu_til.sh stage2 && bash bench/gpu_til.sh up
#
# `profile` (carry [".rds",".pys"]) records a service with py-spy (PROFILE_SERVICE, default the generator;
# PROFILE_EXTRA: more options, e.g. --gil) while PROFILE_ARMS run one at a time.
# Then copy what comes back under $OUT into bench/results/<name>/ with a README of the facts. On a machine
# still warm, `measure` can run again (ARMS=edge-hit CONC=1,100 for E alone); other EDGE_* values, and
# STREAM_INTERVAL, OUTPUT_CHUNK or BITMASK_* for the stack's generator, need `down` and `up` first (the
# services read their settings when they start; `up` records what it started with in $RUN/up-env.txt,
# which `measure` copies into command.txt).
#
# `up` starts, as daemons that outlive the call, our stack (cacher + generator on vLLM with tilserve's
# plugin filling grammar masks in parallel + edge) and then stock `vllm serve` (no plugin: VLLM_PLUGINS=
# and no tilserve metadata on its path). `measure` starts the in-process engine (A, A_til; plugin on) and
# drives every arm at each level, warmed at its own level, interleaved. The three engines share the GPU
# (MEM each, started one after another so that each one's memory profile sees the others' final
# footprint); only the arm being measured has requests in flight.
#
# Every engine: 8B-shaped dummy weights, bf16, max_model_len 4096, max_num_seqs 256, prefix caching OFF
# (every TIL arm sends the same diffs: with it on, the second arm on an engine would find the first's
# prompts cached), seed 0, llguidance. Knobs: CONC, ROUNDS, MIN_REQ, ARMS, MEM, LABEL, EDGE_EXTRA
# (more EDGE_NAME=VALUE words for the edge and the benchmark alike), EDGE_WORKERS (edge processes on one
# port, 12 of the box's 16 cores: E met its bound with 12, not 8, in issue13-h200-s19-diag; metrics from 9100 up),
# NEAR_CACHE (EDGE_NEAR_CACHE_ENTRIES, 1024: each edge worker answers repeated hits without the cacher
# hop), CLIENT_PROCS (the benchmark's client processes, 6: at ~0.5 ms of client CPU a hit, 4 were near
# their limit at c=100), SKIP_SERVE (no vllm serve), INPUT_LEN, HIT_CLIENT (bench.serving --hit-client:
# python, h2load or both; h2load needs `.h2l` from `bash bench/h2load_kit.sh` carried to `measure`),
# STREAM_INTERVAL and OUTPUT_CHUNK (below), FRONTENDS (GENERATOR_FRONTENDS: the generator's gRPC front-end
# processes sharing its engine core, as `vllm serve --api-server-count`; unset: 1), H2LOAD_ROUNDS (h2load's hits = this x concurrency, 500: at
# ~18k hits/s the 50 of s19 were a quarter second of load), TRACE_GRAMMAR (below), STAGGER_S (2.5:
# STAGGERED_ARMS, default A, A_til, C_til and D, measured again at c=100 with their streams started over
# 2.5 s, under a request's ~3.2 s, so that the waves' prefill-step lottery does not decide the TTFTs;
# bench.load.Stagger; 0: lockstep rows only), ENGINE_NICE (`measure` renices every vLLM engine core's threads
# to this while the arms run, e.g. -10: whether the engine core is short of CPU).
set -u
step=${1:?usage: gpu_til.sh stage1|stage2|ab|up|measure|profile|llguidance|down}
out=${OUT:-/tmp/til-out}
mkdir -p "$out"
TREE=/tmp/til-tree  # the tree as `up` found it: the stack and the benchmark run the same code
SITE=/tmp/site
META=/tmp/tilserve-meta
RUN=/tmp/til-run
DUMMY=/tmp/vkit_models/llama3-8b-shape-smollm2-tok-dummy
MODEL_ID=llama3-8b-shape-dummy
# Prompt tokens of every arm, plain and TIL alike (ratios need equal lengths): the issue's 512. The edge's
# TIL prompt without a diff must be well below it (bench.til_workload says so if it is not).
INPUT_LEN=${INPUT_LEN:-512}
MEM=${MEM:-0.28}
CONC=${CONC:-1,100}
# D (edge) before C_til (generator-til): both send the same requests, and the generator keeps the token ids
# and prepared schema of recent ones by content, so the second of the two finds its prepare done (session 18
# measured D after C_til: 1.1 against 4.0 ms of prepare at c=1). D's bounds are the ones that count.
ARMS=${ARMS:-engine,engine-til,openai,openai-til,generator,edge,generator-til,edge-hit}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# OUTPUT_CHUNK: vLLM's VLLM_V1_OUTPUT_PROC_CHUNK_SIZE (128) for every engine alike (exported: the stack,
# vllm serve and the in-process arms inherit it). AsyncLLM's output handler processes a step's outputs in
# chunks of this many requests and yields the event loop between chunks; at 100 streams one chunk is the
# whole step. A one-variable check for the H200; the CPU toy (bench/results/accept-delay-cpu) saw no gain.
[ -n "${OUTPUT_CHUNK:-}" ] && export VLLM_V1_OUTPUT_PROC_CHUNK_SIZE=$OUTPUT_CHUNK
# TRACE_GRAMMAR: seconds between summaries of where schema requests wait inside each engine core with our
# plugin (services/generator/vllm_trace.py): the generator's (its log) and the in-process one (serving.log).
# With it, each engine core also writes every request's and step's times (TILSERVE_VLLM_TRACE_DIR, into
# diag.tar.gz), and `measure` reads them per arm into $out/engine-timeline.txt (bench/engine_timeline.py).
TRACE_DIR=/tmp/diag/trace
if [ -n "${TRACE_GRAMMAR:-}" ]; then
  export TILSERVE_VLLM_TRACE_GRAMMAR=$TRACE_GRAMMAR TILSERVE_VLLM_TRACE_DIR=$TRACE_DIR
fi
OURS=$SITE:$META:$TREE:$TREE/gen  # our processes: the kit, tilserve's metadata (its vLLM plugin), the tree
# The edge's settings: the edge and the benchmark (which builds the edge's request with the edge's code)
# must read the same ones. EDGE_WORKERS=best: the count `hits` found best on this box.
BEST_WORKERS=/tmp/til-best-edge-workers
if [ "${EDGE_WORKERS:-}" = best ]; then
  EDGE_WORKERS=$(cat $BEST_WORKERS 2>/dev/null) || { echo "EDGE_WORKERS=best: run hits first"; exit 1; }
fi
EDGE_ENV=(EDGE_ALLOW_IGNORE_EOS=true EDGE_RETRIEVAL_TOP_K=0 EDGE_QUESTION_HISTORY_K=0 EDGE_INDEX_TILS=false
  EDGE_MAX_ACTIVE=512 EDGE_WORKERS=${EDGE_WORKERS:-12} EDGE_NEAR_CACHE_ENTRIES=${NEAR_CACHE:-1024}
  EDGE_METRICS_PORT=9100 ${EDGE_EXTRA:-})
GENERATOR_ENV=(GENERATOR_BACKEND=vllm GENERATOR_MODEL=$DUMMY GENERATOR_MODEL_ID=$MODEL_ID
  GENERATOR_LOAD_FORMAT=dummy GENERATOR_DTYPE=bfloat16 GENERATOR_MAX_MODEL_LEN=4096
  GENERATOR_GPU_MEMORY_UTILIZATION=$MEM GENERATOR_MAX_NUM_SEQS=256 GENERATOR_ENABLE_PREFIX_CACHING=false
  GENERATOR_SEED=0 GENERATOR_STRUCTURED_OUTPUT_PARALLEL_THRESHOLD=0)
# SCHEMA_WORKERS: GENERATOR_SCHEMA_WORKERS (processes readying request schemas, each front-end's; unset: the
# generator's default, 2; 0: 4 threads in the front-end, as before session 21).
[ -n "${SCHEMA_WORKERS:-}" ] && GENERATOR_ENV+=(GENERATOR_SCHEMA_WORKERS=$SCHEMA_WORKERS)
# How our engines fill grammar masks (tilserve's vLLM plugin): BITMASK_WORKERS threads (unset: vLLM's 8),
# BITMASK_BATCH requests per task (unset: 16), BITMASK_FILL threads|llguidance. The generator (`up`) and
# the in-process engine (`measure`) get the same; `ab` compares variants on A_til alone.
BITMASK_ARGS=()
[ -n "${BITMASK_WORKERS:-}" ] && { GENERATOR_ENV+=(GENERATOR_STRUCTURED_OUTPUT_PARALLEL_WORKERS=$BITMASK_WORKERS)
  BITMASK_ARGS+=(--bitmask-parallel-workers "$BITMASK_WORKERS"); }
[ -n "${BITMASK_BATCH:-}" ] && { GENERATOR_ENV+=(GENERATOR_STRUCTURED_OUTPUT_PARALLEL_BATCH_SIZE=$BITMASK_BATCH)
  BITMASK_ARGS+=(--bitmask-parallel-batch-size "$BITMASK_BATCH"); }
# (the plugin's variable, exported: every process started here inherits it, the generator's engine core too)
[ -n "${BITMASK_FILL:-}" ] && export TILSERVE_VLLM_BITMASK_FILL=$BITMASK_FILL
# STREAM_INTERVAL: vLLM's stream_interval (tokens a message after the first) for every engine alike: the
# generator (GENERATOR_STREAM_INTERVAL), vllm serve (--stream-interval) and the in-process arms.
INTERVAL_ARGS=()
[ -n "${STREAM_INTERVAL:-}" ] && { GENERATOR_ENV+=(GENERATOR_STREAM_INTERVAL=$STREAM_INTERVAL)
  INTERVAL_ARGS+=(--stream-interval "$STREAM_INTERVAL"); }
# FRONTENDS: our generator only. (vllm serve keeps its one API server, what a user starts by default; the
# in-process arms have no server.) Its front-ends' metrics are on 9120 + i (9092 + i would meet the cacher's 9094).
# Each edge worker then opens two connections per front-end (the kernel hands each connection to one).
[ -n "${FRONTENDS:-}" ] && { GENERATOR_ENV+=(GENERATOR_FRONTENDS=$FRONTENDS GENERATOR_METRICS_PORT=9120)
  EDGE_ENV+=(EDGE_GENERATOR_CONNECTIONS=$((2 * FRONTENDS))); }
# Stock vLLM's server with the same engine settings and structured-output backend as our generator.
SERVE=(python3 -m vllm.entrypoints.openai.api_server --model "$DUMMY" --served-model-name $MODEL_ID
  --load-format dummy --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization "$MEM" --max-num-seqs 256
  --no-enable-prefix-caching --seed 0 --host 127.0.0.1 --port 8000
  --structured-outputs-config '{"backend":"guidance","disable_any_whitespace":true,"disable_additional_properties":true}'
  "${INTERVAL_ARGS[@]}")
ENGINE=(--model "$DUMMY" --model-id $MODEL_ID --load-format dummy --dtype bfloat16 --max-model-len 4096
  --gpu-memory-utilization "$MEM" --max-num-seqs 256 --no-enable-prefix-caching --engine-seed 0 "${INTERVAL_ARGS[@]}")

wait_for() {  # $1 what, $2 seconds, $3 pid that must stay alive, $4... the check
  local what=$1 limit=$2 pid=$3; shift 3
  for _ in $(seq "$limit"); do
    "$@" >/dev/null 2>&1 && { echo "$what up"; return 0; }
    kill -0 "$pid" 2>/dev/null || { echo "$what exited before it was up"; return 1; }
    sleep 1
  done
  echo "$what not up after ${limit}s"; return 1
}

logs_to_out() {  # the tails of every log of the run into $out/logs.txt
  for f in "$RUN"/*.log "$RUN"/stack/logs/*.log "$RUN"/stack/*/logs/*.log; do
    if [ -f "$f" ]; then echo "== $f"; tail -n "${1:-40}" "$f"; fi
  done >"$out/logs.txt" 2>&1
}

diag_to_out() {  # every service's whole log and /tmp/diag (profiles) as one file, $out/diag.tar.gz
  mkdir -p /tmp/diag/logs
  for f in "$RUN"/*.log "$RUN"/stack/logs/*.log; do [ -f "$f" ] && cp "$f" /tmp/diag/logs/; done
  tar -czf "$out/diag.tar.gz" -C /tmp diag
}

case "$step" in
stage1)
  if PYTHONPATH=$SITE python3 -c 'import vllm' 2>/dev/null; then echo "the kit is installed already"; exit 0; fi
  bash .vk/vkit_append.sh .vk1/kit.tar.xz.part00
  ;;
stage2)
  set -e
  if PYTHONPATH=$SITE python3 -c 'import vllm' 2>/dev/null; then
    echo "the kit is installed already (a machine still warm)"
  else
    bash .vk/vkit_append.sh .vk3/kit.tar.xz.part01
    bash .vk/remote_install.sh >/tmp/vkit-install.log 2>&1 || { tail -30 /tmp/vkit-install.log; exit 1; }
    grep -E '^(==|python|torch|  ERROR|WARNING|triton)' /tmp/vkit-install.log
  fi
  mkdir -p /tmp/vkit_models && cp -a .dm/llama3-8b-shape-smollm2-tok-dummy /tmp/vkit_models/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl
  # tilserve's metadata (entry points: the vLLM plugin) without installing the package over the tree.
  rm -rf $TREE && mkdir -p $TREE && tar -c --exclude='./.*' . | tar -x -C $TREE
  cp -a .rds $TREE/.rds
  rm -rf $META && mkdir -p $META
  (cd $TREE && python3 -c 'from setuptools import setup; setup()' -q egg_info --egg-base $META)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/box.txt"
  PYTHONPATH=$OURS python3 -c 'import vllm, grpc, llguidance, torch; print("vllm", vllm.__version__, "grpc", grpc.__version__, "llguidance", llguidance.__version__, "torch", torch.__version__)' 2>&1 | tail -1 | tee -a "$out/box.txt"
  PYTHONPATH=$OURS python3 -m services.generator.vllm_plugin 2>&1 | tail -2 | tee -a "$out/box.txt"
  (cd $TREE && PYTHONPATH=$OURS timeout 90 python3 -m bench.missing_imports services.edge.__main__ \
    services.cacher.__main__ services.generator.__main__ bench.serving 2>&1 | grep -E 'missing' | tee -a "$out/box.txt")
  ;;
up)
  rm -rf $RUN && mkdir -p $RUN
  cd $TREE || exit 1
  stack_env=()
  for kv in "${GENERATOR_ENV[@]}" "${EDGE_ENV[@]}" CACHER_REDIS_SERVER_BIN=$TREE/.rds/redis-server; do
    stack_env+=(--env "$kv")
  done
  PYTHONPATH=$OURS setsid nohup python3 -m bench.gpu_stack --data $RUN/stack --hold "${stack_env[@]}" \
    >$RUN/stack.log 2>&1 </dev/null &
  echo $! >$RUN/stack.pid
  { echo "generator: ${GENERATOR_ENV[*]} TILSERVE_VLLM_BITMASK_FILL=${BITMASK_FILL:-}"; echo "edge: ${EDGE_ENV[*]}"
    echo "vllm serve: $(printf '%q ' "${SERVE[@]}")"
    echo "every engine: VLLM_V1_OUTPUT_PROC_CHUNK_SIZE=${VLLM_V1_OUTPUT_PROC_CHUNK_SIZE:-unset (128)}"; } >$RUN/up-env.txt
  wait_for "our stack" 420 $! test -f $RUN/stack/ready || { logs_to_out 60; exit 1; }
  [ -n "${SKIP_SERVE:-}" ] && { logs_to_out 15; exit 0; }  # a run without B and B_til
  cd /tmp  # nothing of tilserve on its path, not even the working directory
  PYTHONPATH=$SITE VLLM_PLUGINS= setsid nohup "${SERVE[@]}" >$RUN/vllm-serve.log 2>&1 </dev/null &
  echo $! >$RUN/serve.pid
  cd $TREE
  wait_for "vllm serve" 420 $! python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8000/v1/models", timeout=2)' \
    || { logs_to_out 60; exit 1; }
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
  logs_to_out 15
  ;;
measure)
  [ -x .h2l/h2load ] && export H2LOAD=$PWD/.h2l/h2load  # carried (bench/h2load_kit.sh), for HIT_CLIENT
  cd $TREE || exit 1
  for kv in "${EDGE_ENV[@]}"; do export "${kv?}"; done
  cmd=(python3 -m bench.serving --arms "$ARMS" "${ENGINE[@]}" --bitmask-parallel-threshold 0 "${BITMASK_ARGS[@]}"
    --concurrency "$CONC" --input-len "$INPUT_LEN" --til-input-len "$INPUT_LEN" --output-len 256
    --rounds "${ROUNDS:-2}" --min-requests "${MIN_REQ:-8}" --client-procs "${CLIENT_PROCS:-6}"
    --generator-addr 127.0.0.1:50052 --edge-addr 127.0.0.1:50051 --openai-url http://127.0.0.1:8000
    --hit-client "${HIT_CLIENT:-python}" --edge-metrics 127.0.0.1:9100 --h2load-rounds "${H2LOAD_ROUNDS:-500}"
    --stagger-s "${STAGGER_S:-2.5}" --staggered-arms "${STAGGERED_ARMS:-engine,engine-til,generator-til,edge}"
    --label "${LABEL:-Issue 13: every arm like for like on one H200}" --out "$out")
  printf '%q ' "${cmd[@]}" >"$out/command.txt"
  { echo; echo "benchmark: ${EDGE_ENV[*]}"
    echo "in-process engines: VLLM_V1_OUTPUT_PROC_CHUNK_SIZE=${VLLM_V1_OUTPUT_PROC_CHUNK_SIZE:-unset (128)}"
    echo "the stack and vllm serve (PYTHONPATH=$SITE VLLM_PLUGINS=), as \`up\` started them:"
    cat $RUN/up-env.txt 2>/dev/null || echo "(no $RUN/up-env.txt)"; } >>"$out/command.txt"
  # The box's CPU while the arms run: vmstat each second, and each process's CPU time before and after
  # (its difference says who used the cores; the clients, the edge and the generator share them).
  cpu_snapshot() { ps -eo pid,ppid,cputime,args --sort=-cputime | cut -c1-200 | head -60; }
  cpu_snapshot >"$out/cpu-before.txt"
  vmstat -t 1 >"$out/vmstat.txt" 2>&1 &
  vm=$!
  nicer=
  gpu_pids() { nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null; }
  renice_gpu() {  # every thread of every process holding the GPU, to $1; one line per process to stdout
    for p in $(gpu_pids); do
      n=0
      for t in /proc/$p/task/*; do renice -n "$1" -p "${t##*/}" >/dev/null 2>&1 && n=$((n + 1)); done
      echo "$p $(cat /proc/$p/comm 2>/dev/null) $n threads at $1"
    done
  }
  if [ -n "${ENGINE_NICE:-}" ]; then
    # The processes that hold the GPU are the engine cores (the model runs in each at tensor parallel 1;
    # without the setproctitle package they are not titled VLLM::EngineCore): the stack's, vllm serve's
    # and the in-process one once it starts, each of their threads at this niceness while the arms run.
    # reniced.txt says which; they are set back to 0 afterwards, and the loop ends with this shell.
    echo "every engine core's threads at nice $ENGINE_NICE while the arms ran (reniced.txt)" >>"$out/command.txt"
    parent=$$
    while kill -0 "$parent" 2>/dev/null; do
      renice_gpu "$ENGINE_NICE" >"$out/reniced.txt.new" && mv "$out/reniced.txt.new" "$out/reniced.txt"
      sleep 2
    done &
    nicer=$!
    trap 'kill $nicer 2>/dev/null; renice_gpu 0 >/dev/null' EXIT INT TERM
  fi
  # serving-times.log: the same lines with the time each was printed, to place vmstat's seconds in an arm.
  PYTHONPATH=$OURS timeout "${MEASURE_TIMEOUT:-540}" "${cmd[@]}" 2>&1 | while IFS= read -r line; do
    printf '%s\n' "$line"; printf '%s %s\n' "$(date +%T.%3N)" "$line" >>"$out/serving-times.log"
  done >"$out/serving.log"
  echo "bench.serving exit ${PIPESTATUS[0]}"
  kill $vm $nicer 2>/dev/null
  if [ -n "$nicer" ]; then
    renice_gpu 0 >/dev/null
    trap - EXIT INT TERM
    [ -s "$out/reniced.txt" ] || echo "ENGINE_NICE: no process held the GPU, nothing was reniced" | tee -a "$out/command.txt"
  fi
  cpu_snapshot >"$out/cpu-after.txt"
  grep -E '^\[c=[0-9]+ [a-z-]+\] [0-9,]+ tok/s|^\[c=[0-9]+ edge-hit h2load\] [0-9]+ requests|all .* failed|Error|error' \
    "$out/serving.log" | cut -c1-260
  logs_to_out 30
  if [ -n "${TRACE_GRAMMAR:-}" ]; then
    sleep "$TRACE_GRAMMAR"  # the engine cores write what they hold every TRACE_GRAMMAR seconds
    PYTHONPATH=$OURS python3 -m bench.engine_timeline $TRACE_DIR --times "$out/serving-times.log" \
      --json "$out/engine-timeline.json" >"$out/engine-timeline.txt" 2>"$out/engine-timeline.err"
    echo "engine timeline: exit $?"; cat "$out/engine-timeline.txt"
  fi
  diag_to_out
  ;;
profile)  # py-spy (carry .pys: its wheel) of PROFILE_SERVICE while each of PROFILE_ARMS runs alone (PROFILE_CONC)
  cd $TREE || exit 1
  for kv in "${EDGE_ENV[@]}"; do export "${kv?}"; done
  # PROFILE_SERVICE: the service profiled (default the generator); PROFILE_EXTRA: more py-spy options (--gil).
  service=${PROFILE_SERVICE:-generator}
  gen=$(sed -n "s/^started $service (pid \([0-9]*\)).*/\1/p" $RUN/stack.log | tail -1)
  [ -n "$gen" ] || { echo "no $service pid in $RUN/stack.log"; exit 1; }
  if ! [ -x /tmp/pys/py-spy ]; then
    mkdir -p /tmp/pys && python3 -m zipfile -e "$(ls "$OLDPWD"/.pys/*.whl | head -1)" /tmp/pys/w \
      && cp /tmp/pys/w/py_spy-*.data/scripts/py-spy /tmp/pys/py-spy && chmod +x /tmp/pys/py-spy
  fi
  diag=/tmp/diag && rm -rf $diag && mkdir -p $diag
  for arm in ${PROFILE_ARMS:-generator-til edge}; do
    # --threads: stacks per thread, so that the event loop's share and the helper threads' stand apart.
    # --subprocesses: with FRONTENDS, $gen is the supervisor and the front-ends are its children.
    /tmp/pys/py-spy record --pid "$gen" --subprocesses --rate "${PROFILE_RATE:-250}" --threads --format raw ${PROFILE_EXTRA:-} \
      --output $diag/py-spy-$service-$arm.txt >$diag/py-spy-$service-$arm.log 2>&1 &
    spy=$!
    PYTHONPATH=$OURS timeout 240 python3 -m bench.serving --arms "$arm" "${ENGINE[@]}" --concurrency "${PROFILE_CONC:-100}" \
      --input-len "$INPUT_LEN" --til-input-len "$INPUT_LEN" --output-len 256 --rounds 2 --min-requests 8 \
      --client-procs "${CLIENT_PROCS:-6}" --generator-addr 127.0.0.1:50052 --edge-addr 127.0.0.1:50051 \
      --label "profile: $arm" --out $diag/$arm >$diag/$arm.log 2>&1
    echo "$arm: exit $?"
    kill -INT $spy; wait $spy
    grep -E '^\[c=[0-9]+ [a-z-]+\] [0-9,]+ tok/s|Error' $diag/$arm.log | cut -c1-260
    tail -2 $diag/py-spy-$service-$arm.log
  done
  diag_to_out
  ;;
hits)  # E alone, before `up`: bench.edge_hit (cacher + fake-engine generator + edge) per HIT_WORKERS value
  # (EDGE_WORKERS) with h2load at c=100, so that `up` can start the edge with the best count for this box.
  [ -x .h2l/h2load ] && export H2LOAD=$PWD/.h2l/h2load
  [ -x "${H2LOAD:-}" ] || { echo "hits needs h2load: carry .h2l (bash bench/h2load_kit.sh) or set H2LOAD"; exit 1; }
  cd $TREE || exit 1
  for w in ${HIT_WORKERS:-8 12 16}; do
    CACHER_REDIS_SERVER_BIN=$TREE/.rds/redis-server PYTHONPATH=$OURS timeout 120 python3 -m bench.edge_hit \
      --mode hit --client h2load --concurrency 100 --requests "${HIT_REQUESTS:-50000}" \
      --edge-env EDGE_WORKERS="$w" --edge-env EDGE_NEAR_CACHE_ENTRIES="${NEAR_CACHE:-1024}" \
      --out "$out/edge-hit-workers.jsonl" >"$out/edge-hit-$w.log" 2>&1
    echo "EDGE_WORKERS=$w: exit $?"; grep -E '^h2load:' "$out/edge-hit-$w.log" | cut -c1-260
    tail -1 "$out/edge-hit-workers.jsonl" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ("total_ms_p50","total_ms_p99","requests_per_s","edge_cpu_ms_per_request","machine")})'
  done
  # The count with the lowest p50 among the runs without failures, for EDGE_WORKERS=best.
  python3 -c 'import json,sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = [r for r in rows if not r.get("failures") and r.get("total_ms_p50") is not None]
best = min(ok, key=lambda r: r["total_ms_p50"])
print(best["edge_env"]["EDGE_WORKERS"])' "$out/edge-hit-workers.jsonl" >$BEST_WORKERS && echo "best: EDGE_WORKERS=$(cat $BEST_WORKERS)"
  ;;
ab)  # A_til alone at c=100 under each way of filling masks, AB="name:workers:batch:fill ..." (before `up`)
  cd $TREE || exit 1
  for kv in "${EDGE_ENV[@]}"; do export "${kv?}"; done
  for v in ${AB:-threads8x16:8:16:threads threads14x4:14:4:threads llguidance14:14:1024:llguidance}; do
    IFS=: read -r name workers batch fill <<<"$v"
    mkdir -p "$out/ab-$name"
    TILSERVE_VLLM_BITMASK_FILL=$fill PYTHONPATH=$OURS timeout "${AB_TIMEOUT:-200}" python3 -m bench.serving \
      --arms "${AB_ARMS:-engine-til}" "${ENGINE[@]}" --bitmask-parallel-threshold 0 --bitmask-parallel-workers "$workers" \
      --bitmask-parallel-batch-size "$batch" --concurrency "${AB_CONC:-100}" --input-len "$INPUT_LEN" \
      --til-input-len "$INPUT_LEN" --output-len 256 --rounds "${ROUNDS:-2}" --min-requests 8 \
      --label "A_til, masks: $v" --out "$out/ab-$name" >"$out/ab-$name/serving.log" 2>&1
    echo "$v: exit $?"
    grep -E '^\[c=[0-9]+ [a-z-]+\] [0-9,]+ tok/s|Error' "$out/ab-$name/serving.log" | cut -c1-260
  done
  ;;
llguidance)  # LLG_WHEEL (a path on the box) installed over the kit's llguidance, for every engine after it
  # (vLLM 0.25.1 asks for < 1.8; the kit has 1.7.6 in /tmp/vkit_stage/x/wheels). `down` and `up` after it.
  # pip's --target --upgrade kept a newer version in place (s23): the old one goes first.
  [ -f "${LLG_WHEEL:-}" ] || { echo "LLG_WHEEL must name a wheel on the box, not '${LLG_WHEEL:-}'"; exit 1; }
  rm -rf $SITE/llguidance $SITE/llguidance-*.dist-info
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE "$LLG_WHEEL" || exit 1
  version=$(PYTHONPATH=$SITE python3 -c 'import llguidance; print(llguidance.__version__)') || exit 1
  echo "llguidance $version" | tee -a "$out/box.txt"
  ;;
down)  # the daemons `up` started, by the process groups it recorded
  for f in $RUN/serve.pid $RUN/stack.pid; do [ -f "$f" ] && kill -TERM -- "-$(cat "$f")"; done
  sleep 20
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac
