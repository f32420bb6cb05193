"""The frame format both sides of the boundary speak.

One frame is a 16-byte prefix (two little-endian u64: header length, payload length), a UTF-8 JSON
header `{"kind", "meta", "tensors": [{"name", "dtype", "shape", "nbytes"}, ...]}`, then the
tensors' raw bytes (contiguous, native little-endian) concatenated in header order.

A blinded product's request and its reply, the trip a decode step makes once per projection (121 times a token
for SmolLM2), may instead carry a compact header: a fixed binary struct in place of the JSON, flagged by the top
bit of the prefix's header length. It holds the same kind, meta and one int64 matrix, and decodes to the same
Frame, in fewer steps on each side.

Sending writes each tensor's own memory (no copy for a contiguous CPU tensor). Receiving parses the
prefix and header where they were read (a view of the reader's read-ahead, no copy), then allocates
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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from torch import Tensor

from ..model.ops import PROJECTIONS

PREFIX = struct.Struct("<QQ")  # header length (its top bit set: a compact header), payload length
MAX_HEADER_BYTES = 64 << 20
IOV_MAX = 1024  # Linux caps the buffers one sendmsg call may take
# How long each side polls for the other's next frame before it sleeps (see SocketReader). Most replies
# and requests of a decode step come within it; measured on this 2-core VM, it took secureinfer's decode
# from 8.6 to 12.9 tokens/s (a 24 KB round trip: 84 -> 48 us). A wait past it sleeps as before.
SPIN_S = 1e-3
# A reader takes up to this much of what has arrived in one recv, and hands it out from there: a decode step's
# frame (prefix, header and a few KB of tensors) is one syscall instead of three. Larger reads go straight to
# their tensor.
READ_AHEAD_BYTES = 64 << 10

# The compact headers (module docstring). Measured on this 2-core VM, `secureinfer` decoding, old and new code
# alternated (3 pairs, 4 x 32 tokens each): the wait the device's compute does not explain, median a trip, 32-38 ->
# 24-33 us; its share of a token 0.16-0.18 -> 0.12-0.15. JSON was not the cost: fewer steps on each side were.
COMPACT = 1 << 63  # set in a prefix's header length: the header is a compact one
REQUEST_TAG, REPLY_TAG = 1, 2
# tag, op (index in PROJECTIONS), layer (-1: none), step, start, batch, length, last_only, padded, then the rows and
# columns of the int64 tensor "v"; then, if padded, `batch` int64 left pads
PRODUCT_REQUEST = struct.Struct("<BBiQIIIBBII")
PRODUCT_REPLY = struct.Struct("<BdII")  # tag, compute_s, rows and columns of the int64 tensor "y"
# A blinded run's meta: the runtime's, as the device's view records it from either header.
PRODUCT_META_KEYS = {"step", "start", "batch", "length", "pad", "last_only", "ops", "returns", "blinded"}
OP_INDEX = {op: index for index, op in enumerate(PROJECTIONS)}

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
    compact: bool = False  # it came with a compact header: its reply may too


@dataclass
class EncodedFrame:
    """A frame ready to send: the prefix and header as the first buffer, then one buffer per tensor."""

    buffers: list[memoryview]
    nbytes: int
    payload_nbytes: int

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers)


def encode_request(kind: str, meta: dict[str, Any], tensors: Tensors) -> EncodedFrame:
    """A request's frame: with a compact header for a blinded product of one int64 matrix "v", JSON otherwise."""
    if kind == "run" and meta.get("blinded") is True and len(tensors) == 1 and meta.keys() == PRODUCT_META_KEYS:
        v, ops, pad = tensors.get("v"), meta["ops"], meta["pad"]
        if _compactable(v) and len(ops) == 1 and meta["returns"] == ["y"] and ops[0][0] in OP_INDEX:
            (op, layer), batch = ops[0], meta["batch"]
            try:
                head = PRODUCT_REQUEST.pack(
                    REQUEST_TAG, OP_INDEX[op], -1 if layer is None else layer, meta["step"], meta["start"], batch,
                    meta["length"], meta["last_only"], pad is not None, *v.shape,
                )  # fmt: skip
                if pad is not None:
                    head += struct.pack(f"<{batch}q", *pad)
                return _compact(head, v)
            except struct.error:  # a field out of its struct's range, or a pad list not `batch` long: JSON says it
                pass
    return encode_frame(kind, meta, tensors)


def encode_reply(request: Frame, kind: str, meta: dict[str, Any], tensors: Tensors) -> EncodedFrame:
    """The reply to `request`: compact for a compact request's ok with the int64 matrix "y" alone, JSON otherwise."""
    if request.compact and kind == OK and len(tensors) == 1 and len(meta) == 1:
        y, compute_s = tensors.get("y"), meta.get("compute_s")
        if type(compute_s) is float and _compactable(y):
            return _compact(PRODUCT_REPLY.pack(REPLY_TAG, compute_s, *y.shape), y)
    return encode_frame(kind, meta, tensors)


def _compactable(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.dtype == torch.int64 and tensor.dim() == 2


def _compact(head: bytes, tensor: Tensor) -> EncodedFrame:
    raw = _tensor_bytes(tensor)
    first = memoryview(PREFIX.pack(len(head) | COMPACT, raw.nbytes) + head)
    return EncodedFrame([first, raw], first.nbytes + raw.nbytes, raw.nbytes)


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
    try:  # the common case, tried first: asking torch whether it holds costs as much as viewing the tensor
        return memoryview(tensor.numpy()).cast("B")
    except (TypeError, RuntimeError):  # strided, empty, bfloat16, not on the CPU, or requiring grad
        pass
    if not (tensor.is_cpu and tensor.is_contiguous()):
        tensor = tensor.to("cpu").contiguous()
    return _byte_view(tensor.detach())


def _byte_view(tensor: Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory, through numpy where numpy has the dtype (half the
    calls of viewing it as uint8 first)."""
    if tensor.dtype == torch.bfloat16 or not tensor.numel():  # numpy has no bfloat16; memoryview casts no empty shape
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    return memoryview(tensor.numpy()).cast("B")


def read_frame(reader: FrameReader) -> Frame:
    """Read one frame from `reader`, validating the header before allocating any tensor."""
    header_len, payload_len = PREFIX.unpack(reader.take(PREFIX.size))
    compact, header_len = header_len & COMPACT, header_len & ~COMPACT
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header claims {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    if compact:
        return _read_compact(reader, reader.take(header_len), payload_len)
    kind, meta, specs = _parse_header(reader.take(header_len))
    declared = sum(nbytes for _, _, _, nbytes in specs)
    if declared != payload_len:
        raise ProtocolError(f"frame prefix says {payload_len} payload bytes but its tensors add up to {declared}")
    tensors = {name: _received_tensor(reader, name, dtype, shape, nbytes) for name, dtype, shape, nbytes in specs}
    return Frame(kind, meta, tensors, PREFIX.size + header_len + payload_len, payload_len)


def _read_compact(reader: FrameReader, head: memoryview, payload_len: int) -> Frame:
    tag = head[0] if head.nbytes else None
    if tag == REPLY_TAG and head.nbytes == PRODUCT_REPLY.size:
        _, compute_s, rows, cols = PRODUCT_REPLY.unpack(head)
        kind, meta, name = OK, {"compute_s": compute_s}, "y"
    elif tag == REQUEST_TAG and head.nbytes >= PRODUCT_REQUEST.size:
        _, op, layer, step, start, batch, length, last_only, padded, rows, cols = PRODUCT_REQUEST.unpack_from(head)
        if op >= len(PROJECTIONS) or layer < -1 or last_only > 1 or padded > 1:
            raise ProtocolError(f"compact request: op {op}, layer {layer}, last_only {last_only}, padded {padded}")
        if head.nbytes != PRODUCT_REQUEST.size + (8 * batch if padded else 0):
            raise ProtocolError(f"compact request: a {head.nbytes}-byte header for batch {batch}, padded {padded}")
        pad = list(struct.unpack_from(f"<{batch}q", head, PRODUCT_REQUEST.size)) if padded else None
        kind, name = "run", "v"
        meta = {
            "step": step, "start": start, "batch": batch, "length": length, "pad": pad, "last_only": bool(last_only),
            "ops": [[PROJECTIONS[op], None if layer < 0 else layer]], "returns": ["y"], "blinded": True,
        }  # fmt: skip
    else:
        raise ProtocolError(f"a compact header of {head.nbytes} bytes with tag {tag} fits no compact layout")
    if rows * cols * 8 != payload_len:
        raise ProtocolError(f"compact frame: [{rows}, {cols}] of int64 is {rows * cols * 8} bytes, not {payload_len}")
    tensor = _received_tensor(reader, name, torch.int64, [rows, cols], payload_len)
    return Frame(kind, meta, {name: tensor}, PREFIX.size + head.nbytes + payload_len, payload_len, compact=True)


def _received_tensor(reader: FrameReader, name: str, dtype: torch.dtype, shape: list[int], nbytes: int) -> Tensor:
    """A new tensor filled from the stream."""
    numpy_dtype = NUMPY_DTYPES.get(dtype)
    try:
        array = None if numpy_dtype is None else np.empty(shape, numpy_dtype)
        tensor = torch.empty(shape, dtype=dtype) if array is None else torch.from_numpy(array)
    # numpy raises MemoryError, or ValueError past its size limit; torch raises RuntimeError
    except (MemoryError, RuntimeError, ValueError) as error:
        raise ProtocolError(f"cannot allocate tensor {name!r} of {nbytes} bytes: {error}") from None
    if nbytes:
        reader.read_into(_byte_view(tensor) if array is None else memoryview(array).cast("B"))
    return tensor


def _parse_header(raw: memoryview) -> tuple[str, dict[str, Any], list[tuple[str, torch.dtype, list[int], int]]]:
    """The header's kind, meta and tensor specs, checked. orjson builds exact types, never subclasses, so the
    checks ask `type(x) is int`, which also rules out a bool, in one test: they run on every frame."""
    try:
        header = orjson.loads(raw)  # strict RFC 8259 (no NaN), UTF-8 checked, nesting capped at 255
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {error}") from None
    if type(header) is dict:
        kind, meta, entries = header.get("kind"), header.get("meta"), header.get("tensors")
        if type(kind) is str and type(meta) is dict and type(entries) is list:
            specs = [_tensor_spec(entry) for entry in entries]
            names = {name for name, _, _, _ in specs}
            if len(names) != len(specs):
                raise ProtocolError(f"frame names a tensor twice: {[name for name, _, _, _ in specs]}")
            return kind, meta, specs
    raise ProtocolError("a frame header is an object with a string `kind`, an object `meta` and a list `tensors`")


def _tensor_spec(entry: Any) -> tuple[str, torch.dtype, list[int], int]:
    if type(entry) is not dict or type(name := entry.get("name")) is not str:
        raise ProtocolError(f"tensor entry {entry!r} is not an object with a string `name`")
    dtype_name, shape, nbytes = entry.get("dtype"), entry.get("shape"), entry.get("nbytes")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise ProtocolError(f"tensor {name!r} has unknown dtype {dtype_name!r}; allowed: {sorted(DTYPES)}")
    if type(shape) is not list or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise ProtocolError(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
    if type(nbytes) is not int or nbytes < 0:
        raise ProtocolError(f"tensor {name!r} has nbytes {nbytes!r}; expected a non-negative integer")
    expected = math.prod(shape) * dtype.itemsize
    if expected != nbytes:
        raise ProtocolError(f"tensor {name!r}: shape {shape} of {dtype_name} is {expected} bytes, not {nbytes}")
    return name, dtype, shape, nbytes


def decode_frame(data: bytes) -> Frame:
    """Decode one frame held whole in `data`; a short or over-long buffer is a ProtocolError."""
    reader = BufferReader(data)
    frame = read_frame(reader)
    if reader.unread:
        raise ProtocolError(f"{reader.unread} stray bytes after the end of the frame")
    return frame


class FrameReader(ABC):
    """Where `read_frame` reads from: a byte stream read in order, each read either whole or raising."""

    @abstractmethod
    def take(self, nbytes: int) -> memoryview:
        """The next `nbytes`, as a view that is valid only until the next read (for the prefix and header, which
        are parsed at once: no copy and no allocation for a small frame)."""

    @abstractmethod
    def read_into(self, target: memoryview) -> None:
        """Fill the whole of `target` with the next bytes (for tensors, which keep them)."""


class BufferReader(FrameReader):
    """Reads a frame held whole in memory; reading past its end is a truncated frame."""

    def __init__(self, data: bytes):
        self._data = memoryview(data).cast("B")
        self._offset = 0

    @property
    def unread(self) -> int:
        return self._data.nbytes - self._offset

    def take(self, nbytes: int) -> memoryview:
        start, end = self._offset, self._offset + nbytes
        if end > self._data.nbytes:
            raise ProtocolError(f"frame is truncated: needs more than its {self._data.nbytes} bytes")
        self._offset = end
        return self._data[start:end]

    def read_into(self, target: memoryview) -> None:
        target[:] = self.take(target.nbytes)


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


class SocketReader(FrameReader):
    """Reads a stream socket. EOF raises EOFError: the peer is gone, not malformed.

    It reads ahead up to READ_AHEAD_BYTES of what has arrived, and serves later reads from that first; so one
    reader must serve the whole stream. With `spin_s`, a read that finds nothing read ahead first polls the
    socket without sleeping for up to that long, then blocks as usual. A peer that answers within it finds us
    awake: its send wakes no sleeping process, and on a VM that wake-up (an inter-processor interrupt through
    the hypervisor) costs more than a small message.
    """

    def __init__(self, sock: socket.socket, spin_s: float = 0.0):
        self._sock, self._spin_s = sock, spin_s
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._ahead = memoryview(bytearray(READ_AHEAD_BYTES))
        self._start = self._end = 0  # the unread part of `_ahead`: [start, end)

    def take(self, nbytes: int) -> memoryview:
        start = self._start
        if self._end - start >= nbytes:
            self._start = start + nbytes
            return self._ahead[start : start + nbytes]
        if nbytes > READ_AHEAD_BYTES:
            target = memoryview(bytearray(nbytes))
            self.read_into(target)
            return target
        held = self._end - start  # moved to the front, so the rest arrives after it
        self._ahead[:held] = self._ahead[start : self._end]
        self._start, self._end = 0, held
        if not held:
            self._await_data()
        while self._end < nbytes:
            self._end += self._receive(self._ahead[self._end :])
        self._start = nbytes
        return self._ahead[:nbytes]

    def read_into(self, target: memoryview) -> None:
        start, wanted = self._start, target.nbytes
        got = min(self._end - start, wanted)
        if got:
            target[:got] = self._ahead[start : start + got]
            self._start = start + got
            if got == wanted:
                return
        self._await_data()
        while got < wanted:
            if wanted - got >= READ_AHEAD_BYTES:
                got += self._receive(target[got:])
                continue
            n = self._receive(self._ahead)
            used = min(n, wanted - got)
            target[got : got + used] = self._ahead[:used]
            self._start, self._end = used, n
            got += used

    def _receive(self, into: memoryview) -> int:
        n = self._sock.recv_into(into)
        if n == 0:
            raise EOFError("the peer closed the connection")
        return n

    def _await_data(self) -> None:
        if self._spin_s:
            deadline = time.perf_counter() + self._spin_s
            while not self._readable.poll(0) and time.perf_counter() < deadline:
                pass
