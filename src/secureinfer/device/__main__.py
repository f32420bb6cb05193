"""`python -m secureinfer.device --fd N`: serve the device protocol on an inherited socket.

The enclave spawns this with one end of a socketpair (see channel.process). It answers frames until
`close` or until the enclave goes away (EOF), and writes its view (with --record-view) either way.
Exit codes: 0 done, 2 cannot start (e.g. no CUDA), 3 the enclave sent a malformed frame.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys

import torch

from ..channel.wire import (
    ERROR,
    READY,
    SPIN_S,
    ProtocolError,
    SocketReader,
    encode_frame,
    encode_reply,
    read_frame,
    send_frame,
)
from ..errors import SecureInferError
from .endpoint import DeviceEndpoint
from .recorder import ViewRecorder

EXIT_OK, EXIT_CANNOT_START, EXIT_BAD_FRAME = 0, 2, 3


def serve(sock: socket.socket, endpoint: DeviceEndpoint) -> int:
    reader = SocketReader(sock, SPIN_S)
    try:
        send_frame(sock, encode_frame(READY, {}, {}))
        while True:
            try:
                request = read_frame(reader)
            except EOFError:
                return EXIT_OK  # the enclave is gone; nothing more will come
            except ProtocolError as error:
                # The stream is out of step after a bad frame: tell the enclave why, then stop.
                with contextlib.suppress(OSError):
                    send_frame(sock, encode_frame(ERROR, {"message": f"malformed frame: {error}"}, {}))
                return EXIT_BAD_FRAME
            send_frame(sock, encode_reply(request, *endpoint.dispatch(request.kind, request.meta, request.tensors)))
            if request.kind == "close":
                return EXIT_OK
    except (BrokenPipeError, ConnectionResetError):
        return EXIT_OK  # the enclave left while we were replying
    finally:
        endpoint.close()  # writes the view, whatever ended the session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secureinfer.device", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the connected stream socket")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--record-view", metavar="DIR", help="write everything this device sees to DIR")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with socket.socket(fileno=args.fd) as sock:
        try:
            endpoint = DeviceEndpoint(args.device, ViewRecorder(args.record_view) if args.record_view else None)
        except SecureInferError as error:
            print(f"secureinfer.device: {error}", file=sys.stderr)
            return EXIT_CANNOT_START
        return serve(sock, endpoint)


if __name__ == "__main__":
    sys.exit(main())
