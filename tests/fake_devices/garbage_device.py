"""A fake device that starts properly, then answers its first request with bytes that break the wire format.

Standard library only, so it starts in milliseconds. The channel appends `--fd N` as for the real
device. Modes: `garbage` (a prefix claiming an absurd header length), `bad-json` (a well-sized
header that is not JSON).
"""

import argparse
import json
import socket
import struct

PREFIX = struct.Struct("<QQ")  # header length, payload length: as secureinfer.channel.wire


def frame(header: bytes, payload: bytes = b"") -> bytes:
    return PREFIX.pack(len(header), len(payload)) + header + payload


REPLIES = {
    "garbage": bytes(range(256)),
    "bad-json": frame(b"{this is not json"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=sorted(REPLIES), required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    with socket.socket(fileno=args.fd) as sock:
        sock.sendall(frame(json.dumps({"kind": "ready", "meta": {}, "tensors": []}).encode()))
        sock.recv(1 << 16)  # the start of a request is enough: answer it
        sock.sendall(REPLIES[args.mode])
        while sock.recv(1 << 16):  # stay up until the enclave hangs up, so the failure is the reply, not EOF
            pass


if __name__ == "__main__":
    main()
