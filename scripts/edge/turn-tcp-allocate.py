#!/usr/bin/env python3
"""A minimal TURN-over-TCP client (standard library only) for scripts/edge-e2e.sh: binds the
source address it is given (so the test can tell the client from the proxy in front of uturn),
makes one long-term-credential Allocate (RFC 8656 §7.1, RFC 8489 §9.2), prints the
XOR-MAPPED-ADDRESS the server saw, then holds the connection (and so the allocation) until its
standard input closes or HOLD seconds pass.

Usage: turn-tcp-allocate.py SOURCE_IP SERVER_IP SERVER_PORT USER PASSWORD [HOLD]
"""
import hashlib
import hmac
import os
import select
import socket
import struct
import sys

MAGIC = 0x2112A442


def attr(kind, value):
    pad = (4 - len(value) % 4) % 4
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * pad


def message(method, attrs, key=None):
    tid = os.urandom(12)
    body = b"".join(attrs)
    if key is not None:
        # MESSAGE-INTEGRITY over the header with the length including the attribute itself.
        header = struct.pack("!HHI", method, len(body) + 24, MAGIC) + tid
        mac = hmac.new(key, header + body, hashlib.sha1).digest()
        body += attr(0x0008, mac)
    return struct.pack("!HHI", method, len(body), MAGIC) + tid + body


def read_message(sock):
    header = b""
    while len(header) < 20:
        chunk = sock.recv(20 - len(header))
        if not chunk:
            raise SystemExit("server closed the connection")
        header += chunk
    kind, length = struct.unpack("!HH", header[:4])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise SystemExit("server closed the connection")
        body += chunk
    attrs = {}
    at = 0
    while at + 4 <= len(body):
        t, n = struct.unpack("!HH", body[at:at + 4])
        attrs.setdefault(t, body[at + 4:at + 4 + n])
        at += 4 + n + (4 - n % 4) % 4
    return kind, attrs


def xor_address(value):
    family, port = struct.unpack("!xBH", value[:4])
    port ^= MAGIC >> 16
    if family == 1:
        ip = struct.unpack("!I", value[4:8])[0] ^ MAGIC
        return "%s:%d" % (socket.inet_ntoa(struct.pack("!I", ip)), port)
    return "family %d" % family


def main():
    source, server, port, user, password = sys.argv[1:6]
    hold = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((server, int(port)))
    transport = attr(0x0019, b"\x11\0\0\0")  # REQUESTED-TRANSPORT: UDP
    sock.sendall(message(0x0003, [transport]))
    kind, attrs = read_message(sock)
    if kind != 0x0113 or 0x0014 not in attrs or 0x0015 not in attrs:
        raise SystemExit("expected a 401 with REALM and NONCE, got type 0x%04x" % kind)
    realm, nonce = attrs[0x0014], attrs[0x0015]
    key = hashlib.md5(user.encode() + b":" + realm + b":" + password.encode()).digest()
    sock.sendall(message(0x0003, [transport, attr(0x0006, user.encode()), attr(0x0014, realm),
                                  attr(0x0015, nonce)], key))
    kind, attrs = read_message(sock)
    if kind != 0x0103 or 0x0020 not in attrs:
        raise SystemExit("Allocate failed: type 0x%04x" % kind)
    print("mapped", xor_address(attrs[0x0020]), flush=True)
    select.select([sys.stdin], [], [], hold)
    sock.close()


main()
