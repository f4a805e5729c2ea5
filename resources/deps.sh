#!/usr/bin/env bash
# Installs the Debian packages Ember's build, tests and benchmarks need. Idempotent: when
# everything is there it only checks, and it refreshes the package lists only if needed.
set -euo pipefail

pkgs=(
    build-essential bc flex bison libelf-dev libssl-dev xz-utils  # kernel build
    linux-source-6.1                                               # guest kernel source
    cpio                                                           # initramfs
    libseccomp-dev                                                 # seccompiler
    e2fsprogs                                                      # rootfs (mkfs.ext4 -d), debugfs in tests
    qemu-system-x86 qemu-system-common busybox-static file         # test bed and peer VMM
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The test bed downloads the cloud kernel package, which needs current package lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "deps: need root to install: ${missing[*]:-package lists}" >&2
        exit 1
    fi
    echo "deps: refreshing package lists" >&2
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "deps: cargo not found; install Rust (stable) first" >&2; exit 1; }
