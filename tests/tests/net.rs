//! virtio-net with a real guest: a TAP in a network namespace made by the test, the guest
//! configured by `ip=`, the guest pings the host, and TCP transfers both ways have their
//! checksums compared. The VM is configured the way a user of the API socket would, with
//! curl: one `PUT` per section (network-interfaces among them), then InstanceStart.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::time::Duration;

use testbed::{shell_quote, Artifacts, GuestSpec, Job};

const GUEST_TO_HOST: u64 = 100 << 20;
const HOST_TO_GUEST: u64 = 16 << 20;

#[test]
fn ping_and_tcp_transfers_cross_the_tap_intact() {
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let script = format!(
        r#"set -e
ns=ember-net-$$
ip netns add $ns
trap 'ip netns del $ns' EXIT
head -c {HOST_TO_GUEST} /dev/urandom > outbound.bin
md5sum outbound.bin > outbound.md5
ip netns exec $ns bash -c '
set -e
ip link set lo up
ip tuntap add dev tap0 mode tap
ip addr add 172.16.0.1/24 dev tap0
ip link set tap0 up
python3 {peer} 172.16.0.1 {GUEST_TO_HOST} outbound.bin > server.out 2> server.err &
peer=$!
while [ ! -e server.ready ]; do sleep 0.1; done
{ember} --api-sock api.sock > vm.out 2> vm.err < /dev/null &
vmm=$!
api() {{ curl -sSf --unix-socket api.sock -H "Content-Type: application/json" "$@"; }}
until api http://localhost/ > /dev/null 2>&1; do
    kill -0 $vmm || {{ echo "ember ended before serving its API socket" >&2; exit 1; }}
    sleep 0.1
done
for put in boot-source machine-config drives/rootfs network-interfaces/eth0 actions; do
    api -X PUT "http://localhost/$put" --data @"api-${{put//\//-}}.json" \
        || {{ echo "PUT /$put was refused" >&2; kill $vmm; exit 1; }}
done
wait $vmm
# The peer is done once the guest is; if the VM died early it would wait for its own
# timeout, so it gets a few seconds and is then stopped.
for i in $(seq 50); do kill -0 $peer 2>/dev/null || break; sleep 0.2; done
kill $peer 2>/dev/null || true
'
"#,
        ember = shell_quote(&art.ember),
        peer = shell_quote(&testbed::repo_root().join("tests/testbed/tcp_peer.py")),
    );
    let job = Job::new("net", script).timeout(Duration::from_secs(480));
    let root = art
        .private_rootfs(job.dir())
        .unwrap_or_else(|e| panic!("{e}"));
    let guest_script = format!(
        "set -e; ping -c 3 -W 5 172.16.0.1; head -c {GUEST_TO_HOST} /dev/urandom > /tmp/f; \
         md5sum /tmp/f; nc 172.16.0.1 5000 < /tmp/f; nc 172.16.0.1 5001 > /tmp/g; md5sum /tmp/g; \
         ls -l /tmp/g"
    );
    let mut guest = GuestSpec::with_root_running(&art, &root, &guest_script);
    guest.mem_mib = 512;
    guest.boot_args = format!(
        "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off {}",
        guest.boot_args
    );
    guest.nets.push(serde_json::json!(
        {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}
    ));
    // One body per API request, named after its path (`/` becomes `-`).
    let config: serde_json::Value = serde_json::from_str(&guest.config_json()).unwrap();
    let bodies = [
        ("boot-source", config["boot-source"].clone()),
        ("machine-config", config["machine-config"].clone()),
        ("drives-rootfs", config["drives"][0].clone()),
        (
            "network-interfaces-eth0",
            config["network-interfaces"][0].clone(),
        ),
        (
            "actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
    ];
    for (name, body) in bodies {
        job.write_file(&format!("api-{name}.json"), &body.to_string());
    }

    let out = job.run().unwrap_or_else(|e| panic!("{e}"));
    let read = |name: &str| fs::read_to_string(job.dir().join(name)).unwrap_or_default();
    let console = read("vm.out");
    let context = format!(
        "{out}\n--- guest\n{console}\n--- ember stderr\n{}\n--- server\n{}{}",
        read("vm.err"),
        read("server.out"),
        read("server.err")
    );
    assert_eq!(out.status, 0, "{context}");
    assert!(
        console.contains("ember-init: run exited with status 0"),
        "{context}"
    );
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "{context}"
    );

    let guest_sums: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("/tmp/f") || l.contains("/tmp/g"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|h| h.len() == 32)
        .collect();
    assert_eq!(guest_sums.len(), 2, "{context}");
    let server = read("server.out");
    let received: Vec<&str> = server.split_whitespace().collect();
    assert_eq!(received.first(), Some(&"received"), "{context}");
    assert_eq!(
        received[1],
        GUEST_TO_HOST.to_string(),
        "bytes the host received"
    );
    assert_eq!(received[2], guest_sums[0], "guest -> host checksum");
    let sent = read("outbound.md5");
    assert_eq!(
        sent.split_whitespace().next(),
        Some(guest_sums[1]),
        "host -> guest checksum"
    );
    assert!(
        console.contains(&format!(" {HOST_TO_GUEST} ")),
        "guest received every byte: {context}"
    );
}
