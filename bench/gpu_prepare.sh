#!/usr/bin/env bash
# Fills the ignored folders that bench/gpu_til.sh and bench/gpu_two.sh carry to a lent GPU machine, from the
# root of the checkout the device tool sends (run it there: `bash bench/gpu_prepare.sh`):
#   .vk   the vLLM kit's install scripts (../shared/device/vllm-kit)      every call
#   .vk1  kit.tar.xz.part00 (58 MB)                                        call 1
#   .vk3  kit.tar.xz.part01 (26 MB)                                        call 2
#   .dm   the 8B-shaped dummy model: config and tokenizer only (3.5 MB)   call 2
#   .whl  wheels the machine lacks (grpcio 1.85.1, pydantic-settings, redis, uvicorn, ...)  call 2
#   .rds  redis-server with the libraries its image lacks (the cacher's embedded Redis)      call 2
# The kit's model archive (SmolLM2 for the smoke test) is not carried: the benchmark needs only the
# dummy model's config and tokenizer, so staging takes two calls instead of three.
set -euo pipefail
KIT=${KIT:-$(cd "$(dirname "$0")/../.." && pwd)/shared/device/vllm-kit}
[ -d "$KIT" ] || KIT=/work/shared/device/vllm-kit
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-common-dir)/info/exclude
mkdir -p "$(dirname "$exclude")"
for d in /.vk/ /.vk1/ /.vk3/ /.dm/ /.whl/ /.rds/; do
  grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done
rm -rf .vk .vk1 .vk3 .dm .whl .rds && mkdir -p .vk .vk1 .vk3 .dm .whl .rds/lib
cp "$KIT"/{CHUNKS.sha256,ARCHIVES.txt,vkit_append.sh,remote_install.sh} .vk/
cp "$KIT"/chunks/kit.tar.xz.part00 .vk1/
cp "$KIT"/chunks/kit.tar.xz.part01 .vk3/
cat "$KIT"/chunks/model.tar.xz.part0* | xz -dc | tar -x -C .dm ./llama3-8b-shape-smollm2-tok-dummy/

platforms=()
for n in 2_17 2_24 2_27 2_28 2_31; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl \
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 pydantic-settings python-dotenv \
  redis tzdata tenacity uvicorn watchfiles model-hosting-container-standards jmespath supervisor \
  prometheus-fastapi-instrumentator

bin=$(readlink -f "$(command -v redis-server)")
cp "$bin" .rds/redis-server.bin
for lib in $(ldd "$bin" | awk '/=> \// {print $3}'); do
  case $(basename "$lib") in libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libssl.so.*|libcrypto.so.*) ;;
    *) cp -L "$lib" .rds/lib/ ;;
  esac
done
cat >.rds/redis-server <<'EOF'
#!/bin/bash
# redis-server carried to the GPU machine, with the libraries its image lacks.
here=$(dirname "$0")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec -a redis-server "$here/redis-server.bin" "$@"
EOF
chmod +x .rds/redis-server
du -sh .vk .vk1 .vk3 .dm .whl .rds
