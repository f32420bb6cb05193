"""The trusted runtime: holds every secret, runs the enclave's ops, and drives the device through the channel.

It implements the engine's `CausalModel` protocol, so the generation loop (and sampling) runs
here, over any plan. Weights placed on the device are public by the plan's construction; the
runtime keeps a reference to them (host-side staging, not enclave memory) to re-upload after a
device restart.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from typing import Callable

import torch
from torch import Tensor

from ..channel import Channel, DeviceError, DeviceProtocolError
from ..errors import IntegrityError, InvalidRequestError
from ..model.config import ModelConfig
from ..crypto import blind, native
from ..crypto.field import PackedInt8Weight, fastest_backend, out_in_layout, product_weight, signed_matmul
from ..crypto.freivalds import FreivaldsCheck, verify_products
from ..crypto.head_permutation import HeadPermutation
from ..crypto.kv_mixing import KVMixing
from ..crypto.pads import PadPool
from ..crypto.quant import QuantizedWeight, quantize_weight
from ..crypto.seal import SealStats
from ..model.kernels import StepContext, flat_weights, run_ops, store_projection, with_adapter
from ..model.llama import KVCache, LlamaWeights, rope_tables
from ..model.ops import OPS, weight_names
from ..plan import DEVICE, ENCLAVE, Plan
from ..plan.plan import LAST_POSITION_WEIGHTS
from .hardening import SecretMemory, make_undumpable
from .memory import EnclaveMemory
from .sealed_kv import SealedKVCache

KV_SEAL_BLOCK = 64  # positions per sealed KV block: one AES-GCM message per layer, kind and block
UPLOAD_CHUNK_BYTES = 64 << 20  # keeps each weight message, and the device's receive buffer, bounded
# Products Freivalds-checked together: a layer's four (each check alone is ~20 numpy operations, whatever its size).
CHECKS_PER_BATCH = 4


class StoredWeights:
    """Weight tensors by stored name: `name` float32, `name.q` int8 transposed, `name.scale`; quantized once."""

    def __init__(self, flat: dict[str, Tensor]):
        self.flat = flat
        self.quantized: dict[str, QuantizedWeight] = {}

    def __getitem__(self, stored: str) -> Tensor:
        base, _, suffix = stored.rpartition(".")
        if suffix not in ("q", "scale"):
            return self.flat[stored]
        if base not in self.quantized:
            self.quantized[base] = quantize_weight(self.flat[base])
        return self.quantized[base].weight_t if suffix == "q" else self.quantized[base].scale


class EnclaveRuntime:
    def __init__(
        self,
        config: ModelConfig,
        weights: LlamaWeights,
        plan: Plan,
        open_device: Callable[[], Channel],
        *,
        adapter: dict[str, Tensor] | None = None,
        epc_bytes: int | None = None,
        harden: bool = True,
        verify_repetitions: int = 0,
        pad_batch_rows: int = 32,
        pad_background: bool = True,
        seal_kv: bool = False,
    ):
        self.config = config
        self.plan = plan
        self.memory = EnclaveMemory(epc_bytes)
        self.process_hardening = make_undumpable() if harden else {"dumpable": True, "reason": "hardening off"}
        self.secret = SecretMemory(enabled=harden)
        stored = StoredWeights(flat_weights(weights) | (adapter or {}))
        # Each blinded int8 weight is cut by output columns: the device multiplies the first `device_columns` (and
        # the enclave pads and checks those), the enclave the rest, in the clear, while the device works.
        device_columns = {
            f"{name}.q": plan.device_columns(stored[f"{name}.q"].shape[1]) for name in plan.blinded_weights
        }

        def device_part(name: str) -> Tensor:  # a view: the whole tensor, or a blinded weight's device columns
            return stored[name][:, : device_columns[name]] if name in device_columns else stored[name]

        def enclave_part(name: str) -> Tensor:
            # An int8 projection the enclave multiplies in the clear is laid out [out, in] for the int8 route, as
            # `product_weight` lays out the own columns (but never packed, which would leave secret memory): the
            # VNNI loop reads only that layout, and secureinfer-enclave-qkv-ffn decoded ~35% faster with it.
            # The route is asked for only here: asked by every plan, a `plain` made first at more threads fixed the
            # process's route before a blinded scheme made at its own threads could (`fastest_backend`).
            part = device_part(name)
            clear_int8 = name.endswith(".q") and name not in device_columns and part.dtype == torch.int8
            return out_in_layout(part) if clear_int8 and fastest_backend() == "int8" else part

        enclave_names = plan.stored_weights(ENCLAVE)
        enclave_aliases = self._tied_aliases(enclave_names)
        self.weights = {
            name: self.memory.hold(f"weight:{name}", self.secret.copy(enclave_part(name)))
            for name in enclave_names
            if name not in enclave_aliases
        }
        self.weights.update({alias: self.weights[target] for alias, target in enclave_aliases.items()})
        # The enclave's columns stay int8 (enclave memory is what is scarce), as the int8 route reads them, in secret
        # memory; a packed one (the LM head's) in oneDNN's own memory instead, which is safe because a blinded weight
        # is the public model's (the device holds its other columns).
        self._own_weights = {}
        for name, columns in device_columns.items():
            if columns < stored[name].shape[1]:
                own = product_weight(stored[name][:, columns:], "int8")
                if not isinstance(own, PackedInt8Weight):
                    own = self.secret.copy(own)  # stays laid out [out, in]
                self._own_weights[name.removesuffix(".q")] = own
                self.memory.observe(f"weight:{name}.own", own.nbytes)
        self._device_weights = {name: device_part(name).contiguous() for name in plan.stored_weights(DEVICE)}
        self.head_key: HeadPermutation | None = None
        self.kv_mixing: KVMixing | None = None
        if plan.head_key == "mixed":
            self.kv_mixing = KVMixing(config, allocate=self.secret.empty)
            self.memory.observe("kv_mixing", self.kv_mixing.nbytes)
        elif plan.head_key is not None:  # drawn once per runtime: re-keying means re-uploading the weights
            self.head_key = HeadPermutation.draw(config, allocate=self.secret.empty)
            self.memory.hold("head_key", self.head_key.permutations)
            self._device_weights = self.head_key.fold_into(self._device_weights, fold_output=plan.head_key == "fold")
        blinded = plan.blinded_weights
        self.pads = PadPool(
            {name: self.weights[f"{name}.q"] for name in blinded}, pad_batch_rows, background=pad_background
        )
        # The blinded product after each, in execution order (after the LM head, the next token's first), and pads
        # taken for it while the device computes this one: that take is then off the critical path.
        self._next_blinded = dict(zip(blinded, [*blinded[1:], *blinded[:1]]))
        self._first_blinded = blinded[0] if blinded else None
        self._pads_ahead: dict[str, tuple[Tensor, Tensor]] = {}
        self.checks = self._integrity_checks(blinded, verify_repetitions)
        self._unchecked: list[tuple[str, Tensor, Tensor]] = []  # (weight, padded input, device product)
        # The rescale's view of each blinded weight's scales (its float64 scale is kept once made).
        self._quantized = {
            name: QuantizedWeight(self.weights[f"{name}.q"], self.weights[f"{name}.scale"]) for name in blinded
        }
        self.integrity = {"repetitions": verify_repetitions, "checked": 0, "macs": 0, "seconds": 0.0}
        self.seal_kv = seal_kv
        self._kv_buffers: tuple[Tensor, Tensor] | None = None  # the enclave KV cache's memory, kept for the next one
        self._kv_user: weakref.ref | None = None  # the cache now using it
        self.sealed_cache: SealedKVCache | None = None
        self.sealed_totals = SealStats()  # of the caches already replaced; the report adds the live one
        self.rope = rope_tables(config, config.max_position_embeddings)
        self._open_device = open_device
        self.channel: Channel | None = None
        self.step = 0
        self.enclave_compute_s = 0.0
        self.own_columns_s = 0.0  # the part of enclave_compute_s spent on its own columns, while the device works
        self.pads_ahead_s = 0.0  # and the part spent taking the next product's pads, while the device works
        self.start_device()

    def _integrity_checks(self, blinded: list[str], repetitions: int) -> dict:
        if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 0:
            raise InvalidRequestError(f"verify_repetitions={repetitions!r} is invalid", "use an integer >= 0 (0: no checks)")
        if not repetitions:
            return {}
        return {name: FreivaldsCheck(self.weights[f"{name}.q"], repetitions) for name in blinded}

    def _tied_aliases(self, names: list[str]) -> dict[str, str]:
        """With tied embeddings on one side, the LM head is the embedding tensor: held and sent once."""
        tied = self.config.tie_word_embeddings and {"embed", "lm_head"} <= set(names)
        return {"lm_head": "embed"} if tied else {}

    def start_device(self) -> None:
        """Open a fresh device and give it the public weights its plan places there."""
        channel = self._open_device()
        self.device_info, _ = channel.request("hello", {"config": self.config.to_dict()}, {})
        aliases = self._tied_aliases(list(self._device_weights))
        batch, batch_bytes = {}, 0
        for name, tensor in self._device_weights.items():
            if name in aliases:
                continue
            batch[name] = tensor
            batch_bytes += tensor.numel() * tensor.element_size()
            if batch_bytes >= UPLOAD_CHUNK_BYTES:
                channel.request("put_weights", {}, batch)
                batch, batch_bytes = {}, 0
        if batch or aliases:
            channel.request("put_weights", {"aliases": aliases}, batch)
        channel.counters.reset()  # per-token counters start after set-up
        self.channel = channel

    def restart_device(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(DeviceError):  # a dead or hung device cannot answer `close`
                self.channel.close()
        self.start_device()

    def close(self) -> None:
        self.pads.close()
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def new_cache(self, batch_size: int, max_len: int) -> KVCache | None:
        max_len = min(max_len, self.config.max_position_embeddings)
        if self.plan.device_segments:
            layers = self.plan.attention_layers_on(DEVICE)
            self.channel.request("new_cache", {"batch": batch_size, "max_len": max_len, "layers": layers}, {})
        if not self.plan.attention_layers_on(ENCLAVE):
            self.memory.release("kv_cache")
            return None
        self._retire_sealed_cache()
        resident = self._kv_resident_positions(batch_size, max_len)
        if resident is not None:
            self.sealed_cache = SealedKVCache(
                self.config, batch_size, max_len, resident, KV_SEAL_BLOCK, self._put_sealed, self._get_sealed, self.secret
            )
            self.memory.observe("kv_cache", self.sealed_cache.resident_bytes)
            return self.sealed_cache
        cache = KVCache.__new__(KVCache)  # the conversation's keys and values live in secret memory
        shape = (self.config.num_layers, batch_size, self.config.num_kv_heads, max_len, self.config.head_dim)
        cache.k, cache.v = self._kv_memory(shape)
        cache.max_len = max_len
        self._kv_user = weakref.ref(cache)
        self.memory.observe("kv_cache", 2 * cache.k.numel() * cache.k.element_size())
        return cache

    def _kv_memory(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Zeroed keys and values of `shape`, in the last cache's secret memory when it is large enough and that
        cache is gone. A fresh memfd_secret mapping faults in every page on first touch, at ~25 us a page here:
        74 ms to zero a 512-token chat's cache, where zeroing memory already mapped takes ~2 ms."""
        count = math.prod(shape)
        previous_gone = self._kv_user is None or self._kv_user() is None
        if self._kv_buffers is None or self._kv_buffers[0].numel() < count or not previous_gone:
            self._kv_buffers = (self.secret.empty((count,), torch.float32), self.secret.empty((count,), torch.float32))
        k, v = (buffer[:count].view(shape).zero_() for buffer in self._kv_buffers)
        return k, v

    def _kv_resident_positions(self, batch: int, max_len: int) -> int | None:
        """With sealing on, the KV positions that fit what the EPC budget leaves; None when all of them fit."""
        if not self.seal_kv or self.memory.budget_bytes is None:
            return None
        per_position = 2 * len(self.plan.attention_layers_on(ENCLAVE)) * batch * self.config.kv_size * 4
        spare = self.memory.budget_bytes - (self.memory.current_bytes - self.memory.held_bytes("kv_cache"))
        positions = spare // per_position // KV_SEAL_BLOCK * KV_SEAL_BLOCK
        return None if positions >= max_len else max(KV_SEAL_BLOCK, positions)

    def _put_sealed(self, blocks: dict[str, Tensor]) -> None:
        self.channel.request("put_sealed", {}, blocks)

    def _get_sealed(self, keys: list[str]) -> dict[str, Tensor]:
        return self.channel.request("get_sealed", {"keys": keys}, {})[1]

    def forward(
        self, tokens: Tensor, cache: KVCache | None, start: int, pad: Tensor | None = None, last_only: bool = True
    ) -> Tensor:
        self.step += 1
        self._unchecked.clear()  # a step that failed part-way leaves nothing to check
        batch, length = tokens.shape
        ctx = StepContext.create(self.config, self.rope, start, batch, length, pad, last_only)
        values: dict[str, Tensor] = {"tokens": tokens}
        for segment in self.plan.segments:
            if segment.transform == "blinded":
                self._blinded_projection(segment, values, ctx)
                continue
            if segment.side == ENCLAVE:
                began = time.perf_counter()
                run_ops(segment.ops, values, self.weights, cache, ctx)
                self.enclave_compute_s += time.perf_counter() - began
                self.memory.observe("activations", sum(v.numel() * v.element_size() for v in values.values()))
                continue
            sends = {name: values[name] for name in segment.sends}
            layer = segment.keyed_attention
            if self.kv_mixing is not None and layer is not None:
                began = time.perf_counter()
                sends["q"], sends["k"], sends["v"] = self.kv_mixing.mix(values["q"], values["k"], values["v"], layer)
                self.enclave_compute_s += time.perf_counter() - began
            _, returned = self.channel.request("run", self._run_meta(ctx, segment.ops, segment.returns), sends)
            values.update(returned)
            if layer is not None:
                began = time.perf_counter()
                if self.kv_mixing is not None:
                    values["a"] = self.kv_mixing.unmix_attention(values["a"], layer)
                else:
                    values["a"] = self.head_key.unpermute_attention(values["a"], layer)
                self.enclave_compute_s += time.perf_counter() - began
        self._check_products()  # the last product's check has nothing to overlap: no logits before it passes
        return values["logits"]

    def _run_meta(self, ctx: StepContext, ops: list, returns: list[str], blinded: bool = False) -> dict:
        return {
            "step": self.step,
            "start": ctx.start,
            "batch": ctx.batch,
            "length": ctx.length,
            "pad": None if ctx.pad is None else ctx.pad.tolist(),
            "last_only": ctx.last_only,
            "ops": ops,
            "returns": returns,
            "blinded": blinded,
        }

    def _blinded_projection(self, segment, values: dict[str, Tensor], ctx: StepContext) -> None:
        """Quantize, pad with fresh (r, u), let the device multiply, unpad and rescale: the device sees only x + r."""
        began, stalled_before = time.perf_counter(), self.pads.stats.stall_s
        ((op, layer),) = segment.ops
        (name,) = weight_names(op, layer)
        x = values[OPS[op].reads[0]]
        positions = x.numel() // x.shape[-1]
        r, u = self._take_pads(name, positions)
        rows, row_scale, padded = blind.blind(x, r)
        # Pads generated inside `take` are offline work, reported apart in the pad stats.
        self.enclave_compute_s += time.perf_counter() - began - (self.pads.stats.stall_s - stalled_before)
        own_weight, own = self._own_weights.get(name), []
        check_now = len(self._unchecked) >= CHECKS_PER_BATCH

        def while_device_multiplies() -> None:
            began, stalled_before = time.perf_counter(), self.pads.stats.stall_s
            if own_weight is not None:  # first: the unpad below waits for it, the rest does not
                # rows: the quantized activations, |q| <= 65535; the int8 route the own columns are laid out for
                own.append(signed_matmul(rows, own_weight, "int8"))
                self.own_columns_s += time.perf_counter() - began
            following = self._next_blinded[name]
            # As many positions as this product's, or one per row for the next token's first product (a decode
            # step) and for the LM head of a step that keeps the last position only; a wrong guess costs only
            # unused pads.
            one_per_row = following == self._first_blinded or (ctx.last_only and following in LAST_POSITION_WEIGHTS)
            took = time.perf_counter()
            self._pads_ahead[following] = self._pool_pads(following, ctx.batch if one_per_row else positions)
            self.pads_ahead_s += time.perf_counter() - took
            self.enclave_compute_s += time.perf_counter() - began - (self.pads.stats.stall_s - stalled_before)
            if check_now:
                self._check_products()

        _, returned = self.channel.request(
            "run", self._run_meta(ctx, segment.ops, ["y"], blinded=True), {"v": padded},
            while_waiting=while_device_multiplies,
        )  # fmt: skip
        began = time.perf_counter()
        y = returned.get("y")
        malformed = not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != u.shape
        if name in self.checks:
            self._unchecked.append((name, padded, y))
            if malformed:  # cannot even be unpadded: fail it now
                self._check_products()
        if malformed:
            raise DeviceProtocolError(
                f"the device answered the {name} product with {_describe(y)} instead of int64 {list(u.shape)}"
            )
        # The enclave's columns follow the device's (see __init__).
        product = blind.unblind(y, u, own[0] if own else None, row_scale, self._quantized[name])
        product = product.view(*x.shape[:-1], -1)
        store_projection(op, values, with_adapter(product, x, self.weights, name), ctx)
        self.enclave_compute_s += time.perf_counter() - began

    def _take_pads(self, name: str, positions: int) -> tuple[Tensor, Tensor]:
        """`positions` fresh pads for `name`: those taken ahead for it if they are as many, else from the pool (pads
        taken ahead for another count are dropped unused: each pad pads one product at most)."""
        ahead = self._pads_ahead.pop(name, None)
        if ahead is not None and ahead[0].shape[0] == positions:
            return ahead
        return self._pool_pads(name, positions)

    def _pool_pads(self, name: str, positions: int) -> tuple[Tensor, Tensor]:
        pads = self.pads.take(name, positions)
        self.memory.observe("pads", self.pads.held_bytes())  # the pool is enclave memory too
        return pads

    def _check_products(self) -> None:
        """Freivalds-check the products received since the last check, raising IntegrityError on a wrong one.

        They are checked CHECKS_PER_BATCH at a time, as one batch (`verify_products`, as sound as one by one),
        while the device computes the next product (`while_waiting`), off the critical path, and `forward`
        checks the rest before it returns logits, so a tampered product never reaches a token. Until then a
        wrong y only feeds later blinded inputs, which are one-time padded whatever they hold.
        """
        if not self._unchecked:
            return
        began = time.perf_counter()
        unchecked, self._unchecked = self._unchecked, []
        if not verify_products([(self.checks[name], padded, y) for name, padded, y in unchecked]):
            for name, padded, y in unchecked:  # name the wrong product: its own check fails on the same s
                self.checks[name].check(padded, y, f"{name} (step {self.step})")
            raise IntegrityError(  # not reached: a batch fails only if one of its products does
                f"the device returned a wrong product in step {self.step}", "restart the device, or replace it"
            )
        self.integrity["checked"] += len(unchecked)
        self.integrity["macs"] += sum(self.checks[name].macs(padded.shape[0]) for name, padded, _ in unchecked)
        self.integrity["seconds"] += time.perf_counter() - began

    def stats(self) -> dict:
        counters = self.channel.counters.snapshot() if self.channel else {}
        return {
            "scheme": self.plan.name,
            "device": self.device_info,
            "steps": self.step,
            "channel": counters,
            "time": {
                "enclave_compute_s": self.enclave_compute_s,
                "enclave_own_columns_s": self.own_columns_s,
                "enclave_pads_ahead_s": self.pads_ahead_s,
                "device_compute_s": counters.get("device_compute_s", 0.0),
                "transfer_s": counters.get("transfer_s", 0.0),
            },
            "memory": self.memory.report(),
            "pads": vars(self.pads.stats) | {"held_bytes": self.pads.held_bytes()},
            "hardening": {**self.process_hardening, **self.secret.report()},
            "integrity": dict(self.integrity),
            "compiled_kernels": native.statuses(),
            "sealed_kv": self._sealing_report(),
        }

    def _retire_sealed_cache(self) -> None:
        if self.sealed_cache is not None:
            self.sealed_totals = self.sealed_totals + self.sealed_cache.sealer.seal_stats
        self.sealed_cache = None

    def _sealing_report(self) -> dict:
        """Sealing over every conversation since the last reset; resident_positions of the latest."""
        cache = self.sealed_cache
        totals = self.sealed_totals + (cache.sealer.seal_stats if cache else SealStats())
        return {"enabled": self.seal_kv, "resident_positions": cache.capacity if cache else None} | vars(totals)

    def reset_stats(self) -> None:
        self.enclave_compute_s = self.own_columns_s = self.pads_ahead_s = 0.0
        self.pads.stats = type(self.pads.stats)()
        self.integrity.update(checked=0, macs=0, seconds=0.0)
        self.sealed_totals = SealStats()
        if self.sealed_cache is not None:
            self.sealed_cache.sealer.seal_stats = SealStats()
        if self.channel:
            self.channel.counters.reset()


def _describe(value: object) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, Tensor) else "no tensor y"


__all__ = ["EnclaveRuntime"]
