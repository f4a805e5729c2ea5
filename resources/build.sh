#!/usr/bin/env bash
# Builds everything a guest needs, at stable paths that tests, benchmarks and users rely on:
#   resources/out/vmlinux         guest kernel (ELF), cached by its config's hash
#   resources/out/bzImage         the same kernel as a bzImage
#   resources/out/ember-init      static PID 1
#   resources/out/ember-iobench   static guest-side disk benchmark (in the rootfs)
#   resources/out/initramfs.cpio  uncompressed cpio with ember-init as /init
#   resources/out/rootfs.ext4     ext4 root: ember-init as /sbin/init, static busybox
# Usage: resources/build.sh [--kernel-only]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/resources/out"
mkdir -p "$out"

"$root/resources/kernel/build.sh" "$out"
[ "${1:-}" = "--kernel-only" ] && exit 0

echo "initramfs: building ember-init and ember-iobench (static)" >&2
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p guest-init \
    --target x86_64-unknown-linux-gnu --manifest-path "$root/Cargo.toml"
for bin in ember-init ember-iobench; do
    path="$root/target/x86_64-unknown-linux-gnu/release/$bin"
    if readelf -d "$path" | grep -q NEEDED; then
        echo "initramfs: $path is dynamically linked; it must be static" >&2
        exit 1
    fi
    cp "$path" "$out/$bin.tmp" && mv "$out/$bin.tmp" "$out/$bin"
done

"$root/resources/initramfs.sh" "$out/ember-init" "$out/initramfs.cpio"
"$root/resources/rootfs.sh" "$out/ember-init" "$out/rootfs.ext4"
