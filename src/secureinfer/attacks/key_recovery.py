"""Key recovery from weights (ArrowMatch-style, after "Game of Arrows", USENIX Sec'25): recover a KV-Shield
permutation by matching the permuted attention weights the device holds to the public base checkpoint.

KV-Shield folds one permutation of head_dim per layer and KV head into the rows of W_k, W_v and the W_q
of that head's GQA group (and, in its fold mode, into W_o's input columns). A permutation moves rows but
does not change them, so every device row has an exact copy among the public rows of its head. Cosine
similarity finds it whatever the per-row scale (int8 quantization, a folded 1/sqrt(d)), and averaging the
similarities of every matrix that carries the same permutation before a one-to-one assignment outvotes
quantization noise. Weights mixed by an orthogonal matrix instead (KV-Cloak-style) have no such copies: the
assignment is then a guess, and the margin between best and second-best matches (`confidence`) says so.

Convention: `permutations[layer, kv_head, j]` is the public row (within the head) that device position j
holds, so a device tensor is `public[..., permutations[layer, kv_head]]` along head_dim; the KV cache the
device computes is the plain cache permuted the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..model.config import ModelConfig
from ..model.kernels import flat_weights
from ..model.llama import Llama, rope_inverse_frequencies
from .kv_inversion import KV_METHOD, invert_kv_cache
from .view import ConversationRecovery, DeviceView

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Mean margin between a device row's best and second-best public match above which a head's key counts as
# found. Measured on SmolLM2 (tests/test_key_recovery.py): permuted weights give >= 0.57 on every head, fp32
# or int8; weights mixed by a random orthogonal matrix give <= 0.08. Random rows in a small head (the tiny
# test model's 16 dims) already reach ~0.17 by chance, so the bar is for heads of 64 dims or so.
CONFIDENT_MARGIN = 0.2


@dataclass
class KeyRecoveryResult:
    permutations: Tensor  # int64 [layers, kv_heads, head_dim]; see the module docstring for the convention
    confidence: Tensor  # float32 [layers, kv_heads]: mean over device rows of (best - second-best similarity)
    similarity: Tensor  # float32 [layers, kv_heads]: mean similarity of the assigned matches (1 = exact copies)
    respects_pairs: Tensor  # bool [layers, kv_heads]: the key moves RoPE pairs (i, i + head_dim/2) as ordered units
    sources: tuple[str, ...]  # the projections whose rows (o_proj: columns) served as evidence
    method: str
    fraction_recovered: float | None = None  # exactly right positions / all positions, when scored

    @property
    def layer_confidence(self) -> Tensor:
        """float32 [layers]: the weakest head's confidence in each layer."""
        return self.confidence.amin(dim=1)

    @property
    def confident(self) -> bool:
        """Whether every head's match stands clear of the alternatives; False means the key is a guess."""
        return bool((self.confidence >= CONFIDENT_MARGIN).all())


def attention_weights(weights: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The q/k/v/o projections under transformers' names (`model.layers.{i}.self_attn.k_proj.weight`) as
    float32 [out, in], from transformers' names or our fused layout (`layers.{i}.wqkv` with rows [q; k; v],
    `layers.{i}.wo`, either one possibly int8 as `.q` [in, out] with an optional per-row `.scale`).

    An int8 weight held without its scale stays in integer units: cosine matching does not need the scale.
    """
    out: dict[str, Tensor] = {}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for projection in PROJECTIONS:
            if (name := f"{prefix}{projection}.weight") in weights:
                out[name] = weights[name].float()
        if (wqkv := _fused_weight(weights, f"layers.{layer}.wqkv", config.q_size + 2 * config.kv_size)) is not None:
            parts = wqkv.split([config.q_size, config.kv_size, config.kv_size])
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out.setdefault(f"{prefix}{projection}.weight", part)
        if (wo := _fused_weight(weights, f"layers.{layer}.wo", config.hidden_size)) is not None:
            out.setdefault(f"{prefix}o_proj.weight", wo)
    return out


def _fused_weight(weights: Mapping[str, Tensor], name: str, rows: int) -> Tensor | None:
    """The fused weight as float32 [rows, in]; None if absent, or if only some of its output rows are held (a
    device given a column share of a blinded product: such weights are public and carry no key anyway)."""
    if name in weights:
        weight = weights[name].float()
    elif f"{name}.q" in weights:
        weight = weights[f"{name}.q"].float().t()
        if f"{name}.scale" in weights:
            weight = weight * weights[f"{name}.scale"].float()[:, None]
    else:
        return None
    return weight if weight.shape[0] == rows else None


def recover_permutations(
    device_weights: Mapping[str, Tensor],
    public_weights: Mapping[str, Tensor],
    config: ModelConfig,
    *,
    pair_units: bool = False,
    truth: Tensor | None = None,
) -> KeyRecoveryResult:
    """Recover the per-(layer, KV head) permutation of head_dim folded into the device's attention weights.

    `pair_units=False` assigns all head_dim positions freely (a key applied after RoPE, in the enclave, can be
    any permutation); `pair_units=True` assigns RoPE pairs (i, i + head_dim/2) as ordered units, all that a key
    the device's RoPE runs under (with a permuted frequency table) can be, which halves the ways to go wrong.
    `truth` (laid out as the result's `permutations`) scores the result.
    """
    device = attention_weights(device_weights, config)
    public = attention_weights(public_weights, config)
    shape = (config.num_layers, config.num_kv_heads)
    permutations = torch.empty(*shape, config.head_dim, dtype=torch.int64)
    confidence, similarity = torch.empty(shape), torch.empty(shape)
    used: set[str] = set()
    for layer in range(config.num_layers):
        for kv_head in range(config.num_kv_heads):
            evidence = _evidence(device, public, config, layer, kv_head)
            if not evidence:
                raise ValueError(f"layer {layer}: the device and public weights share no q/k/v projection by name")
            used.update(evidence)
            scores = torch.stack(list(evidence.values())).mean(dim=0)
            assign = _assign_pairs if pair_units else _assign_free
            permutations[layer, kv_head], confidence[layer, kv_head], similarity[layer, kv_head] = assign(scores)

    half = config.head_dim // 2
    respects_pairs = (permutations[..., half:] == permutations[..., :half] + half).all(dim=-1)
    sources = tuple(p for p in PROJECTIONS if p in used)
    unit = f"RoPE pair units over {half}" if pair_units else f"free over {config.head_dim} dims"
    columns = ", o_proj input columns" if "o_proj" in sources else ""
    method = (
        f"cosine matching of device {'/'.join(p for p in sources if p != 'o_proj')} rows{columns} to the public "
        f"weights, averaged over the projections that share a key, one-to-one assignment per (layer, KV head), {unit}"
    )
    result = KeyRecoveryResult(permutations, confidence, similarity, respects_pairs, sources, method)
    if truth is not None:
        result.fraction_recovered = (permutations == truth).float().mean().item()
    return result


def _evidence(
    device: dict[str, Tensor], public: dict[str, Tensor], config: ModelConfig, layer: int, kv_head: int
) -> dict[str, Tensor]:
    """Cosine similarity [device position, public position] of every matrix that carries this head's key."""
    dim, group = config.head_dim, config.num_heads // config.num_kv_heads
    prefix = f"model.layers.{layer}.self_attn."
    query_heads = range(kv_head * group, (kv_head + 1) * group)

    def similarity(device_rows: Tensor, public_rows: Tensor, heads: Sequence[int]) -> Tensor:
        blocks = [_cosine(device_rows[h * dim : (h + 1) * dim], public_rows[h * dim : (h + 1) * dim]) for h in heads]
        return torch.stack(blocks).mean(dim=0)

    scores: dict[str, Tensor] = {}
    for projection, heads in (("q_proj", query_heads), ("k_proj", [kv_head]), ("v_proj", [kv_head])):
        name = f"{prefix}{projection}.weight"
        if name in device and name in public:
            scores[projection] = similarity(device[name], public[name], heads)
    name = f"{prefix}o_proj.weight"
    if name in device and name in public:
        # An int8 W_o scales each output row, which would tilt every column the same way: a column permutation
        # leaves a row's largest magnitude alone, so dividing rows by it undoes the scale on both sides.
        rows = (w / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) for w in (device[name], public[name]))
        device_o, public_o = rows
        columns = similarity(device_o.T, public_o.T, query_heads)
        # The paper-literal mode un-permutes the attention output in the enclave and leaves W_o as published:
        # then its columns sit in place and say nothing about the key.
        if not bool((columns.argmax(dim=1) == torch.arange(dim)).all()):
            scores["o_proj"] = columns
    return scores


def _cosine(device_rows: Tensor, public_rows: Tensor) -> Tensor:
    def unit(rows: Tensor) -> Tensor:
        return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30)

    return unit(device_rows) @ unit(public_rows).T


def _assign_free(scores: Tensor) -> tuple[Tensor, float, float]:
    _, columns = linear_sum_assignment(scores.numpy(), maximize=True)  # rows come back in order
    permutation = torch.as_tensor(columns, dtype=torch.int64)
    return permutation, _margin(scores), scores.gather(1, permutation[:, None]).mean().item()


def _assign_pairs(scores: Tensor) -> tuple[Tensor, float, float]:
    """Assign RoPE pairs as units: device pair (u, u + half) holds some public pair (v, v + half), in order."""
    half = scores.shape[0] // 2
    units = (scores[:half, :half] + scores[half:, half:]) / 2
    _, columns = linear_sum_assignment(units.numpy(), maximize=True)
    target = torch.as_tensor(columns, dtype=torch.int64)
    return torch.cat([target, target + half]), _margin(units), units.gather(1, target[:, None]).mean().item()


def _margin(scores: Tensor) -> float:
    best, runner_up = scores.topk(2, dim=1).values.unbind(dim=1)
    return (best - runner_up).mean().item()


def unpermute_kv_cache(cache: Tensor, permutations: Tensor) -> Tensor:
    """Undo a per-(layer, KV head) key on a cache [layers, batch, kv_heads, positions, head_dim], e.g. the
    device's `kv.k` / `kv.v` with a recovered `KeyRecoveryResult.permutations`, ready for KV inversion."""
    inverse = permutations.argsort(dim=-1)
    return cache.gather(-1, inverse[:, None, :, None, :].expand_as(cache))


def read_rope_key(device_weights: Mapping[str, Tensor], config: ModelConfig) -> Tensor | None:
    """The key read off the per-head RoPE frequencies (`layers.{i}.rope_inv_freq`, [kv_heads, head_dim/2]) a
    device that rotates permuted heads must hold: RoPE's frequencies are public and distinct, so each one names
    the pair it belongs to. None when the device holds no such table."""
    names = [f"layers.{layer}.rope_inv_freq" for layer in range(config.num_layers)]
    if not all(name in device_weights for name in names):
        return None
    public = rope_inverse_frequencies(config)
    pairs = torch.stack([(device_weights[name][..., None] - public).abs().argmin(dim=-1) for name in names])
    return torch.cat([pairs, pairs + config.head_dim // 2], dim=-1)


def held_attention_weights(view: DeviceView) -> dict[str, Tensor]:
    """The attention projections and RoPE tables the device held, under the names it held them."""
    return {name: view.weight(name) for name in view.weight_names if name.split(".")[2:3] in (["wqkv"], ["wo"], ["rope_inv_freq"])}


AFTER_KEY_METHOD = (
    "recover each head's permutation by matching the device's q/k/v (and W_o) rows to the public weights, "
    "undo it on the cache, then " + KV_METHOD
)


def invert_after_key_recovery(view: DeviceView, public: Llama) -> ConversationRecovery:
    """KV inversion on the device's cache after undoing the key recovered from the device's own weights.

    On a device whose weights carry no key the recovered permutation is the identity, and this is KV inversion.
    """
    attack = "kv_inversion_after_key_recovery"
    if reason := view.kv_unusable(0):
        return ConversationRecovery.nothing(attack, AFTER_KEY_METHOD, reason, view.holds_clear_token_ids())
    held = held_attention_weights(view)
    if not attention_weights(held, public.config):  # column shares of unkeyed, blinded weights: no key to undo
        method = f"{KV_METHOD}, with no key undone: the device holds no whole q/k/v/o projection to recover one from"
        return invert_kv_cache(view, public, attack=attack, method=method)
    recovered = recover_permutations(held, flat_weights(public.weights), public.config, pair_units=True)
    keys, values = view.kv_cache()
    cache = (unpermute_kv_cache(keys, recovered.permutations), unpermute_kv_cache(values, recovered.permutations))
    return invert_kv_cache(view, public, cache, attack, AFTER_KEY_METHOD)
