#!/usr/bin/env bash
# Opt-in: a Debian bookworm (minbase) root filesystem with python3 and git, the image an
# AI-agent sandbox would use, with ember-init as /sbin/init. Built with debootstrap into a
# directory and packed with `mkfs.ext4 -d` (no loop mounts). Needs root.
# Usage: resources/rootfs-debian.sh INIT_BINARY OUT.ext4
# The mirror is debootstrap's default unless EMBER_DEBIAN_MIRROR names another.
set -euo pipefail
init_bin=${1:?usage: rootfs-debian.sh INIT_BINARY OUT.ext4}
out=${2:?usage: rootfs-debian.sh INIT_BINARY OUT.ext4}
log() { echo "rootfs-debian: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap >/dev/null

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
start=$(date +%s)
log "debootstrap bookworm (minbase + python3, git) into $stage"
# shellcheck disable=SC2086 # the mirror is optional
debootstrap --variant=minbase --include=python3,git,ca-certificates,procps,iproute2 \
    bookworm "$stage" ${EMBER_DEBIAN_MIRROR:-} >"$stage.log" 2>&1 \
    || { tail -20 "$stage.log" >&2; log "debootstrap failed; full log: $stage.log"; exit 1; }
rm -f "$stage.log"
# Keep the image small: no package caches or lists (apt-get update restores them).
rm -rf "$stage"/var/cache/apt/archives/*.deb "$stage"/var/lib/apt/lists/*
install -m 0755 "$init_bin" "$stage/sbin/init"
echo "ember" > "$stage/etc/hostname"
# Size: contents plus a quarter for the guest to write in, at least 256 MiB.
used_mib=$(du -sm "$stage" | cut -f1)
size_mib=$(( used_mib + used_mib / 4 + 64 ))
[ "$size_mib" -ge 256 ] || size_mib=256
rm -f "$out.tmp"
mkfs.ext4 -q -F -L ember-debian -E root_owner=0:0 -d "$stage" "$out.tmp" "${size_mib}M" >/dev/null
mv "$out.tmp" "$out"
log "$out: ${size_mib} MiB image, ${used_mib} MiB of files, built in $(( $(date +%s) - start )) s"
