#!/usr/bin/env bash
# Ember's main job (`make run`): boots a VM (2 vCPUs, 256 MiB, ext4 root, vsock), waits for
# ember-init's agent to announce itself, runs a command inside through the agent, prints its
# output and the boot figures, then shuts the guest down. Runs from the repository root,
# where KVM can boot stock guests (`make run` puts it in the nested test bed if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/demo
mkdir -p "$work"
cp --sparse=always resources/out/rootfs.ext4 "$work/root.ext4"
rm -f "$work"/v.sock*
cat > "$work/vm.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "resources/out/vmlinux",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd quiet"
  },
  "drives": [{"drive_id": "rootfs", "path_on_host": "$work/root.ext4", "is_root_device": true, "is_read_only": false}],
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
  "vsock": {"guest_cid": 3, "uds_path": "$work/v.sock"}
}
EOF
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
start=$(now_ms)
target/release/ember --no-api --config-file "$work/vm.json" --boot-timer \
    > "$work/console.log" 2> "$work/ember.err" &
ember=$!
trap 'kill $ember 2>/dev/null || true' EXIT
uptime_ms=$(target/release/emberctl wait-ready --vsock "$work/v.sock" --timeout 600) || {
    echo "the agent did not become ready; console and ember's messages follow" >&2
    cat "$work/console.log" "$work/ember.err" >&2
    exit 1
}
ready=$(( $(now_ms) - start ))
grep "ember-init: ready" "$work/console.log" || true
echo "agent ready ${ready} ms after ember started (guest uptime ${uptime_ms} ms)"
echo "--- emberctl exec: a command inside the guest"
target/release/emberctl exec --vsock "$work/v.sock" -- \
    sh -c 'echo "hello from $(hostname): $(uname -sr), $(nproc) vCPUs, $(free -m | awk "/Mem:/ {print \$2}") MiB"'
target/release/emberctl shutdown --vsock "$work/v.sock"
wait $ember
trap - EXIT
grep "guest boot time" "$work/ember.err" || true
