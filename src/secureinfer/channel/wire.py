"""The frame format both sides of the boundary speak.

One frame is a 16-byte prefix (two little-endian u64: header length, payload length), a UTF-8 JSON
header `{"kind", "meta", "tensors": [{"name", "dtype", "shape", "nbytes"}, ...]}`, then the
tensors' raw bytes (contiguous, native little-endian) concatenated in header order.

Sending writes each tensor's own memory (no copy for a contiguous CPU tensor). Receiving allocates
each tensor (through numpy, a third of torch.empty's cost, for every dtype numpy has) and reads the
socket straight into it: one copy off the socket, and no decoded tensor aliases another or a shared
buffer.

Everything read is untrusted: any malformed frame raises `ProtocolError`, never a hang or a crash.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import orjson
import torch
from torch import Tensor

PREFIX = struct.Struct("<QQ")  # header-JSON length, payload length
MAX_HEADER_BYTES = 64 << 20
IOV_MAX = 1024  # Linux caps the buffers one sendmsg call may take
# How long each side polls for the other's next frame before it sleeps (see socket_reader). Most replies
# and requests of a decode step come within it; measured on this 2-core VM, it took secureinfer's decode
# from 8.6 to 12.9 tokens/s (a 24 KB round trip: 84 -> 48 us). A wait past it sleeps as before.
SPIN_S = 1e-3
# A reader takes up to this much of what has arrived in one recv, and hands it out from there: a decode step's
# frame (prefix, header and a few KB of tensors) is one syscall instead of three. Larger reads go straight to
# their tensor.
READ_AHEAD_BYTES = 64 << 10

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# numpy has every dtype a frame carries but bfloat16, which is allocated through torch.
NUMPY_DTYPES = {dtype: np.dtype(name) for name, dtype in DTYPES.items() if dtype != torch.bfloat16}

# Reply kinds. A request's kind names the operation; its reply is one of these.
OK = "ok"
ERROR = "error"
# The device's first frame, unprompted, once it has started and can serve (see ProcessChannel).
READY = "ready"

Tensors = dict[str, Tensor]
ReadInto = Callable[[memoryview], None]  # fills the whole view, or raises


class ProtocolError(ValueError):
    """A frame that breaks the format: bad lengths, bad JSON, unknown dtype, sizes that disagree."""


@dataclass
class Frame:
    """A decoded frame. `nbytes` counts the whole frame; `payload_nbytes` the tensor bytes alone."""

    kind: str
    meta: dict[str, Any]
    tensors: Tensors
    nbytes: int
    payload_nbytes: int


@dataclass
class EncodedFrame:
    """A frame ready to send: the prefix and header as the first buffer, then one buffer per tensor."""

    buffers: list[memoryview]
    nbytes: int
    payload_nbytes: int

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers)


def encode_frame(kind: str, meta: dict[str, Any], tensors: Tensors) -> EncodedFrame:
    if not isinstance(kind, str) or not isinstance(meta, dict):
        raise ProtocolError(f"a frame needs a str kind and a dict meta, not {type(kind).__name__}, {type(meta).__name__}")
    entries, buffers, payload_nbytes = [], [], 0
    for name, tensor in tensors.items():
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ProtocolError(f"tensor {name!r} has dtype {tensor.dtype}; frames carry only {sorted(DTYPES)}")
        raw = _tensor_bytes(tensor)
        entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "nbytes": raw.nbytes})
        buffers.append(raw)
        payload_nbytes += raw.nbytes
    try:  # orjson: ~15x faster than json here, for the two headers of each of a token's 121 round trips
        header = orjson.dumps({"kind": kind, "meta": meta, "tensors": entries})
    except TypeError as error:  # orjson.JSONEncodeError, e.g. an object, a non-str key or an int past 64 bits
        raise ProtocolError(f"the meta of a {kind!r} frame is not JSON-serializable: {error}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"a {kind!r} frame's header is {len(header)} bytes; the limit is {MAX_HEADER_BYTES}")
    head = memoryview(PREFIX.pack(len(header), payload_nbytes) + header)
    return EncodedFrame([head, *buffers], head.nbytes + payload_nbytes, payload_nbytes)


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes; a view of its own memory when it is already contiguous on the CPU."""
    if not (tensor.is_cpu and tensor.is_contiguous()):
        tensor = tensor.to("cpu").contiguous()
    if tensor.requires_grad:  # asked first: detaching every tensor costs as much as viewing it
        tensor = tensor.detach()
    return _byte_view(tensor)


def _byte_view(tensor: Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory, through numpy where numpy has the dtype (half the
    calls of viewing it as uint8 first)."""
    if tensor.dtype == torch.bfloat16 or not tensor.numel():  # numpy has no bfloat16; memoryview casts no empty shape
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    return memoryview(tensor.numpy()).cast("B")


def read_frame(read_into: ReadInto) -> Frame:
    """Read one frame through `read_into`, validating the header before allocating any tensor."""
    prefix = bytearray(PREFIX.size)
    read_into(memoryview(prefix))
    header_len, payload_len = PREFIX.unpack(prefix)
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header claims {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    header = bytearray(header_len)
    read_into(memoryview(header))
    kind, meta, specs = _parse_header(header)
    declared = sum(nbytes for _, _, _, nbytes in specs)
    if declared != payload_len:
        raise ProtocolError(f"frame prefix says {payload_len} payload bytes but its tensors add up to {declared}")
    tensors = {name: _received_tensor(read_into, name, dtype, shape, nbytes) for name, dtype, shape, nbytes in specs}
    return Frame(kind, meta, tensors, PREFIX.size + header_len + payload_len, payload_len)


def _received_tensor(read_into: ReadInto, name: str, dtype: torch.dtype, shape: list[int], nbytes: int) -> Tensor:
    """A new tensor filled from the stream."""
    numpy_dtype = NUMPY_DTYPES.get(dtype)
    try:
        array = None if numpy_dtype is None else np.empty(shape, numpy_dtype)
        tensor = torch.empty(shape, dtype=dtype) if array is None else torch.from_numpy(array)
    # numpy raises MemoryError, or ValueError past its size limit; torch raises RuntimeError
    except (MemoryError, RuntimeError, ValueError) as error:
        raise ProtocolError(f"cannot allocate tensor {name!r} of {nbytes} bytes: {error}") from None
    if nbytes:
        read_into(_byte_view(tensor) if array is None else memoryview(array).cast("B"))
    return tensor


def _parse_header(raw: bytearray) -> tuple[str, dict[str, Any], list[tuple[str, torch.dtype, list[int], int]]]:
    try:
        header = orjson.loads(raw)  # strict RFC 8259 (no NaN), UTF-8 checked, nesting capped at 255
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {error}") from None
    if not (
        isinstance(header, dict)
        and isinstance(header.get("kind"), str)
        and isinstance(header.get("meta"), dict)
        and isinstance(header.get("tensors"), list)
    ):
        raise ProtocolError("a frame header is an object with a string `kind`, an object `meta` and a list `tensors`")
    specs = [_tensor_spec(entry) for entry in header["tensors"]]
    names = [name for name, _, _, _ in specs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"frame names a tensor twice: {names}")
    return header["kind"], header["meta"], specs


def _tensor_spec(entry: Any) -> tuple[str, torch.dtype, list[int], int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(f"tensor entry {entry!r} is not an object with a string `name`")
    name, dtype_name, shape, nbytes = entry["name"], entry.get("dtype"), entry.get("shape"), entry.get("nbytes")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"tensor {name!r} has unknown dtype {dtype_name!r}; allowed: {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise ProtocolError(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
    if not _is_count(nbytes):
        raise ProtocolError(f"tensor {name!r} has nbytes {nbytes!r}; expected a non-negative integer")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != nbytes:
        raise ProtocolError(f"tensor {name!r}: shape {shape} of {dtype_name} is {expected} bytes, not {nbytes}")
    return name, dtype, shape, nbytes


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_frame(data: bytes) -> Frame:
    """Decode one frame held whole in `data`; a short or over-long buffer is a ProtocolError."""
    source = memoryview(data).cast("B")
    offset = 0

    def read_into(target: memoryview) -> None:
        nonlocal offset
        end = offset + target.nbytes
        if end > source.nbytes:
            raise ProtocolError(f"frame is truncated: needs more than its {source.nbytes} bytes")
        target[:] = source[offset:end]
        offset = end

    frame = read_frame(read_into)
    if offset != source.nbytes:
        raise ProtocolError(f"{source.nbytes - offset} stray bytes after the end of the frame")
    return frame


# Timeouts are the socket's own (`sock.settimeout`): each send or receive waits at most that long.
# Set once, not per call: every settimeout costs syscalls, a measurable share of a small round trip.


def send_frame(sock: socket.socket, frame: EncodedFrame) -> None:
    """Write the whole frame with scatter-gather sends."""
    pending = [buffer for buffer in frame.buffers if buffer.nbytes]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first : first + IOV_MAX])
        while sent:  # a partial send stops anywhere, even inside a buffer
            if sent >= pending[first].nbytes:
                sent -= pending[first].nbytes
                first += 1
            else:
                pending[first] = pending[first][sent:]
                sent = 0


def socket_reader(sock: socket.socket, spin_s: float = 0.0) -> ReadInto:
    """A `read_into` over a stream socket. EOF raises EOFError: the peer is gone, not malformed.

    It reads ahead up to READ_AHEAD_BYTES of what has arrived, and serves later reads from that first; so one
    reader must serve the whole stream. With `spin_s`, a read that finds nothing read ahead first polls the
    socket without sleeping for up to that long, then blocks as usual. A peer that answers within it finds us
    awake: its send wakes no sleeping process, and on a VM that wake-up (an inter-processor interrupt through
    the hypervisor) costs more than a small message.
    """
    readable = select.poll()
    readable.register(sock, select.POLLIN)
    ahead = memoryview(bytearray(READ_AHEAD_BYTES))
    held = [0, 0]  # the unread part of `ahead`: [start, end)

    def read_into(target: memoryview) -> None:
        start, end = held
        got = min(end - start, target.nbytes)
        if got:
            target[:got] = ahead[start : start + got]
            held[0] = start + got
            if got == target.nbytes:
                return
        if spin_s:
            deadline = time.perf_counter() + spin_s
            while not readable.poll(0) and time.perf_counter() < deadline:
                pass
        while got < target.nbytes:
            wanted = target.nbytes - got
            n = sock.recv_into(target[got:] if wanted >= READ_AHEAD_BYTES else ahead)
            if n == 0:
                raise EOFError("the peer closed the connection")
            if wanted >= READ_AHEAD_BYTES:
                got += n
                continue
            used = min(n, wanted)
            target[got : got + used] = ahead[:used]
            held[0], held[1] = used, n
            got += used

    return read_into
