"""The channel contract: request/reply over the trust boundary, the counters every channel keeps, its errors."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import SecureInferError
from .wire import ERROR, OK, EncodedFrame, Frame, Tensors, encode_request

RESTART_FIX = "restart the device (SecureLM.restart_device()) and retry the request"


class DeviceError(SecureInferError):
    """The untrusted device did not serve a request."""

    def __init__(self, problem: str, fix: str = RESTART_FIX):
        super().__init__(problem, fix)


class DeviceDied(DeviceError):
    """The device process is gone (exited, killed, or closed its end), or the channel was already closed."""


class DeviceTimeout(DeviceError):
    """No reply within the channel's timeout; the device is presumed hung and has been stopped."""


class DeviceProtocolError(DeviceError):
    """The device sent a frame that breaks the wire format or the request/reply protocol."""


class DeviceFailed(DeviceError):
    """The device answered with an error (an op raised, say). The channel stays usable."""

    def __init__(self, problem: str, device_traceback: str | None = None):
        super().__init__(
            problem, "the device is still serving: fix the request, or restart the device if it keeps failing"
        )
        self.device_traceback = device_traceback


@dataclass
class ChannelCounters:
    """What crossed the boundary since the last reset. Payload counts tensor bytes; frame counts everything."""

    round_trips: int = 0
    round_trips_by_kind: dict[str, int] = field(default_factory=dict)  # "run" trips are the per-token ones
    payload_bytes_sent: int = 0
    payload_bytes_received: int = 0
    frame_bytes_sent: int = 0
    frame_bytes_received: int = 0
    wait_s: float = 0.0  # from sending a request to having its reply decoded, less overlapped_s
    overlapped_s: float = 0.0  # the enclave's own work done while the device served a request (while_waiting)
    device_compute_s: float = 0.0  # as the device reports it
    # Per request, the part of wait_s the device's compute does not explain (transport and queueing the enclave
    # sat through; 0 where overlapped work outlasted it): what overlapping could still hide.
    transfer_s: float = 0.0

    def add(
        self, kind: str, request: EncodedFrame, reply: Frame, wait_s: float, compute_s: float, overlapped_s: float = 0.0
    ) -> None:
        self.round_trips += 1
        self.round_trips_by_kind[kind] = self.round_trips_by_kind.get(kind, 0) + 1
        self.payload_bytes_sent += request.payload_nbytes
        self.payload_bytes_received += reply.payload_nbytes
        self.frame_bytes_sent += request.nbytes
        self.frame_bytes_received += reply.nbytes
        self.wait_s += wait_s
        self.overlapped_s += overlapped_s
        self.device_compute_s += compute_s
        self.transfer_s += max(0.0, wait_s - max(0.0, compute_s - overlapped_s))  # compute the overlap did not cover

    def reset(self) -> None:
        for name, value in asdict(ChannelCounters()).items():
            setattr(self, name, value)

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)


class Channel(ABC):
    """One device behind the boundary. `request` sends a message and returns the device's reply.

    Transport failures (death, timeout, a malformed frame) close the channel for good: the stream
    may be out of step, so every later request raises DeviceDied. A DeviceFailed reply does not.
    """

    def __init__(self) -> None:
        self.counters = ChannelCounters()
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed

    def request(
        self,
        kind: str,
        meta: dict[str, Any] | None = None,
        tensors: Tensors | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        """Send one request and return the reply. `while_waiting` runs after the request is sent, while the
        device works on it; an exception it raises comes out after the reply is read, so the stream stays in
        step, and its time is not counted as waiting."""
        # Not `alive`, which asks the OS about the device process: a syscall on each of a token's 121 trips. A device
        # that died since shows up in the exchange below as its end closing, raised with how it ended.
        if self._closed:
            raise DeviceDied(f"cannot send {kind!r}: the device channel is closed")
        request = encode_request(kind, meta or {}, tensors or {})
        started = time.perf_counter()
        overlapped_s, overlapped_error = 0.0, None
        try:
            self._send(kind, request)
            if while_waiting is not None:
                began = time.perf_counter()
                try:
                    while_waiting()
                except Exception as error:
                    overlapped_error = error
                overlapped_s = time.perf_counter() - began
            reply = self._receive(kind)
        except BaseException:  # an interrupted exchange, too, leaves the stream out of step
            self._abandon()
            raise
        wait_s = time.perf_counter() - started - overlapped_s
        compute_s = reply.meta.get("compute_s", 0.0)
        if reply.kind not in (OK, ERROR) or not isinstance(compute_s, (int, float)):
            self._abandon()
            raise DeviceProtocolError(
                f"the device answered {kind!r} with a {reply.kind!r} frame and compute_s={compute_s!r}"
            )
        self.counters.add(kind, request, reply, wait_s, compute_s, overlapped_s)
        if overlapped_error is not None:
            raise overlapped_error
        if reply.kind == ERROR:
            message, device_traceback = reply.meta.get("message"), reply.meta.get("traceback")
            raise DeviceFailed(f"the device failed to handle {kind!r}: {message}", device_traceback)
        return reply.meta, reply.tensors

    @abstractmethod
    def _send(self, kind: str, request: EncodedFrame) -> None:
        """Deliver one request, raising a DeviceError on any transport failure."""

    @abstractmethod
    def _receive(self, kind: str) -> Frame:
        """The reply to the request just sent, raising a DeviceError on any transport failure."""

    @abstractmethod
    def _abandon(self) -> None:
        """Close at once after a failure, without asking the device anything."""

    @abstractmethod
    def close(self) -> None:
        """Ask the device to finish (flushing any view it records) and release it. Safe to call twice."""

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
