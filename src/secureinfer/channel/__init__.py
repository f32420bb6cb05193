"""The boundary transport between the enclave and the untrusted device, with counters.

`open_channel("process")` (the default) runs the device as a separate process; `"inprocess"` runs
it in this process for fast tests, behind the same wire encoding.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..errors import InvalidRequestError
from .base import (
    Channel,
    ChannelCounters,
    DeviceDied,
    DeviceError,
    DeviceFailed,
    DeviceProtocolError,
    DeviceTimeout,
)
from .inprocess import InProcessChannel
from .process import ProcessChannel
from .wire import ProtocolError

CHANNEL_KINDS = ("process", "inprocess")


def open_channel(
    kind: str = "process",
    *,
    device: str = "cpu",
    record_view: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
    threads: int | None = None,
    command: Sequence[str] | None = None,
) -> Channel:
    """Start a device and return the channel to it.

    device: the torch device it computes on ("cpu" or "cuda"). record_view: a directory to write
    the device view to (on close, or when the enclave goes away). timeout_s: the longest wait for
    one reply (process only; start-up has its own 60 s). threads: the device's torch threads
    (process only: in process, both sides share one thread pool). command: a replacement device
    command line (process only, for tests).
    """
    if kind == "process":
        return ProcessChannel(
            device=device, record_view=record_view, timeout_s=timeout_s, threads=threads, command=command
        )
    if kind == "inprocess":
        if command is not None:
            raise InvalidRequestError(
                "a device command was given for an in-process channel", "pass command only with kind='process'"
            )
        # Imported here: the device package imports the wire format from this package.
        from ..device.endpoint import DeviceEndpoint
        from ..device.recorder import ViewRecorder

        return InProcessChannel(DeviceEndpoint(device, ViewRecorder(record_view) if record_view is not None else None))
    raise InvalidRequestError(f"unknown channel {kind!r}", f"use one of: {', '.join(CHANNEL_KINDS)}")


__all__ = [
    "CHANNEL_KINDS",
    "Channel",
    "ChannelCounters",
    "DeviceDied",
    "DeviceError",
    "DeviceFailed",
    "DeviceProtocolError",
    "DeviceTimeout",
    "InProcessChannel",
    "ProcessChannel",
    "ProtocolError",
    "open_channel",
]
