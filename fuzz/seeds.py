#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/seed-*: small, well-formed inputs that get each
target past its framing on the first run. Rerun after changing a target's input layout."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# agent_frame: chunk size byte, then frames (len u32, kind, version 1, reserved 0).
def frame(kind, payload):
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return struct.pack("<IBBH", len(payload), kind, 1, 0) + payload


put("agent_frame", "ping", b"\xff" + frame(1, {"op": "ping"}))
put("agent_frame", "exec", b"\x07" + frame(1, {"op": "exec", "argv": ["sh", "-c", "id"],
    "env": {"A": "b"}, "cwd": "/", "stdin": True, "timeout_ms": 5, "tty": False})
    + frame(4, b"input") + frame(4, b"") + frame(7, {"signal": 15}))
put("agent_frame", "write_file", b"\x40" + frame(1, {"op": "write_file", "path": "/x",
    "mode": 0o600, "mkdirs": True}) + frame(8, b"data") + frame(8, b""))
put("agent_frame", "responses", b"\xff" + frame(2, {"started": {"pid": 7}})
    + frame(5, b"out") + frame(6, b"err") + frame(2, {"exit": {"signal": 9, "timed_out": True}})
    + frame(3, {"code": "not_found", "message": "no such file"})
    + frame(9, {"protocol": 1, "version": "0.1.0", "boot_ms": 12}))
put("agent_frame", "bad_version", b"\x08" + struct.pack("<IBBH", 2, 1, 2, 0) + b"{}")


# api_request: mode byte (bit 7: responses; low bits: read chunk / 64), then the stream.
def http(method, path, body=None, extra=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is not None:
        body = json.dumps(body)
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head + "\r\n" + (body or "")


put("api_request", "boot_sequence", b"\x7f" + (
    http("PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "console=ttyS0"})
    + http("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    + http("PATCH", "/machine-config", {"vcpu_count": 1})
    + http("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/r.ext4",
        "is_root_device": True, "is_read_only": False})
    + http("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
        "guest_mac": "06:00:00:00:00:01"})
    + http("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    + http("PUT", "/actions", {"action_type": "InstanceStart"})).encode())
put("api_request", "runtime", b"\x01" + (
    http("GET", "/") + http("GET", "/vm/config") + http("PATCH", "/vm", {"state": "Paused"})
    + http("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/n"})
    + http("PUT", "/logger", {"log_path": "/tmp/l", "level": "Info"})
    + http("PUT", "/metrics", {"metrics_path": "/tmp/m"})
    + http("GET", "/version", extra="Connection: close\r\n")).encode())
put("api_request", "garbage", b"\x02GET /nope HTTP/1.0\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc")
put("api_request", "responses", b"\x81" + (
    "HTTP/1.1 204 No Content\r\n\r\n"
    'HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{"fault_message": "bad"}').encode())

# config_file
config = {
    "boot-source": {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd",
                    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False},
    "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True,
                "is_read_only": True}],
    "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                            "guest_mac": "06:00:ac:10:00:02"}],
    "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
    "logger": {"log_path": "/tmp/ember.log", "level": "Debug"},
    "metrics": {"metrics_path": "/tmp/ember.metrics"},
}
put("config_file", "full", json.dumps(config, indent=1))
put("config_file", "minimal", json.dumps({"boot-source": {"kernel_image_path": "/k"}}))
put("config_file", "unsupported", json.dumps({"boot-source": {"kernel_image_path": "/k"},
    "balloon": {"amount_mib": 1}}))

# snapshot_state: selector (0 raw file, 1 device states, 2 VM, 3 vCPUs), then bytes.
put("snapshot_state", "raw_header", b"\x00EMBERSNP" + struct.pack("<IQQ", 1, 4096, 0) + bytes(8))
put("snapshot_state", "devices_empty", b"\x01" + bytes(16))
put("snapshot_state", "vm_empty", b"\x02" + bytes(32))
put("snapshot_state", "vcpus_none", b"\x03\x00")

# Queue targets: layouts (size exponent, desc, avail, used as u16), then guest memory.
F_NEXT, F_WRITE = 1, 2


def layout(exp, desc, avail, used):
    return struct.pack("<BHHH", exp, desc, avail, used)


def memory(writes, size):
    mem = bytearray(size)
    for addr, data in writes:
        mem[addr:addr + len(data)] = data
    return bytes(mem)


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def avail(heads):
    return struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)


def block_memory(kind, sector):
    return memory([
        (0x000, desc(0x300, 16, F_NEXT, 1) + desc(0x400, 512, F_NEXT | (F_WRITE if kind == 0 else 0), 2)
         + desc(0x600, 1, F_WRITE, 0)),
        (0x100, avail([0])),
        (0x300, struct.pack("<IIQ", kind, 0, sector)),
        (0x400, b"\x11" * 512),
    ], 0x608)


for name, kind, sector in [("read", 0, 1), ("write", 1, 7), ("flush", 4, 0), ("past_end", 0, 8)]:
    put("block_queue", name, b"\x02" + layout(4, 0, 0x100, 0x200) + block_memory(kind, sector))
put("block_queue", "get_id_ro", b"\x01" + layout(4, 0, 0x100, 0x200) + block_memory(8, 0))

eth = b"\x00" * 12 + b"\x06\x00\x00\x00\x00\x01" * 2 + b"\x08\x00" + b"\x45" * 46
net_mem = memory([
    (0x000, desc(0x1000, 2048, F_WRITE, 0)),
    (0x100, avail([0])),
    (0x400, desc(0x800, 12, F_NEXT, 1) + desc(0x80c, 60, 0, 0)),
    (0x500, avail([0])),
    (0x800, eth),
], 0x900)
put("net_frame", "rx_tx", layout(4, 0, 0x100, 0x200) + layout(4, 0x400, 0x500, 0x600)
    + b"\x02" + struct.pack("<H", len(eth)) + eth + struct.pack("<H", 8) + b"short!!!" + net_mem)


def vsock_hdr(op, src_port, dst_port, length=0, buf_alloc=65536, fwd=0, flags=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags,
                       buf_alloc, fwd)


vs_mem = memory([
    (0x000, desc(0x2000, 4096, F_WRITE, 0) + desc(0x3000, 4096, F_WRITE, 0)),  # rx
    (0x100, avail([0, 1])),
    (0x400, desc(0x800, 44, 0, 0) + desc(0x840, 44, F_NEXT, 2) + desc(0x880, 5, 0, 0)
     + desc(0x8c0, 44, 0, 0)),  # tx
    (0x500, avail([0, 1, 3])),
    (0x600, desc(0x1000, 8, F_WRITE, 0)),  # event
    (0x700, avail([0])),
    (0x800, vsock_hdr(1, 5000, 1024)),
    (0x840, vsock_hdr(5, 5000, 1024, 5)),
    (0x880, b"hello"),
    (0x8c0, vsock_hdr(4, 5000, 1024, flags=3)),
], 0x900)
put("vsock_packet", "connect_send_shutdown",
    layout(4, 0, 0x100, 0x200) + layout(4, 0x400, 0x500, 0x300) + layout(2, 0x600, 0x700, 0x780)
    + vs_mem)


# mmio_registers: device (0 block, 1 net), access count, accesses, then memory.
def w(off, val, kick=False):
    return struct.pack("<BHI", 1 | (2 << 1) | (8 if kick else 0), off, val)


def r(off):
    return struct.pack("<BHI", 2 << 1, off, 0)


def bring_up(queues):
    ops = [r(0x00), r(0x04), r(0x08), w(0x70, 1), w(0x70, 3), w(0x14, 1), r(0x10),
           w(0x24, 1), w(0x20, 1), w(0x70, 11), r(0x70)]
    for q, (d, a, u) in enumerate(queues):
        ops += [w(0x30, q), r(0x34), w(0x38, 16), w(0x80, d), w(0x84, 0), w(0x90, a),
                w(0x94, 0), w(0xa0, u), w(0xa4, 0), w(0x44, 1)]
    ops += [w(0x70, 15), w(0x50, 0, kick=True), r(0x60), w(0x64, 1), r(0x100), r(0xfc)]
    return ops


ops = bring_up([(0, 0x100, 0x200)])
put("mmio_registers", "block_bring_up", bytes([0, len(ops)]) + b"".join(ops) + block_memory(0, 2))
ops = bring_up([(0, 0x100, 0x200), (0x400, 0x500, 0x600)]) + [w(0x70, 0), r(0x70)]
put("mmio_registers", "net_bring_up_reset", bytes([1, len(ops)]) + b"".join(ops) + net_mem)
