#!/usr/bin/env bash
# Prepares the nested test bed (level 1): a Debian cloud kernel with KVM for AMD loaded from
# its initramfs, booted by QEMU with TCG and `-cpu max` (emulated SVM with nested paging).
# Inside it, /dev/kvm behaves like hardware, so Ember and its peers boot stock guests.
#
# Prints the directory holding `vmlinuz` and `initramfs.cpio`; both are cached under
# ${EMBER_CACHE:-~/.cache/ember}/testbed/<hash of inputs>, so a second call costs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${EMBER_CACHE:-$HOME/.cache/ember}/testbed
log() { echo "testbed: $*" >&2; }

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
[ -x /usr/lib/qemu/virtiofsd ] || need_pkgs+=(qemu-system-common)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
if ! file /bin/busybox | grep -q 'statically linked'; then
    log "installing busybox-static (the test bed's init needs a static busybox)"
    apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
fi

# The newest cloud kernel image package the archive offers.
image_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$image_pkg" ]; then
    log "apt does not know linux-image-cloud-amd64; run 'apt-get update' first"
    exit 1
fi
image_ver=$(apt-cache policy "$image_pkg" | awk '/Candidate:/ {print $2}')
key=$( { cat "$0" "$here/init.sh"; echo "$image_pkg $image_ver"; } | sha256sum | cut -c1-16)
dir="$cache/$key"
if [ -f "$dir/vmlinuz" ] && [ -f "$dir/initramfs.cpio" ]; then
    echo "$dir"
    exit 0
fi

log "building level-1 kernel and initramfs from $image_pkg $image_ver"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$image_pkg" 2>/dev/null) \
    || { log "cannot download $image_pkg"; exit 1; }
dpkg-deb -x "$work"/"$image_pkg"_*.deb "$work/pkg"
kver=${image_pkg#linux-image-}
mods="$work/pkg/lib/modules/$kver/kernel"

stage="$work/stage"
mkdir -p "$stage"/{bin,dev,proc,sys,modules,mnt/host,newroot}
cp /bin/busybox "$stage/bin/busybox"
install -m 0755 "$here/init.sh" "$stage/init"
# Load order respects dependencies: KVM, then virtio-pci, then FUSE and virtiofs; TAP and
# veth for network tests.
order=(virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd
       drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
       drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci fs/fuse/fuse fs/fuse/virtiofs
       drivers/net/tun drivers/net/veth)
for m in "${order[@]}"; do
    src="$mods/$m.ko"
    if [ -f "$src.xz" ]; then xz -dc "$src.xz" > "$stage/modules/$(basename "$m").ko"; else cp "$src" "$stage/modules/"; fi
    basename "$m" >> "$stage/modules/order"
done
mknod -m 600 "$stage/dev/console" c 5 1
mkdir -p "$dir.tmp"
cp "$work/pkg/boot/vmlinuz-$kver" "$dir.tmp/vmlinuz"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet) > "$dir.tmp/initramfs.cpio"
rm -rf "$dir" && mv "$dir.tmp" "$dir"
log "ready in $dir"
echo "$dir"
