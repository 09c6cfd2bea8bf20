#!/usr/bin/env bash
# h2load for a machine without it and without the internet (the lent GPU machines): run here, on a
# Debian/Ubuntu box with apt, then carry `.h2l` (git-ignored) and set H2LOAD=$PWD/.h2l/h2load there.
#
#   bash bench/h2load_kit.sh            # writes .h2l/h2load, .h2l/root, .h2l/debs
#
# Downloads nghttp2-client and the libraries h2load links that a slim image may lack (apt-get download),
# unpacks them with dpkg -x into .h2l/root, keeps only h2load and those libraries, and writes
# .h2l/h2load: a wrapper that puts the unpacked libraries on LD_LIBRARY_PATH and runs the binary. Then
# it checks the wrapper under `env -i` (nothing on the library path but the system's own).
#
# h2load 1.52 (Debian 12) links libnghttp2.so.14, libev.so.4, libjemalloc.so.2, libssl.so.3 and
# libcrypto.so.3 (libssl3), libstdc++ and libgcc_s (`ldd`); the nghttp/nghttpx tools of the same
# package need more (jansson, libxml2, c-ares, ...), which are not kept. libstdc++6 and libgcc-s1 are
# left to the target (every Debian/Ubuntu image has them: apt needs them): Debian 12's libstdc++ needs
# glibc 2.36 and would break the binary on Ubuntu 22.04. The binary needs glibc >= 2.34 and
# GLIBCXX_3.4.30 (gcc 12's libstdc++): Debian 12, Ubuntu 22.04 or later.
set -euo pipefail

cd "$(dirname "$0")/.."
KIT=.h2l
PACKAGES=(nghttp2-client libnghttp2-14 libev4 libjemalloc2 libssl3)

rm -rf "$KIT"
mkdir -p "$KIT/debs" "$KIT/root"
(cd "$KIT/debs" && apt-get download "${PACKAGES[@]}")
for deb in "$KIT"/debs/*.deb; do
  dpkg -x "$deb" "$KIT/root"
done

# Only h2load and the shared libraries: no docs, man pages, other tools or OpenSSL's engines.
find "$KIT/root" -mindepth 1 -maxdepth 1 ! -name usr ! -name lib -exec rm -rf {} +
rm -rf "$KIT/root/usr/share" "$KIT/root/usr/sbin"
find "$KIT/root/usr/bin" -type f ! -name h2load -delete
find "$KIT/root" -type d \( -name engines-3 -o -name ossl-modules \) -prune -exec rm -rf {} +
rm -rf "$KIT/debs"
# Links as plain files: a copy tool that skips links (or a carry that drops them) keeps a working kit.
find "$KIT/root" -type l | while read -r link; do
  target=$(readlink -f "$link")
  if [ -f "$target" ]; then cp --remove-destination "$target" "$link"; else rm -f "$link"; fi
done

libdirs=$(find "$KIT/root" -name '*.so*' -printf '%h\n' | sort -u | sed "s|^$KIT/root/||")
{
  echo '#!/bin/sh'
  echo '# h2load with the libraries unpacked beside it (bench/h2load_kit.sh).'
  echo 'here=$(cd "$(dirname "$0")" && pwd)'
  printf 'LD_LIBRARY_PATH='
  for d in $libdirs; do printf '$here/root/%s:' "$d"; done
  echo '${LD_LIBRARY_PATH:-}'
  echo 'export LD_LIBRARY_PATH'
  echo 'exec "$here/root/usr/bin/h2load" "$@"'
} > "$KIT/h2load"
chmod +x "$KIT/h2load"

# The check, under an empty environment: every library the binary links resolves (the kit's first),
# and the wrapper runs it.
kitpath=$(for d in $libdirs; do printf '%s:' "$PWD/$KIT/root/$d"; done)
links=$(env -i LD_LIBRARY_PATH="$kitpath" ldd "$KIT/root/usr/bin/h2load")
if grep -q 'not found' <<<"$links"; then
  echo "h2load_kit: libraries not found:" >&2
  grep 'not found' <<<"$links" >&2
  exit 1
fi
version=$(env -i "$PWD/$KIT/h2load" --version)
echo "$version in $KIT ($(du -sh "$KIT" | cut -f1)); libraries from the kit:"
grep -F "$PWD/$KIT/" <<<"$links" | sed 's/^\s*/  /'
echo "use: H2LOAD=\$PWD/$KIT/h2load"
