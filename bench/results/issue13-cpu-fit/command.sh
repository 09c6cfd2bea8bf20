#!/bin/bash
# usage: fitbench.sh CHECKOUT OUT
cd "$1"
export PYTHONPATH=$PWD:$PWD/gen
E="EDGE_ALLOW_IGNORE_EOS=true EDGE_RETRIEVAL_TOP_K=0 EDGE_QUESTION_HISTORY_K=0 EDGE_INDEX_TILS=false EDGE_MAX_ACTIVE=512 EDGE_METRICS_PORT=9100"
export $E
envs=""; for kv in $E EDGE_WORKERS=1 GENERATOR_BACKEND=fake GENERATOR_FAKE_TOKEN_INTERVAL_S=0.001 GENERATOR_MAX_MODEL_LEN=4096; do envs="$envs --env $kv"; done
/work/main/.venv/bin/python -m bench.gpu_stack --data /tmp/fitstack-$(basename $2) $envs --run "/work/main/.venv/bin/python -m bench.serving --arms generator-til,edge \
  --model /work/main/.dm/llama3-8b-shape-smollm2-tok-dummy --concurrency 1 --til-input-len 512 --input-len 512 --output-len 256 \
  --rounds 1 --min-requests 150 --client-procs 1 --out $2"
