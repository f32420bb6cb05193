"""The boundary transport: the wire format, both channels running the tiny model, and device faults."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from device_session import PROMPT, PROMPT_PAD, greedy_steps, run_meta, start_device, tiny_model, whole_forward
from fake_clock import FakeClock
from secureinfer.channel import (
    DeviceDied,
    DeviceError,
    DeviceFailed,
    DeviceProtocolError,
    DeviceTimeout,
    open_channel,
)
from secureinfer.channel import base as channel_base
from secureinfer.channel.wire import (
    COMPACT,
    DTYPES,
    ERROR,
    MAX_HEADER_BYTES,
    OK,
    PREFIX,
    PRODUCT_REPLY,
    PRODUCT_REQUEST,
    READ_AHEAD_BYTES,
    READY,
    BufferReader,
    ProtocolError,
    SocketReader,
    decode_frame,
    encode_frame,
    encode_reply,
    encode_request,
    read_frame,
    send_frame,
)
from secureinfer.device import DeviceEndpoint
from secureinfer.device.__main__ import EXIT_BAD_FRAME, serve
from secureinfer.errors import InvalidRequestError

GARBAGE_DEVICE = Path(__file__).parent / "fake_devices" / "garbage_device.py"
CHANNELS = ("inprocess", "process")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def process_channel(**options):
    # The device computes with our thread count, so its float reductions run in the same order.
    return open_channel("process", threads=torch.get_num_threads(), **options)


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors.values())


def assert_problem_and_fix(error: DeviceError) -> None:
    assert error.problem and error.fix and str(error) == f"{error.problem}; {error.fix}"


# --- wire format -------------------------------------------------------------------------------


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_wire_round_trips_every_dtype_and_odd_shapes(dtype):
    grid = sample(dtype, (4, 6))
    tensors = {
        "scalar": sample(dtype, ()),
        "empty": sample(dtype, (3, 0, 2)),
        "cube": sample(dtype, (2, 3, 5)),
        "transposed": grid.t(),
        "sliced": grid[1:3, ::2],
        "expanded": sample(dtype, (1, 3)).expand(4, 3),
        "offset": grid[2:],  # contiguous, starting inside its storage
    }
    if dtype.is_floating_point:
        tensors["trainable"] = sample(dtype, (2, 2)).requires_grad_()
    assert not any(t.is_contiguous() for t in (tensors["transposed"], tensors["sliced"], tensors["expanded"]))
    meta = {"step": 3, "pad": [2, 0], "note": "é"}
    encoded = encode_frame("run", meta, tensors)
    frame = decode_frame(encoded.to_bytes())

    assert (frame.kind, frame.meta) == ("run", meta)
    assert list(frame.tensors) == list(tensors)
    for name, sent in tensors.items():
        got = frame.tensors[name]
        assert got.dtype == dtype and got.shape == sent.shape and torch.equal(got, sent), name
    assert frame.payload_nbytes == encoded.payload_nbytes == nbytes(tensors)
    assert frame.nbytes == encoded.nbytes == len(encoded.to_bytes())


def test_decoded_tensors_own_their_memory():
    sent = {"a": torch.arange(6.0), "b": torch.arange(4)}
    frame = decode_frame(encode_frame("k", {}, sent).to_bytes())
    frame.tensors["a"].fill_(-1)
    assert torch.equal(sent["a"], torch.arange(6.0)) and torch.equal(frame.tensors["b"], torch.arange(4))
    pointers = {t.untyped_storage().data_ptr() for t in [*sent.values(), *frame.tensors.values()]}
    assert len(pointers) == 4


def test_wire_over_a_socket_survives_partial_sends():
    """Frames far larger than the socket buffer, sent while the other side reads: every byte arrives in place."""
    tensors = {f"t{i}": torch.randn(1 << 18) for i in range(4)} | {"ids": torch.arange(5)}  # 4 MiB
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=send_frame, args=(left, encode_frame("big", {"n": 1}, tensors)))
        sender.start()
        right.settimeout(30)
        frame = read_frame(SocketReader(right))
        sender.join()
        left.close()
        with pytest.raises(EOFError):  # a peer hanging up is not a malformed frame
            read_frame(SocketReader(right))
    assert frame.kind == "big" and all(torch.equal(frame.tensors[n], t) for n, t in tensors.items())


class ChunkedSocket(socket.socket):
    """A socket whose every receive returns at most `most` bytes, so a reader meets frame pieces of every size."""

    most = 0

    def recv_into(self, buffer, nbytes=0, flags=0):
        return super().recv_into(buffer, min(nbytes or len(buffer), self.most), flags)


@pytest.mark.parametrize("most_per_receive", [None, 4099, 7])
def test_one_reader_splits_frames_that_arrive_together(most_per_receive):
    """The reader reads ahead: frames sent back to back in one write, small ones, ones with tensors or a header
    past the read-ahead, and ones cut at every odd place (by the sender and by what one receive returns), each
    come out whole and in order, and then a hang-up reads as EOF."""
    sent_tensors = [
        {"v": torch.arange(7), "empty": torch.ones(0, 3)},
        {},
        {"w": torch.randn(3, READ_AHEAD_BYTES // 4 + 5)},
        {"b": torch.randn(5).to(torch.bfloat16), "s": torch.tensor(2.5)},
        {"v": torch.arange(3)},
    ]
    metas = [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}, {"i": 4, "note": "x" * (READ_AHEAD_BYTES + 7)}]
    frames = [encode_frame(f"k{i}", meta, tensors) for i, (meta, tensors) in enumerate(zip(metas, sent_tensors))]
    stream = b"".join(frame.to_bytes() for frame in frames) * 2
    left, right = socket.socketpair()
    if most_per_receive is not None:
        right = ChunkedSocket(right.family, right.type, fileno=right.detach())
        right.most = most_per_receive
    with left, right:
        def send_in_odd_pieces():
            for start in range(0, len(stream), 4099):
                left.sendall(stream[start : start + 4099])
            left.close()

        sender = threading.Thread(target=send_in_odd_pieces)
        sender.start()
        right.settimeout(30)
        reader = SocketReader(right, spin_s=1e-3)
        received = [read_frame(reader) for _ in range(2 * len(frames))]
        with pytest.raises(EOFError):
            read_frame(reader)
        sender.join()
    for got, (i, meta, tensors) in zip(received, [*zip(range(5), metas, sent_tensors)] * 2):
        assert (got.kind, got.meta, list(got.tensors)) == (f"k{i}", meta, list(tensors))
        assert all(torch.equal(got.tensors[name], tensor) for name, tensor in tensors.items())


def raw_frame(header, payload: bytes = b"", payload_len: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(len(head), len(payload) if payload_len is None else payload_len) + head + payload


def header(*tensors: dict, kind="run", meta=None) -> dict:
    return {"kind": kind, "meta": {} if meta is None else meta, "tensors": list(tensors)}


FLOAT4 = {"name": "x", "dtype": "float32", "shape": [1], "nbytes": 4}
VALID = encode_frame("run", {}, {"x": torch.ones(3)}).to_bytes()
MALFORMED = {
    "header over 64 MiB": PREFIX.pack(MAX_HEADER_BYTES + 1, 0),
    "short prefix": b"\x05\x00\x00",
    "not JSON": raw_frame(b"{nope"),
    "not UTF-8": raw_frame(b'{"kind": "\xff"}'),
    "NaN is not JSON": raw_frame(b'{"kind": "run", "meta": {"x": NaN}, "tensors": []}'),
    "nested past any sane depth": raw_frame(b'{"kind": "run", "meta": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}, \"tensors\": []}"),
    "header not an object": raw_frame([1, 2]),
    "kind not a string": raw_frame(header(kind=3)),
    "meta not an object": raw_frame(header(meta=[])),
    "tensors not a list": raw_frame({"kind": "run", "meta": {}, "tensors": {}}),
    "unknown dtype": raw_frame(header({**FLOAT4, "dtype": "complex64", "nbytes": 8}), b"\0" * 8),
    "negative dimension": raw_frame(header({**FLOAT4, "shape": [-1]})),
    "boolean nbytes": raw_frame(header({**FLOAT4, "nbytes": True})),
    "shape times itemsize is not nbytes": raw_frame(header({**FLOAT4, "nbytes": 8}), b"\0" * 8),
    "payload length disagrees": raw_frame(header(FLOAT4), b"\0" * 8),
    "duplicate names": raw_frame(header(FLOAT4, FLOAT4), b"\0" * 8),
    # Sizes that agree but that no allocator meets: numpy's MemoryError, numpy's size limit, torch's RuntimeError.
    "4 TiB tensor": raw_frame(header({**FLOAT4, "shape": [1 << 40], "nbytes": 1 << 42}), payload_len=1 << 42),
    "tensor past numpy's size limit": raw_frame(
        header({**FLOAT4, "dtype": "int8", "shape": [1 << 31, 1 << 31, 2], "nbytes": 1 << 63}), payload_len=1 << 63
    ),
    "4 TiB bfloat16 tensor": raw_frame(
        header({**FLOAT4, "dtype": "bfloat16", "shape": [1 << 41], "nbytes": 1 << 42}), payload_len=1 << 42
    ),
    "truncated payload": VALID[:-1],
    "stray bytes after the frame": VALID + b"\0",
}


# --- compact headers: a blinded product's request and reply -------------------------------------------


def blinded_meta(**changes) -> dict:
    meta = {"step": 7, "start": 12, "batch": 2, "length": 1, "pad": None, "last_only": True,
            "ops": [["down_proj", 3]], "returns": ["y"], "blinded": True}  # fmt: skip
    return {**meta, **changes}


V = torch.randint(0, 2**31 - 1, (2, 9), dtype=torch.int64)


def header_bits(frame) -> int:
    return PREFIX.unpack(frame.to_bytes()[: PREFIX.size])[0]


def same_frame(got, expected) -> bool:
    """Kind, meta (types and key order too: True is not 1 here) and tensors alike."""
    return (
        got.kind == expected.kind
        and json.dumps(got.meta) == json.dumps(expected.meta)
        and got.tensors.keys() == expected.tensors.keys()
        and all(torch.equal(got.tensors[n], t) and got.tensors[n].dtype == t.dtype for n, t in expected.tensors.items())
    )


@pytest.mark.parametrize(
    "meta",
    [blinded_meta(), blinded_meta(ops=[["lm_head", None]], last_only=False), blinded_meta(pad=[3, 0], length=4)],
    ids=["a layer's product", "the LM head, every position", "a left-padded batch"],
)
def test_a_blinded_product_travels_compact_and_decodes_as_its_json_frame(meta):
    request = encode_request("run", meta, {"v": V})
    as_json = encode_frame("run", meta, {"v": V})
    assert header_bits(request) & COMPACT and not header_bits(as_json) & COMPACT
    assert request.nbytes < as_json.nbytes and request.payload_nbytes == as_json.payload_nbytes
    got, expected = decode_frame(request.to_bytes()), decode_frame(as_json.to_bytes())
    assert same_frame(got, expected) and got.compact and not expected.compact
    y = torch.randint(0, 2**31 - 1, (2, 5), dtype=torch.int64)
    reply = encode_reply(got, OK, {"compute_s": 0.25}, {"y": y})
    assert header_bits(reply) & COMPACT and reply.nbytes == PREFIX.size + PRODUCT_REPLY.size + y.numel() * 8
    assert same_frame(decode_frame(reply.to_bytes()), decode_frame(encode_frame(OK, {"compute_s": 0.25}, {"y": y}).to_bytes()))
    # an error, or an ok to a JSON request, goes as JSON
    assert not header_bits(encode_reply(got, ERROR, {"message": "no"}, {})) & COMPACT
    assert not header_bits(encode_reply(expected, OK, {"compute_s": 0.25}, {"y": y})) & COMPACT


@pytest.mark.parametrize(
    ("kind", "meta", "tensors"),
    [
        ("run", {**blinded_meta(), "blinded": False}, {"v": V}),
        ("run", blinded_meta(), {"v": V.float()}),
        ("run", blinded_meta(), {"v": V.view(2, 3, 3)}),
        ("run", blinded_meta(), {"v": V, "w": V}),
        ("run", blinded_meta(ops=[["attention", 0]]), {"v": V}),
        ("run", blinded_meta(ops=[["o_proj", 0], ["o_proj", 1]]), {"v": V}),
        ("run", blinded_meta(pad=[1, 2, 3]), {"v": V}),
        ("run", blinded_meta(start=-1), {"v": V}),
        ("run", {**blinded_meta(), "extra": 1}, {"v": V}),
        ("put_weights", blinded_meta(), {"v": V}),
    ],
    ids=["not blinded", "float", "3-D", "two tensors", "not a projection", "two ops", "pads not one a row",
         "negative start", "a meta key more", "another kind"],  # fmt: skip
)
def test_what_no_compact_header_holds_goes_as_json_whole(kind, meta, tensors):
    frame = encode_request(kind, meta, tensors)
    assert not header_bits(frame) & COMPACT
    assert same_frame(decode_frame(frame.to_bytes()), decode_frame(encode_frame(kind, meta, tensors).to_bytes()))


def compact_request(payload: bytes = V.numpy().tobytes(), pads: bytes = b"", **fields) -> bytes:
    values = {"tag": 1, "op": 3, "layer": 3, "step": 7, "start": 12, "batch": 2, "length": 1, "last_only": 1,
              "padded": 0, "rows": 2, "cols": 9, **fields}  # fmt: skip
    head = PRODUCT_REQUEST.pack(*values.values()) + pads
    return PREFIX.pack(len(head) | COMPACT, len(payload)) + head + payload


def compact_reply(tag: int = 2, rows: int = 1, cols: int = 2, payload: bytes = b"\0" * 16) -> bytes:
    head = PRODUCT_REPLY.pack(tag, 0.5, rows, cols)
    return PREFIX.pack(len(head) | COMPACT, len(payload)) + head + payload


def test_the_malformed_compact_frames_below_differ_from_valid_ones_by_their_one_field():
    assert same_frame(decode_frame(compact_request()), decode_frame(encode_frame("run", blinded_meta(), {"v": V}).to_bytes()))
    assert decode_frame(compact_request(padded=1, pads=b"\0" * 16)).meta["pad"] == [0, 0]
    assert decode_frame(compact_reply()).meta == {"compute_s": 0.5}



def test_a_compact_frame_whose_shape_is_shorter_than_its_prefix_says_is_refused_mid_stream():
    """Read from a stream, a frame that took fewer bytes than its prefix declares would leave the rest to be read as
    the next frame's start."""
    stream = BufferReader(compact_request(rows=1) + compact_reply())
    with pytest.raises(ProtocolError, match="not 144"):
        read_frame(stream)


MALFORMED.update({
    "compact: unknown tag": compact_request(tag=9),
    "compact: a reply's tag on a request's header": compact_request(tag=2),
    "compact: op past the projections": compact_request(op=5),
    "compact: layer below -1": compact_request(layer=-2),
    "compact: last_only neither 0 nor 1": compact_request(last_only=2),
    "compact: padded neither 0 nor 1": compact_request(padded=2),
    "compact: padded without the pads": compact_request(padded=1),
    "compact: pads when not padded": compact_request(pads=b"\0" * 16),
    "compact: fewer pads than rows of the batch": compact_request(padded=1, pads=b"\0" * 8),
    "compact: shape and payload disagree": compact_request(rows=3),
    "compact: truncated payload": compact_request()[:-1],
    "compact: a header that fits no layout": PREFIX.pack(5 | COMPACT, 0) + b"\x02" * 5,
    "compact: an empty header": PREFIX.pack(COMPACT, 0),
    "compact: a request's tag on a reply's header": compact_reply(tag=1),
    "compact: reply shape and payload disagree": compact_reply(cols=3),
    "compact: header over 64 MiB": PREFIX.pack((MAX_HEADER_BYTES + 1) | COMPACT, 0),
})


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        decode_frame(data)


@pytest.mark.parametrize(
    "kind, meta, tensors",
    [
        ("run", {}, {"z": torch.ones(2, dtype=torch.complex64)}),
        ("run", {"when": object()}, {}),
        ("run", {3: "a non-string key"}, {}),
        ("run", {"n": 2**70}, {}),
        (7, {}, {}),
    ],
    ids=["unsupported dtype", "meta not JSON", "non-string key", "integer past 64 bits", "kind not a string"],
)
def test_unencodable_frames_raise_protocol_error(kind, meta, tensors):
    with pytest.raises(ProtocolError):
        encode_frame(kind, meta, tensors)


# --- both channels run the model ---------------------------------------------------------------


@pytest.fixture(params=CHANNELS)
def channel(request):
    opened = process_channel() if request.param == "process" else open_channel("inprocess")
    yield opened
    opened.close()
    if request.param == "process":
        assert opened.process.poll() == 0  # a clean exit, not a kill


def test_device_forward_equals_the_in_process_model_and_counts_its_traffic(channel, model):
    hello, _ = channel.request("hello", {"config": model.config.to_dict()})
    assert hello["device"] == "cpu" and hello["torch"] == torch.__version__
    channel.counters.reset()

    sent = start_device(channel, model, batch=PROMPT.shape[0])
    steps, _ = greedy_steps(channel, model, decode_steps=3)

    assert steps[0].logits.shape == (2, PROMPT.shape[1], model.config.vocab_size)
    for step in steps:
        assert torch.equal(step.logits, step.expected)
    counters = channel.counters
    assert counters.round_trips == 3 + len(steps)  # hello, put_weights, new_cache, then one run per step
    assert counters.round_trips_by_kind == {"hello": 1, "put_weights": 1, "new_cache": 1, "run": len(steps)}
    assert counters.payload_bytes_sent == nbytes(sent) + sum(s.tokens.nbytes for s in steps)
    assert counters.payload_bytes_received == sum(s.logits.nbytes for s in steps)
    assert counters.frame_bytes_sent > counters.payload_bytes_sent + 16 * counters.round_trips
    assert counters.frame_bytes_received > counters.payload_bytes_received + 16 * counters.round_trips
    assert 0 < counters.device_compute_s < counters.wait_s
    assert counters.snapshot()["round_trips"] == counters.round_trips
    counters.reset()
    assert counters.snapshot() == {name: {} if name == "round_trips_by_kind" else 0 for name in counters.snapshot()}


def test_values_persist_across_segments_of_a_step_only(model):
    """A plan may leave a value on the device between two segments of one step; a new step starts empty."""
    with open_channel("inprocess") as channel:
        start_device(channel, model, batch=2)
        ops = whole_forward(model.config)
        split = ops.index(("attn_norm", 1))
        first = run_meta(0, 0, PROMPT, PROMPT_PAD, False, ops[:split], returns=[])
        second = run_meta(0, 0, PROMPT, PROMPT_PAD, False, ops[split:], returns=["logits"])
        _, nothing = channel.request("run", first, {"tokens": PROMPT})
        _, returned = channel.request("run", second, {})
        expected = model.forward(PROMPT, model.new_cache(2, 16), 0, torch.tensor(PROMPT_PAD), last_only=False)
        assert nothing == {} and torch.equal(returned["logits"], expected)

        next_step = run_meta(1, 5, PROMPT[:, :1], PROMPT_PAD, True, ops[split:], returns=["logits"])
        with pytest.raises(DeviceFailed, match="'x'"):  # step 0's residual stream is gone
            channel.request("run", next_step, {})


def test_inprocess_channel_copies_tensors_both_ways(model):
    with open_channel("inprocess") as channel:
        start_device(channel, model, batch=1)
        ops = whole_forward(model.config)[:1]
        tokens = torch.tensor([[5, 6]])
        meta = run_meta(0, 0, tokens, None, False, ops, ["x", "tokens"])
        _, returned = channel.request("run", meta, {"tokens": tokens})
        held = channel.endpoint.values
        assert returned["tokens"].data_ptr() not in (tokens.data_ptr(), held["tokens"].data_ptr())
        assert returned["x"].data_ptr() != held["x"].data_ptr()
        assert channel.endpoint.weights["embed"].data_ptr() != model.weights.embed.data_ptr()


def test_work_done_while_waiting_is_not_counted_and_its_error_keeps_the_stream_in_step(channel, model, monkeypatch):
    channel.request("hello", {"config": model.config.to_dict()})
    channel.counters.reset()
    order, clock = [], FakeClock()
    monkeypatch.setattr(channel_base, "time", clock)

    def overlapped():
        order.append("overlapped")
        clock.now += 0.05  # the enclave's work while the device serves the request

    meta, _ = channel.request("put_sealed", {}, {"b": torch.arange(4)}, while_waiting=overlapped)
    order.append("reply")
    assert order == ["overlapped", "reply"] and meta["sealed"] == 1
    counters = channel.counters
    assert counters.overlapped_s == 0.05 and counters.wait_s == 0.0 == counters.transfer_s

    def failing():
        raise ValueError("found while waiting")

    with pytest.raises(ValueError, match="found while waiting"):
        channel.request("get_sealed", {"keys": ["b"]}, while_waiting=failing)
    assert channel.alive and channel.counters.round_trips == 2  # the reply was read: the next request is in step
    _, blocks = channel.request("get_sealed", {"keys": ["b"]})
    assert torch.equal(blocks["b"], torch.arange(4))


def test_a_closed_channel_refuses_requests(channel):
    channel.close()
    channel.close()  # twice is fine
    assert not channel.alive
    with pytest.raises(DeviceDied, match="closed") as failure:
        channel.request("hello", {})
    assert_problem_and_fix(failure.value)


def test_unknown_channel_kind_is_refused():
    with pytest.raises(InvalidRequestError, match="unknown channel"):
        open_channel("carrier-pigeon")


# --- faults ------------------------------------------------------------------------------------


def assert_fresh_channel_works(model):
    with process_channel() as channel:
        hello, _ = channel.request("hello", {"config": model.config.to_dict()})
        assert hello["pid"] == channel.pid


def test_killed_device_raises_device_died_naming_the_signal(model):
    channel = process_channel()
    start_device(channel, model, batch=1)
    os.kill(channel.pid, signal.SIGKILL)
    with pytest.raises(DeviceDied, match="SIGKILL") as failure:
        meta = run_meta(0, 0, PROMPT[:1], None, True, whole_forward(model.config), ["logits"])
        channel.request("run", meta, {"tokens": PROMPT[:1]})
    assert_problem_and_fix(failure.value)
    assert not channel.alive and channel.process.poll() == -signal.SIGKILL
    with pytest.raises(DeviceDied, match="closed"):
        channel.request("hello", {"config": model.config.to_dict()})
    channel.close()
    assert_fresh_channel_works(model)


def test_hung_device_raises_device_timeout_and_is_stopped(model):
    channel = process_channel(timeout_s=1.0)
    channel.request("hello", {"config": model.config.to_dict()})
    os.kill(channel.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no progress for 1 s") as failure:
            channel.request("hello", {"config": model.config.to_dict()})
        assert 0.9 < time.monotonic() - started < 3.0
        assert_problem_and_fix(failure.value)
        assert not channel.alive and channel.process.poll() == -signal.SIGKILL
    finally:
        if channel.process.poll() is None:
            os.kill(channel.pid, signal.SIGCONT)
        channel.close()
    assert_fresh_channel_works(model)


@pytest.mark.parametrize("mode", ["garbage", "bad-json"])
def test_garbage_reply_raises_device_protocol_error(mode, model):
    channel = open_channel("process", command=[sys.executable, str(GARBAGE_DEVICE), "--mode", mode])
    with pytest.raises(DeviceProtocolError, match="malformed frame") as failure:
        channel.request("hello", {"config": model.config.to_dict()})
    assert_problem_and_fix(failure.value)
    assert not channel.alive and channel.process.poll() is not None
    channel.close()
    assert_fresh_channel_works(model)


def test_device_error_reply_raises_device_failed_and_the_channel_goes_on(model):
    with process_channel() as channel:
        start_device(channel, model, batch=1)
        tokens = PROMPT[:1, -1:]
        bad = run_meta(0, 0, tokens, None, True, [["embed", None], ["teleport", 0]], ["x"])
        with pytest.raises(DeviceFailed, match="unknown op 'teleport'") as failure:
            channel.request("run", bad, {"tokens": tokens})
        assert_problem_and_fix(failure.value)
        assert "ValueError" in failure.value.device_traceback
        assert channel.alive

        good = run_meta(0, 0, tokens, None, True, whole_forward(model.config), ["logits"])
        _, returned = channel.request("run", good, {"tokens": tokens})
        assert torch.equal(returned["logits"], model.forward(tokens, model.new_cache(1, 16), 0))


def test_device_answers_a_malformed_frame_with_an_error_and_stops():
    """The enclave's side of the contract: garbage in makes the device say why and exit, never hang."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        outcome = {}
        server = threading.Thread(target=lambda: outcome.update(code=serve(theirs, DeviceEndpoint())))
        server.start()
        ours.settimeout(10)
        reader = SocketReader(ours)
        assert read_frame(reader).kind == READY
        ours.sendall(MALFORMED["not JSON"])
        reply = read_frame(reader)
        server.join(timeout=10)
    assert reply.kind == ERROR and "malformed frame" in reply.meta["message"]
    assert outcome == {"code": EXIT_BAD_FRAME}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_fails_at_start_with_the_reason():
    with pytest.raises(DeviceDied, match="exited with code 2: .*finds no CUDA GPU"):
        open_channel("process", device="cuda")


def test_an_unreferenced_channel_leaves_no_device_process(model):
    channel = process_channel()
    process = channel.process
    del channel
    gc.collect()
    assert process.wait(timeout=10) == 0  # it saw EOF and exited by itself


def test_the_device_side_loads_no_enclave_or_planning_code():
    """The device process runs `secureinfer.device`: it must not even import the code that holds secrets (enclave)
    or decides what it is shown (plan), so no secret can reach it through a shared module."""
    probe = (
        "import sys, secureinfer.device.__main__; "
        "print(sorted(m for m in sys.modules if m.startswith(('secureinfer.enclave', 'secureinfer.plan', 'secureinfer.api'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
