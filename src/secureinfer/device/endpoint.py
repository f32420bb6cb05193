"""The untrusted device: the state it holds and the messages it serves.

It holds only what the enclave sends (public config, the weights its plan places here, the inputs
of each `run`) and what it computes from them (the KV cache of its attention layers, the values of
the current step). Every message in and out passes through `dispatch`, which is where the view is
recorded: both channels end here, so the view is complete by construction.

Messages (request kind: meta -> reply meta):
  hello        {"config": ModelConfig.to_dict()}          -> {"pid", "device", "torch"}
  put_weights  {"aliases": {alias: target}} + weights       -> {"weights": count held}
  new_cache    {"batch", "max_len", "layers": [int]}        -> {}
  run          {"step", "start", "batch", "length", "pad", "last_only", "ops", "returns"} + inputs
               -> {} + the returned values
  put_sealed   {} + sealed blocks by key (uint8 ciphertext, nonce) -> {"sealed": count held}
  get_sealed   {"keys": [str]}                             -> {} + the blocks held under those keys
  close        {}                                           -> {} (the view is written)
Every ok reply carries "compute_s"; a failure replies kind "error" with "message" and "traceback".
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Callable

import torch
from torch import Tensor

from ..channel.wire import ERROR, OK, Tensors
from ..crypto.field import PackedInt8Weight, keep_float32_exact, product_weight
from ..errors import SecureInferError
from ..model.config import ModelConfig
from ..model.kernels import KERNELS, StepContext, blinded_product, run_ops
from ..model.llama import KVCache, rope_tables
from .recorder import HeldState, ViewRecorder

Meta = dict[str, Any]
Reply = tuple[str, Meta, Tensors]


class DeviceUnavailable(SecureInferError):
    """The requested torch device does not exist on this machine."""


def torch_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"device {name!r} is not supported", "use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {name!r} was asked for, but torch {torch.__version__} finds no CUDA GPU here",
            "use device cpu, or run on a machine with a CUDA GPU and a CUDA build of torch",
        )
    return device


class DeviceEndpoint:
    def __init__(self, device: str = "cpu", recorder: ViewRecorder | None = None):
        self.device = torch_device(device)
        if self.device.type == "cuda":
            keep_float32_exact()  # the blinded products' float32 route on the GPU
        self.recorder = recorder
        self.config: ModelConfig | None = None
        self.rope: tuple[Tensor, Tensor] | None = None
        self.weights: Tensors = {}
        # What the kernels read: the weights as held, except that an int8 weight the field product reads is
        # replaced by a copy packed or laid out for that product (`product_weight`): converting every weight on
        # every call would cost more than the product itself.
        self.compute_weights: dict[str, Tensor | PackedInt8Weight] = {}
        self.aliases: dict[str, str] = {}  # alias -> the name it shares a tensor with (tied embeddings)
        self.cache: KVCache | None = None
        self.cache_layers: list[int] = []
        self.positions_written = 0  # KV positions [0, n) hold something
        self.values: Tensors = {}  # the current step's values: later segments of a step may read them
        self.sealed: Tensors = {}  # enclave KV blocks sealed with AES-GCM: opaque here, returned on request
        self.step: int | None = None
        self.closed = False
        self._handlers: dict[str, Callable[[Meta, Tensors], tuple[Meta, Tensors]]] = {
            "hello": self._hello,
            "put_weights": self._put_weights,
            "new_cache": self._new_cache,
            "run": self._run,
            "put_sealed": self._put_sealed,
            "get_sealed": self._get_sealed,
            "close": lambda meta, tensors: ({}, {}),
        }

    def info(self) -> Meta:
        # The loaded secureinfer modules let an auditor check that no enclave code runs here.
        modules = sorted(name for name in sys.modules if name.startswith("secureinfer"))
        return {"pid": os.getpid(), "device": str(self.device), "torch": torch.__version__, "modules": modules}

    def dispatch(self, kind: str, meta: Meta, tensors: Tensors) -> Reply:
        """Serve one message. Any exception becomes an error reply: the device keeps serving."""
        if self.recorder:
            self.recorder.record("in", kind, meta, tensors)
        started = time.perf_counter()
        try:
            if kind not in self._handlers:
                raise ValueError(f"unknown message kind {kind!r}; expected one of {sorted(self._handlers)}")
            reply_meta, reply_tensors = self._handlers[kind](meta, tensors)
            reply: Reply = (OK, {**reply_meta, "compute_s": time.perf_counter() - started}, reply_tensors)
        except Exception as error:
            reply = (ERROR, {"message": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}, {})
        if self.recorder:
            self.recorder.record("out", *reply)
        if kind == "close":
            self.close()  # after recording the reply, so the view holds the close exchange too
        return reply

    def close(self) -> None:
        """Write the recorded view, once. Called on `close`, and by the server when the enclave vanishes."""
        if self.closed:
            return
        self.closed = True
        if self.recorder:
            self.recorder.close(self.held_state())

    def held_state(self) -> HeldState:
        kv = {}
        if self.cache is not None:
            written = slice(0, self.positions_written)
            kv = {"kv.k": self.cache.k[..., written, :], "kv.v": self.cache.v[..., written, :]}
        return HeldState(
            device=self.info(),
            config=None if self.config is None else self.config.to_dict(),
            weights={name: w for name, w in self.weights.items() if name not in self.aliases},
            aliases=dict(self.aliases),
            kv=kv,
            kv_layers=list(self.cache_layers),
            values=dict(self.values),
            step=self.step,
            sealed=dict(self.sealed),
        )

    def _require_hello(self) -> ModelConfig:
        if self.config is None:
            raise RuntimeError("send hello (with the model config) first")
        return self.config

    def _hello(self, meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
        """Start a session: a hello forgets everything held before it."""
        config = ModelConfig.from_dict(meta["config"])
        cos, sin = rope_tables(config, config.max_position_embeddings)
        self.config, self.rope = config, (cos.to(self.device), sin.to(self.device))
        self.weights, self.compute_weights, self.aliases, self.values, self.step = {}, {}, {}, {}, None
        self._drop_cache()
        return self.info(), {}

    def _put_weights(self, meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
        self._require_hello()
        for name, tensor in tensors.items():
            weight = compute = tensor.to(self.device)
            if name.endswith(".q") and weight.dtype == torch.int8:
                compute = product_weight(weight)
                if isinstance(compute, Tensor) and compute.dtype == weight.dtype:  # the same values laid out [out, in]
                    weight = compute  # so hold that one alone (a 1.4B model's blinded weights: 1.3 GB, not 2.6)
            self.weights[name], self.compute_weights[name] = weight, compute
            self.aliases.pop(name, None)
        for alias, target in meta.get("aliases", {}).items():
            if target not in self.weights:
                raise KeyError(f"alias {alias!r} names weight {target!r}, which the device does not hold")
            self.weights[alias] = self.weights[target]
            self.compute_weights[alias] = self.compute_weights[target]
            self.aliases[alias] = self.aliases.get(target, target)
        return {"weights": len(self.weights)}, {}

    def _new_cache(self, meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
        config = self._require_hello()
        self._drop_cache()
        layers = [int(layer) for layer in meta["layers"]]
        if layers:
            with self._allocating_on_device():
                self.cache = KVCache(config, int(meta["batch"]), int(meta["max_len"]))
            self.cache_layers = layers
        return {}, {}

    def _drop_cache(self) -> None:
        self.cache, self.cache_layers, self.positions_written, self.sealed = None, [], 0, {}

    def _put_sealed(self, meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
        self.sealed.update(tensors)
        return {"sealed": len(self.sealed)}, {}

    def _get_sealed(self, meta: Meta, tensors: Tensors) -> tuple[Meta, Tensors]:
        return {}, {key: self.sealed[key] for key in meta["keys"] if key in self.sealed}

    def _run(self, meta: Meta, inputs: Tensors) -> tuple[Meta, Tensors]:
        config = self._require_hello()
        ops = [(op, layer) for op, layer in meta["ops"]]
        self._check_ops(ops)
        if meta["step"] != self.step:
            self.values, self.step = {}, meta["step"]
        if self.device.type == "cpu":  # a received tensor is already here: skip a call per tensor
            self.values.update(inputs)
        else:
            self.values.update({name: tensor.to(self.device) for name, tensor in inputs.items()})
        observe = self.recorder.record_held if self.recorder else None
        if meta.get("blinded"):
            ((op, layer),) = ops  # a blinded segment is one projection: the enclave unpads between them
            blinded_product(self.values, self.compute_weights, op, layer)
            if observe:
                observe(op, layer, {"y": self.values["y"]})
        else:
            start, length, pad = meta["start"], meta["length"], meta.get("pad")
            with self._allocating_on_device():
                ctx = StepContext.create(
                    config, self.rope, start, meta["batch"], length,
                    None if pad is None else torch.tensor(pad, dtype=torch.int64), meta["last_only"],
                )  # fmt: skip
            run_ops(ops, self.values, self.compute_weights, self.cache, ctx, observe)
            if any(op == "attention" for op, _ in ops):
                self.positions_written = max(self.positions_written, start + length)
        missing = [name for name in meta["returns"] if name not in self.values]
        if missing:
            raise KeyError(f"asked to return {missing}, which no op produced and no input carried")
        if self.device.type == "cpu":  # the wire sends a strided tensor's bytes in order, as `contiguous` would
            return {}, {name: self.values[name] for name in meta["returns"]}
        returned = {name: self.values[name].to("cpu").contiguous() for name in meta["returns"]}
        torch.cuda.synchronize(self.device)  # so compute_s covers kernels whose results stay here
        return {}, returned

    def _allocating_on_device(self) -> contextlib.AbstractContextManager:
        """Make torch factory calls (the KV cache, positions, masks) allocate on this device.

        Only needed for CUDA: the default device mode costs ~6 us a call, a lot for a decode step.
        """
        return torch.device(self.device) if self.device.type != "cpu" else contextlib.nullcontext()

    def _check_ops(self, ops: list[tuple[str, int | None]]) -> None:
        for op, layer in ops:
            if op == "attention":
                if layer not in self.cache_layers:
                    raise ValueError(f"attention of layer {layer}: new_cache gave the device layers {self.cache_layers}")
            elif op not in KERNELS:
                raise ValueError(f"unknown op {op!r}; the device runs attention and {sorted(KERNELS)}")
