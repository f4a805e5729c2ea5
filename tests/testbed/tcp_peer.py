"""Host side of Ember's network test and benchmark, run inside a network namespace the
test made, bound to the TAP's address only.

usage: tcp_peer.py ADDRESS RECEIVE_BYTES SEND_FILE

Receives exactly RECEIVE_BYTES on port 5000 (the guest sends), then sends SEND_FILE on port
5001 (the guest receives). Creates `server.ready` in the working directory once listening.
Prints `received <bytes> <md5> <MiB/s>` and `sent <bytes> <MiB/s>`.
"""
import hashlib
import socket
import sys
import time

address, want, send_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(1)
    s.settimeout(600)
    return s


def rate(nbytes, seconds):
    return nbytes / max(seconds, 1e-9) / (1 << 20)


inbound, outbound = listener(5000), listener(5001)
open("server.ready", "w").close()

conn, _ = inbound.accept()
digest, got, start = hashlib.md5(), 0, None
while got < want:
    data = conn.recv(1 << 20)
    if not data:
        break
    start = start or time.monotonic()
    digest.update(data)
    got += len(data)
elapsed = time.monotonic() - (start or time.monotonic())
conn.close()
print(f"received {got} {digest.hexdigest()} {rate(got, elapsed):.1f}", flush=True)

with open(send_path, "rb") as f:
    payload = f.read()
conn, _ = outbound.accept()
start = time.monotonic()
conn.sendall(payload)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)  # the guest closes once it has read everything
elapsed = time.monotonic() - start
conn.close()
print(f"sent {len(payload)} {rate(len(payload), elapsed):.1f}", flush=True)
