#!/usr/bin/env bash
# Generates the Python code for protos/til/v1 into gen/ (or $1). Never edit gen/ by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gen}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/til/v1"
rm -f "$out"/til/v1/*_pb2*.py "$out"/til/v1/*_pb2*.pyi
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/til/v1/*.proto
printf '"""Generated from protos/til/v1 by scripts/gen_protos.sh; do not edit."""\n' > "$out/til/__init__.py"
cp "$out/til/__init__.py" "$out/til/v1/__init__.py"
