"""Vocabulary matching ("Hidden No More", Thomas et al., ICML'25; KV-Cloak's collision attack): recover the
conversation token by token by running the public model on candidate tokens and comparing what each would
have cached with what the device cached.

Candidates are ranked, then evaluated `chunk_size` at a time in that order until one matches within
`tolerance` or `max_candidates` were tried. At layer 0 a position's key and value depend only on its token
and position, so every token's are precomputed once (one projection of every normalized embedding); the
ranking is by the value alone, which needs no rotation, and keys are rotated only for the chunks checked. At a
deeper layer they depend on the prefix as well: the attack feeds the prefix recovered so far through the
public model and ranks candidates by its next-token prediction; each chunk runs as one batch sharing that
prefix.

`features` says what is compared at each position:
- "raw": the key and value vectors themselves (a cache in the model's own basis, as under `plain`);
- "sorted": each head's key and value entries in sorted order, unchanged by any permutation of head_dim
  inside a head (even one that differs per position);
- "gram": each head's inner products with the keys (values) of the earlier positions and with itself,
  unchanged by any orthogonal change of basis inside a head shared by all positions: KV-Shield's
  per-head permutation is one. The attacker recomputes the prefix's side from the tokens it recovered.
"""

from __future__ import annotations

from typing import Iterator, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidRequestError
from ..model.kernels import StepContext, flat_weights, run_ops
from ..model.llama import KVCache, Llama, apply_rope
from ..model.ops import LAYER_OPS
from .kv_inversion import check_public_model, layer0_kv_weight, normed_embeddings
from .view import ConversationRecovery, DeviceView

Features = Literal["raw", "sorted", "gram"]
FEATURES: tuple[Features, ...] = ("raw", "sorted", "gram")


def match_vocabulary(
    view: DeviceView,
    public: Llama,
    *,
    layer: int = 0,
    features: Features = "raw",
    chunk_size: int = 256,
    max_candidates: int | None = None,
    tolerance: float = 1e-3,
) -> ConversationRecovery:
    """Recover every cached token of the final KV cache of `layer` in `view`.

    Each guess's distance is the relative L2 distance ||f(candidate) - f(observed)|| / ||f(observed)||
    between feature vectors. Per position, ranked candidates are evaluated `chunk_size` at a time, at most
    `max_candidates` of them (default: the whole vocabulary), stopping at a distance <= `tolerance`.
    """
    if features not in FEATURES:
        raise InvalidRequestError(f"unknown features {features!r}", f"use one of {', '.join(FEATURES)}")
    if not 0 <= layer < public.config.num_layers:
        raise InvalidRequestError(
            f"layer {layer} is not a layer of the public model", f"pick a layer in 0..{public.config.num_layers - 1}"
        )
    search = (
        "candidates ranked by how well their value alone matches"
        if layer == 0
        else "candidates ranked by the public model's next-token prediction on the recovered prefix"
    )
    method = f"vocabulary matching on the {features} features of layer {layer}'s keys and values; {search}"
    clear = view.holds_clear_token_ids()
    if reason := view.kv_unusable(layer):
        return ConversationRecovery.nothing("vocab_matching", method, reason, clear)
    check_public_model(view, public)
    keys, values = view.kv_cache()
    positions = view.cache_positions()
    if layer == 0:
        candidates: _Candidates = _Layer0Candidates(public, features, chunk_size, max_candidates)
    else:
        max_len = positions.shape[1] + chunk_size  # a candidate batch is written past the prefix
        candidates = _PrefixCandidates(public, layer, max_len, chunk_size, max_candidates)

    tokens, distances, evaluated = [], [], 0
    for row in range(positions.shape[0]):
        real = (positions[row] >= 0).nonzero().flatten()
        row_tokens, row_distances, row_evaluated = _recover_row(
            candidates, keys[layer, row][:, real].float(), values[layer, row][:, real].float(), features, tolerance
        )
        tokens.append([None] * (positions.shape[1] - len(real)) + row_tokens)  # padding is on the left
        distances.append([None] * (positions.shape[1] - len(real)) + row_distances)
        evaluated += row_evaluated
    guesses = sum(token is not None for row in tokens for token in row)
    return ConversationRecovery(
        attack="vocab_matching",
        method=method,
        tokens=tokens,
        distances=distances,
        used=[f"state:kv.k[layer {layer}]", f"state:kv.v[layer {layer}]", "manifest:run meta (pad)"],
        clear_token_ids=clear,
        notes=[f"{evaluated} candidate evaluations for {guesses} positions"],
    )


def kv_features(kind: Features, parts: Sequence[tuple[Tensor, Tensor | None]]) -> Tensor:
    """Feature vectors [S, F] of S candidates at one position.

    Each part is (vectors [S, heads, head_dim], the earlier positions' [heads, n, head_dim]): the keys and
    the values. The earlier positions are read by "gram" only.
    """
    if kind == "raw":
        pieces = [vectors for vectors, _ in parts]
    elif kind == "sorted":
        pieces = [vectors.sort(dim=-1).values for vectors, _ in parts]
    else:
        pieces = [
            piece
            for vectors, earlier in parts
            for piece in (torch.einsum("shd,hnd->shn", vectors, earlier), vectors.pow(2).sum(-1, keepdim=True))
        ]
    return torch.cat([piece.flatten(1) for piece in pieces], dim=1)


def relative_distances(found: Tensor, observed: Tensor) -> Tensor:
    return (found - observed).norm(dim=-1) / observed.norm().clamp(min=1e-30)


def _recover_row(
    candidates: "_Candidates", keys: Tensor, values: Tensor, features: Features, tolerance: float
) -> tuple[list[int], list[float], int]:
    """Guess one row's tokens in position order from its observed keys/values [heads, positions, head_dim]."""
    candidates.begin_row()
    tokens, distances, evaluated = [], [], 0
    for position in range(keys.shape[1]):
        key, value = keys[None, :, position], values[None, :, position]
        earlier_keys, earlier_values = keys[:, :position], values[:, :position]
        observed = kv_features(features, [(key, earlier_keys), (value, earlier_values)])[0]
        # The recovered prefix's keys and values: only "gram" features compare with them.
        prefix_keys, prefix_values = candidates.prefix(position) if features == "gram" else (None, None)
        best_distance, best_token = float("inf"), -1
        for chunk in candidates.ranked(position, value, earlier_values):
            found_keys, found_values = candidates.kv(chunk, position)
            found = kv_features(features, [(found_keys, prefix_keys), (found_values, prefix_values)])
            distance, at = relative_distances(found, observed).min(dim=0)
            evaluated += len(chunk)
            if distance.item() < best_distance:
                best_distance, best_token = distance.item(), int(chunk[at])
            if best_distance <= tolerance:
                break
        candidates.commit(best_token, position)
        tokens.append(best_token)
        distances.append(best_distance)
    return tokens, distances, evaluated


class _Candidates(Protocol):
    """The public model evaluating candidate tokens at the next position of one row."""

    def begin_row(self) -> None: ...

    def ranked(self, position: int, value: Tensor, earlier_values: Tensor) -> Iterator[Tensor]:
        """Candidate token ids in chunks, most promising first; `value` [1, heads, head_dim] is the observed one."""

    def kv(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """Keys (after RoPE) and values [S, heads, head_dim] the candidates would have at `position`."""

    def prefix(self, position: int) -> tuple[Tensor, Tensor]:
        """Keys and values [heads, position, head_dim] of the tokens recovered before `position`."""

    def commit(self, token: int, position: int) -> None: ...


class _Layer0Candidates:
    """Layer 0: every token's unrotated key and value in one table; a position only rotates the keys.

    Rotating and comparing every vocabulary token's keys at every position costs far more than the rest, so
    candidates are ranked by how well their value alone matches (a value does not depend on the position,
    so its "raw" or "sorted" features are computed once) and their keys are checked in that order.
    """

    def __init__(self, public: Llama, features: Features, chunk_size: int, max_candidates: int | None):
        cfg = public.config
        table = F.linear(normed_embeddings(public), layer0_kv_weight(public))
        self.keys, self.values = table.view(cfg.vocab_size, 2, cfg.num_kv_heads, cfg.head_dim).unbind(1)
        self.cos, self.sin = public.rope_cos, public.rope_sin
        self.features, self.chunk_size = features, chunk_size
        self.max_candidates = max_candidates or cfg.vocab_size
        # Only "gram" features of a value depend on the position (through the prefix): the others are fixed.
        self.value_features = None if features == "gram" else kv_features(features, [(self.values, None)])
        self.value_norms = None if self.value_features is None else self.value_features.pow(2).sum(-1)
        self.recovered: list[int] = []

    def begin_row(self) -> None:
        self.recovered = []

    def ranked(self, position: int, value: Tensor, earlier_values: Tensor) -> Iterator[Tensor]:
        table, norms = self.value_features, self.value_norms
        if table is None:
            table = kv_features(self.features, [(self.values, self.prefix(position)[1])])
            norms = table.pow(2).sum(-1)
        observed = kv_features(self.features, [(value, earlier_values)])[0]
        # The squared distance to `observed` less its constant |observed|^2: one product with the table
        # rather than a pass over its difference. Fine for ranking; chosen matches are measured exactly.
        scores = norms - 2 * (table @ observed)
        first = scores.topk(min(self.chunk_size, self.max_candidates), largest=False).indices
        yield first  # the full sort is needed only when the first chunk holds no match
        if self.max_candidates > len(first):
            order = scores.argsort()
            yield from order[~torch.isin(order, first)][: self.max_candidates - len(first)].split(self.chunk_size)

    def kv(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        at = torch.full((1, len(tokens)), position)
        return self._rotate(self.keys[tokens], at)[0], self.values[tokens]

    def prefix(self, position: int) -> tuple[Tensor, Tensor]:
        tokens = torch.tensor(self.recovered[:position], dtype=torch.int64)
        keys = self._rotate(self.keys[tokens], torch.arange(position)[None])
        return keys[0].transpose(0, 1), self.values[tokens].transpose(0, 1)

    def commit(self, token: int, position: int) -> None:
        self.recovered.append(token)

    def _rotate(self, keys: Tensor, positions: Tensor) -> Tensor:
        """keys [S, heads, head_dim] at positions [1, S] -> [1, S, heads, head_dim] after RoPE."""
        rotated = apply_rope(keys.transpose(0, 1)[None], self.cos[positions], self.sin[positions])
        return rotated.transpose(1, 2)


class _PrefixCandidates:
    """A deeper layer: the recovered prefix runs through the whole public model once, token by token (its
    cache holds the prefix, its logits rank the next candidates); candidates then run as one batch through
    the layers below `layer`, each attending to the prefix and to itself only."""

    def __init__(self, public: Llama, layer: int, max_len: int, chunk_size: int, max_candidates: int | None):
        self.public, self.layer, self.max_len = public, layer, max_len
        self.chunk_size = chunk_size
        self.max_candidates = max_candidates or public.config.vocab_size
        below = [(op, lower) for lower in range(layer) for op in LAYER_OPS]
        self.ops = [("embed", None), *below, ("attn_norm", layer), ("qkv_proj", layer), ("rope", layer)]
        self.weights = flat_weights(public.weights)
        self.begin_row()

    def begin_row(self) -> None:
        self.cache = KVCache(self.public.config, 1, self.max_len)
        self.next_logits: Tensor | None = None

    def ranked(self, position: int, value: Tensor, earlier_values: Tensor) -> Iterator[Tensor]:
        vocab = self.public.config.vocab_size
        order = torch.arange(vocab) if self.next_logits is None else self.next_logits.argsort(descending=True)
        return iter(order[: self.max_candidates].split(self.chunk_size))

    def kv(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        cfg, count = self.public.config, len(tokens)
        sees = torch.cat([torch.ones(count, position, dtype=torch.bool), torch.eye(count, dtype=torch.bool)], dim=1)
        at = torch.full((1, count), position)
        ctx = StepContext(
            cfg, position, 1, count, None, at, self.public.rope_cos[at], self.public.rope_sin[at],
            sees[None, None], False, True,
        )  # fmt: skip
        values = {"tokens": tokens[None]}
        run_ops(self.ops, values, self.weights, self.cache, ctx)
        shape = (count, cfg.num_kv_heads, cfg.head_dim)
        return values["k"].reshape(shape), values["v"].reshape(shape)

    def prefix(self, position: int) -> tuple[Tensor, Tensor]:
        return self.cache.k[self.layer, 0, :, :position], self.cache.v[self.layer, 0, :, :position]

    def commit(self, token: int, position: int) -> None:
        # Overwrites, at `position`, what the candidate batches wrote there in the layers below.
        logits = self.public.forward(torch.tensor([[token]]), self.cache, position)
        self.next_logits = logits[0, -1]
