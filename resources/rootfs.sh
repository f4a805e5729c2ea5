#!/usr/bin/env bash
# Builds the small default root filesystem: an ext4 image (made with `mkfs.ext4 -d`, no loop
# mounts) holding ember-init as /sbin/init and a static busybox for a shell and tools.
# Usage: resources/rootfs.sh INIT_BINARY OUT.ext4 [SIZE, default 64M]
set -euo pipefail
init_bin=${1:?usage: rootfs.sh INIT_BINARY OUT.ext4 [SIZE]}
out=${2:?usage: rootfs.sh INIT_BINARY OUT.ext4 [SIZE]}
size=${3:-64M}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,etc,var/tmp}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
install -m 0755 /bin/busybox "$stage/bin/busybox"
# One link per applet at its usual place (bin/sh, usr/bin/md5sum, ...), except init.
while read -r applet; do
    case "$applet" in sbin/init|linuxrc|"") continue ;; esac
    [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done < <(/bin/busybox --list-full)
install -m 0755 "$init_bin" "$stage/sbin/init"
# The guest side of `ember-bench devices`, when built next to ember-init.
iobench="$(dirname "$init_bin")/ember-iobench"
[ -x "$iobench" ] && install -m 0755 "$iobench" "$stage/usr/bin/ember-iobench"
echo "ember" > "$stage/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\n' > "$stage/etc/group"

rm -f "$out.tmp"
mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$stage" "$out.tmp" "$size" >/dev/null
mv "$out.tmp" "$out"
echo "rootfs: $out ($size, $(du -h "$out" | cut -f1) used)" >&2
