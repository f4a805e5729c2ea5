#!/usr/bin/env bash
# Builds everything a guest needs, at stable paths that tests, benchmarks and users rely on:
#   resources/out/vmlinux         guest kernel (ELF), cached by its config's hash
#   resources/out/bzImage         the same kernel as a bzImage
#   resources/out/ember-init      static PID 1
#   resources/out/initramfs.cpio  uncompressed cpio with ember-init as /init
#   resources/out/rootfs.ext4     ext4 root: ember-init as /sbin/init, static busybox
# Usage: resources/build.sh [--kernel-only]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/resources/out"
mkdir -p "$out"

"$root/resources/kernel/build.sh" "$out"
[ "${1:-}" = "--kernel-only" ] && exit 0

echo "initramfs: building ember-init (static)" >&2
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p guest-init \
    --target x86_64-unknown-linux-gnu --manifest-path "$root/Cargo.toml"
init_bin="$root/target/x86_64-unknown-linux-gnu/release/ember-init"
if readelf -d "$init_bin" | grep -q NEEDED; then
    echo "initramfs: $init_bin is dynamically linked; it must be static" >&2
    exit 1
fi
cp "$init_bin" "$out/ember-init.tmp" && mv "$out/ember-init.tmp" "$out/ember-init"

"$root/resources/initramfs.sh" "$out/ember-init" "$out/initramfs.cpio"
"$root/resources/rootfs.sh" "$out/ember-init" "$out/rootfs.ext4"
