"""A device in this process, for fast tests: the enclave cannot tell it from a device process.

Every message is still encoded to bytes and decoded on each side, so tensors are copied both ways
(neither side can alias the other's memory) and the counters match ProcessChannel's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Channel, DeviceProtocolError
from .wire import EncodedFrame, Frame, ProtocolError, decode_frame, encode_reply

if TYPE_CHECKING:  # the device package imports the wire format from this one
    from ..device.endpoint import DeviceEndpoint


class InProcessChannel(Channel):
    def __init__(self, endpoint: DeviceEndpoint):
        super().__init__()
        self.endpoint = endpoint
        self._delivered: Frame | None = None  # sent, not yet served: the device serves it when the reply is read

    def _send(self, kind: str, request: EncodedFrame) -> None:
        self._delivered = decode_frame(request.to_bytes())

    def _receive(self, kind: str) -> Frame:
        delivered, self._delivered = self._delivered, None
        reply = self.endpoint.dispatch(delivered.kind, delivered.meta, delivered.tensors)
        try:
            return decode_frame(encode_reply(delivered, *reply).to_bytes())
        except ProtocolError as error:
            raise DeviceProtocolError(f"the in-process device's reply to {kind!r} cannot be framed: {error}") from None

    def _abandon(self) -> None:
        self._closed = True
        self.endpoint.close()

    def close(self) -> None:
        try:
            if self.alive:
                self.request("close")
        finally:
            self._abandon()
