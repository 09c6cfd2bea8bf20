#!/usr/bin/env bash
# `make image`: build the tilserve cpu image from deploy/docker/Dockerfile with buildah, no daemon.
#
#   IMAGE           the tag to build (tilserve-cpu:dev, what overlays/dev runs)
#   TARGET          Dockerfile target (cpu; gpu needs vLLM's registry image, see deploy/k8s/README.md)
#   PYTHON_IMAGE    the base; unset: python:3.11-slim-bookworm if a registry serves it, otherwise a Debian
#                   bookworm base debootstrapped here (localhost/tilserve-base:bookworm, built once)
#   TORCH_INDEX_URL where torch's CPU build comes from (default: PyTorch's CPU index); empty: only the
#                   indexes and find-links of this machine's pip configuration
#   STORAGE_DRIVER  containers/storage driver: overlay where the kernel has it, else vfs (works everywhere,
#                   copies every layer); `make image-smoke` runs from the same storage
#   BUILDAH_ISOLATION  chroot: works without user namespaces, cgroups or a container runtime
#   ARCHIVE         also write the image to this docker-archive tarball, named IMAGE without `localhost/`
#                   (for `kind load image-archive`, `minikube image load`, `k3d image import`)
#
# pip inside the build sees what pip on this machine sees: the effective `pip config list` is written to a
# temporary pip.conf and mounted read-only over /etc/pip.conf in each RUN step, together with the local
# folders it names (find-links, file:// indexes, constraints) and the CA bundle. Mounts are not part of
# the image: nothing of this machine's configuration or certificates is baked in.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-tilserve-cpu:dev}"
TARGET="${TARGET:-cpu}"
BASE_LOCAL="${BASE_LOCAL:-localhost/tilserve-base:bookworm}"
REGISTRY_BASE="${REGISTRY_BASE:-docker.io/library/python:3.11-slim-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
default_driver=vfs
grep -qw overlay /proc/filesystems 2>/dev/null && default_driver=overlay
STORAGE_DRIVER="${STORAGE_DRIVER:-$default_driver}"
BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

say() { printf '\033[1m[image]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
now() { date +%s; }

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Rootless buildah would need subuids and fuse-overlayfs; run as root (sudo) when not root already.
bh() { as_root buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

build_debian_base() {
  # python:3.11-slim's shape from Debian packages: Python 3.11 with pip in a venv that is first on PATH.
  say "no registry serves $REGISTRY_BASE: building $BASE_LOCAL with debootstrap ($DEBIAN_MIRROR)"
  local ctr mnt
  ctr=$(bh from scratch)
  mnt=$(bh mount "$ctr")
  as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$mnt" "$DEBIAN_MIRROR" >&2
  bh run --isolation "$BUILDAH_ISOLATION" "$ctr" -- sh -c 'python3 -m venv /opt/python && /opt/python/bin/python -m pip --version \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /root/.cache'
  bh config --env PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 --label org.opencontainers.image.description="Debian bookworm + python3.11 (debootstrap)" "$ctr"
  bh unmount "$ctr" >/dev/null
  bh commit --rm "$ctr" "$BASE_LOCAL" >/dev/null
}

start=$(now)
if [ -z "${PYTHON_IMAGE:-}" ]; then
  if bh inspect --type image "$REGISTRY_BASE" >/dev/null 2>&1 \
     || timeout 120 bh pull --quiet "$REGISTRY_BASE" >/dev/null 2>&1; then
    PYTHON_IMAGE="$REGISTRY_BASE"
  else
    bh inspect --type image "$BASE_LOCAL" >/dev/null 2>&1 || build_debian_base
    PYTHON_IMAGE="$BASE_LOCAL"
  fi
fi
base_done=$(now)
say "base: $PYTHON_IMAGE ($((base_done - start)) s)"

# This machine's pip configuration, as one file, plus the local paths it names.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mounts=(--volume "$CA_BUNDLE:$CA_BUNDLE:ro")
python3 - "$tmp/pip.conf" "$tmp/paths" <<'PY'
import configparser, os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = configparser.ConfigParser(interpolation=None)
conf["global"] = {}
paths = set()
for line in out.splitlines():
    m = re.match(r"^(?::env:|global|install|download|wheel)\.([\w-]+)='(.*)'$", line)
    if not m:
        continue
    key, value = m.groups()
    conf["global"][key] = value
    for word in value.split():
        path = word.removeprefix("file://").rstrip("/")
        if word.startswith("file://") and os.path.basename(path) == "simple":
            path = os.path.dirname(path)  # a local PEP 503 index links to files beside simple/
        if path.startswith("/") and os.path.exists(path):
            paths.add(path)
with open(sys.argv[1], "w") as f:
    conf.write(f)
with open(sys.argv[2], "w") as f:
    f.writelines(f"{p}\n" for p in sorted(paths))
PY
mounts+=(--volume "$tmp/pip.conf:/etc/pip.conf:ro")
while IFS= read -r p; do
  [ -n "$p" ] && [ "$p" != "$CA_BUNDLE" ] && mounts+=(--volume "$p:$p:ro")
done < "$tmp/paths"
say "pip inside the build: $(grep -v '^\[' "$tmp/pip.conf" | tr -s '\n' ' ')"
say "mounted read-only: $(tr '\n' ' ' < "$tmp/paths")"

if [ -z "${TORCH_INDEX_URL+x}" ] && ! python3 -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=10)' 2>/dev/null; then
  say "PyTorch's CPU index is unreachable: torch's CPU build must come from the pip configuration above"
  TORCH_INDEX_URL=
fi
args=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
[ -n "${TORCH_INDEX_URL+x}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
[ -n "${PACKAGED_MODELS+x}" ] && args+=(--build-arg "PACKAGED_MODELS=$PACKAGED_MODELS")
previous=$(bh images --quiet --no-trunc "$IMAGE" 2>/dev/null | head -1 || true)
say "buildah build --target $TARGET -t $IMAGE (storage $STORAGE_DRIVER, isolation $BUILDAH_ISOLATION)"
bh build --isolation "$BUILDAH_ISOLATION" --layers=false --target "$TARGET" -t "$IMAGE" -f deploy/docker/Dockerfile \
  --ignorefile deploy/docker/Dockerfile.dockerignore "${mounts[@]}" "${args[@]}" ${BUILD_FLAGS:-} .
# buildah 1.28 leaves an empty file or folder in the image where each --volume was mounted (/etc/pip.conf,
# /opt/wheels, ...): remove those that are empty placeholders, in one more layer, so no path of this machine
# shows in the image. The CA bundle's path is Debian's own file and stays.
targets=(/etc/pip.conf)
while IFS= read -r p; do [ -n "$p" ] && [ "$p" != "$CA_BUNDLE" ] && targets+=("$p"); done < "$tmp/paths"
ctr=$(bh from --pull-never "$IMAGE")
bh run --isolation "$BUILDAH_ISOLATION" --user 0:0 "$ctr" -- sh -c '
  for p in "$@"; do
    if [ -f "$p" ] && [ ! -s "$p" ]; then rm -f "$p"; p=$(dirname "$p"); fi
    [ -d "$p" ] && rmdir -p --ignore-fail-on-non-empty "$p"
  done; true' sh "${targets[@]}"
built=$(bh images --quiet --no-trunc "$IMAGE" | head -1)
bh commit --rm --quiet "$ctr" "$IMAGE" >/dev/null
# The build before placeholders were removed, and the image this one replaces, are no longer named: drop them.
for old in "$built" "$previous"; do [ -n "$old" ] && bh rmi "$old" >/dev/null 2>&1 || true; done
done_=$(now)
size=$(bh images --format '{{.Size}}' "$IMAGE" | head -1)
mkdir -p .run
python3 -c 'import json, sys; print(json.dumps(dict(zip(
  ["image", "base", "base_s", "image_s", "total_s"], [*sys.argv[1:3], *map(int, sys.argv[3:6])]), mounted=sys.argv[6:])))' \
  "$IMAGE" "$PYTHON_IMAGE" $((base_done - start)) $((done_ - base_done)) $((done_ - start)) "${targets[@]}" \
  > .run/image-build.json
if [ -n "${ARCHIVE:-}" ]; then
  rm -f "$ARCHIVE"
  bh push --quiet "$IMAGE" "docker-archive:$ARCHIVE:${IMAGE#localhost/}"
  say "wrote $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
fi
say "built $IMAGE ($size) from $PYTHON_IMAGE: base $((base_done - start)) s, image $((done_ - base_done)) s, total $((done_ - start)) s"
