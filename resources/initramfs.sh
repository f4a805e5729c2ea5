#!/usr/bin/env bash
# Packs an initramfs (uncompressed newc cpio) with the given init binary as /init.
# Usage: resources/initramfs.sh INIT_BINARY OUT.cpio
set -euo pipefail
init_bin=${1:?usage: initramfs.sh INIT_BINARY OUT.cpio}
out=${2:?usage: initramfs.sh INIT_BINARY OUT.cpio}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,tmp,run}
install -m 0755 "$init_bin" "$stage/init"
# With /dev/console in the archive the kernel gives init a console as stdio. Making the node
# needs root; without it ember-init opens the console itself once devtmpfs is up.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$stage/dev/console" c 5 1
fi
(cd "$stage" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "initramfs: $out ($(du -h "$out" | cut -f1))" >&2
