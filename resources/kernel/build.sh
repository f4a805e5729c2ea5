#!/usr/bin/env bash
# Builds Ember's guest kernel (an uncompressed ELF vmlinux) from Debian's linux-source-6.1
# with the project's config fragment, and caches it by the hash of its inputs: a second build
# with the same config, script and source version is a copy.
#
# Usage: resources/kernel/build.sh OUT_DIR   (writes OUT_DIR/vmlinux and OUT_DIR/bzImage)
# Cache:  ${EMBER_CACHE:-~/.cache/ember}/kernel/<hash>/vmlinux (outside the work tree, so a
#         fresh clone on the same machine reuses it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
fragment="$here/microvm-x86_64.config"
cache=${EMBER_CACHE:-$HOME/.cache/ember}
tarball=/usr/src/linux-source-6.1.tar.xz

log() { echo "kernel: $*" >&2; }

if [ ! -f "$tarball" ]; then
    log "installing linux-source-6.1 and the kernel build tools"
    apt-get install -y -qq --no-install-recommends linux-source-6.1 build-essential bc flex bison \
        libelf-dev libssl-dev xz-utils >/dev/null
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { cat "$fragment" "$0"; echo "$src_version"; } | sha256sum | cut -c1-16)
cached="$cache/kernel/$key"

if [ -f "$cached/vmlinux" ] && [ -f "$cached/bzImage" ]; then
    log "cached build $key (linux-source $src_version)"
else
    src="$cache/kernel/src-$src_version"
    if [ ! -f "$src/Makefile" ]; then
        log "unpacking linux-source $src_version"
        rm -rf "$src.tmp" && mkdir -p "$src.tmp"
        tar -xf "$tarball" -C "$src.tmp" --strip-components=1
        mv "$src.tmp" "$src"
    fi
    build="$cache/kernel/build-$key"
    rm -rf "$build" && mkdir -p "$build"
    log "configuring ($key)"
    make -s -C "$src" O="$build" ARCH=x86_64 KCONFIG_ALLCONFIG="$fragment" allnoconfig >/dev/null
    # Every symbol the fragment turns on must survive dependency resolution.
    missing=0
    while IFS= read -r line; do
        grep -qxF "$line" "$build/.config" || { log "config lost: $line"; missing=1; }
    done < <(grep -E '^CONFIG_[A-Z0-9_]+=(y|[0-9]+)$' "$fragment")
    [ "$missing" = 0 ] || { log "fix $fragment: the symbols above are missing dependencies"; exit 1; }
    log "building vmlinux and bzImage with $(nproc) jobs (a few minutes)"
    start=$(date +%s)
    make -s -C "$src" O="$build" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >"$build/build.log" 2>&1 \
        || { tail -n 30 "$build/build.log" >&2; log "build failed; full log: $build/build.log"; exit 1; }
    log "built in $(( $(date +%s) - start )) s"
    rm -rf "$cached.tmp" && mkdir -p "$cached.tmp"
    cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$build/.config" "$cached.tmp/"
    rm -rf "$cached" && mv "$cached.tmp" "$cached"
    rm -rf "$build"
fi
mkdir -p "$out"
for f in vmlinux bzImage; do
    cp "$cached/$f" "$out/$f.tmp" && mv "$out/$f.tmp" "$out/$f"
    log "$out/$f ($(du -h "$out/$f" | cut -f1))"
done
